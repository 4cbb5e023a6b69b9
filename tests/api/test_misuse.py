"""What a newcomer gets wrong in the API fails where it is written, naming the fix,
instead of leaving nothing registered or failing on the first message."""

from __future__ import annotations

import pytest

from shoal import InvalidJob, Node, SingletonContext
from tests.mesh.conftest import NodeFactory


async def test_decorators_used_without_parentheses_say_how_to_write_them(
    make_node: NodeFactory,
) -> None:
    node: Node = await make_node()

    async def leader(_ctx: SingletonContext) -> None:
        pass

    async def tick() -> None:
        pass

    # Without the check, each returned its inner decorator: nothing was registered and
    # the app's function name was bound to that decorator, silently.
    with pytest.raises(ValueError, match=r"write @node.singleton\(\) or @node.singleton\('name'\)"):
        node.singleton(leader)  # type: ignore[arg-type]
    with pytest.raises(InvalidJob, match=r"write @node.job\('\*/5 \* \* \* \* \*'\)"):
        node.job(tick)  # type: ignore[arg-type]
    with pytest.raises(InvalidJob, match=r"write @node.jobs.task\(\) or @node.jobs.task\('name'\)"):
        node.jobs.task(tick)  # type: ignore[arg-type]
    assert "leader" not in node.singletons.holders()
    assert "tick" not in node.scheduler and "tick" not in node.jobs.definitions.tasks

    # Written right, both register.
    node.singleton()(leader)
    node.job("*/5 * * * * *")(tick)
    node.jobs.task()(tick)
    assert "leader" in node.singletons.holders() and "tick" in node.scheduler
    assert "tick" in node.jobs.definitions.tasks
