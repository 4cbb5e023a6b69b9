"""Which event loop the tests run on.

`SHOAL_TEST_LOOP=asyncio|uvloop|auto` picks the loop of the in-process async
tests and, through `SHOAL_EVENT_LOOP` (which `hi` and every `shoal.loop.run`
honour), the loop of the node processes the tests start. Unset, both follow
`SHOAL_EVENT_LOOP`, whose default `auto` is uvloop when it is installed, as in
production. Run the suite once per loop to cover both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

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
