"""Suite-wide hooks: the event loop the tests run on, and under CI a skip is a failure.

`SHOAL_TEST_LOOP=asyncio|uvloop|auto` picks the loop of the in-process async
tests and, through `SHOAL_EVENT_LOOP` (which `hi` and every `shoal.loop.run`
honour), the loop of the node processes the tests start. Unset, both follow
`SHOAL_EVENT_LOOP`, whose default `auto` is uvloop when it is installed, as in
production. Run the suite once per loop to cover both.

Tests skip when a real part they need is missing here (network namespaces, Postgres, Chromium,
compose, haproxy, hadolint, multicast on loopback, atheris...). On a developer's machine that
is fine and the run lists the skips (`-rs`). In CI (`CI=true`, as GitHub Actions and most CI
services set it) a lost part would make whole areas vanish from the run without a word, so
every skip is turned into a failure that names what is missing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Generator, Mapping
from typing import Any

import pytest

from shoal import loop as shoal_loop

if os.environ.get("SHOAL_TEST_LOOP"):
    # Children inherit the environment: spawned nodes run on the same loop.
    os.environ[shoal_loop.ENV] = os.environ["SHOAL_TEST_LOOP"]
TEST_LOOP = shoal_loop.selected()  # a bad value stops the run here, with the reason


def pytest_report_header() -> str:
    return f"event loop: {TEST_LOOP} ({shoal_loop.ENV}={os.environ.get(shoal_loop.ENV, 'auto')})"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """One factory: every async test runs on the selected loop (ids stay unchanged)."""
    if item.get_closest_marker("asyncio_loop") is not None:
        return {"asyncio": asyncio.new_event_loop}
    return {TEST_LOOP: shoal_loop.loop_factory() or asyncio.new_event_loop}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(longrepr: Any) -> str:
    """The skip reason from a skipped report's (path, line, reason) triple."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail(report: Any, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"CI=true and {where} would be skipped: {_reason(report.longrepr)}\n"
        "In CI every real part the tests need must be present (see ./scripts/test)."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        _fail(report, collector.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the opt-in rolling restart unless SHOAL_DOCKER_ROLLING=1, and under
    scripts/mutation (SHOAL_MUTATION=1) the tests that start node processes: a mutant
    lives only in the pytest process, so they cannot see it and only cost time."""

    def wanted(item: pytest.Item) -> bool:
        if item.get_closest_marker("rolling") and os.environ.get("SHOAL_DOCKER_ROLLING") != "1":
            return False  # opt-in: it needs the machine's cores for itself
        mutation = os.environ.get("SHOAL_MUTATION") == "1"
        return not (mutation and "procs" in getattr(item, "fixturenames", ()))

    keep = [item for item in items if wanted(item)]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
