"""Busy polling (`SHOAL_BUSY_POLL_US`): reading a call and sending one keep a node's loop
polling for a moment, so that the next call or the reply is read without waking the
process; one-way messages do not, and a node with nothing to do stops polling. (What it
gains is measured by `bench/core.py`, the window itself in tests/test_loop.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shoal import loop as shoal_loop
from tests.mesh.conftest import NodeFactory
from tests.mesh.test_messaging import mesh_of
from tests.test_loop import FakeClock, loop_iterations


async def test_a_call_keeps_the_caller_and_the_callee_polling_a_one_way_message_does_not(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()  # the window never ends while the clock stands still
    monkeypatch.setattr(shoal_loop, "time", clock)
    a, b = await mesh_of(make_node, 2)
    received, answer, asked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    b.register("sink", lambda _payload, _sender: received.set(), sync_to_thread=False)

    async def slow(payload: str, _sender: str) -> str:
        asked.set()
        await answer.wait()
        return payload

    b.register("slow", slow)
    assert a.mesh is not None and b.mesh is not None
    clock.now += 1  # every window so far has passed
    await loop_iterations()
    # One-way: no round trip to gain, so neither side polls (a peer could otherwise
    # keep a node polling with a stream of tiny messages).
    await a.send(b.name, "sink", "one-way")
    await asyncio.wait_for(received.wait(), 5)
    assert not a.mesh.busy_poll.polling and not b.mesh.busy_poll.polling
    call = asyncio.ensure_future(a.call(b.name, "slow", "ping"))
    await asyncio.wait_for(asked.wait(), 5)
    assert a.mesh.busy_poll.polling  # waiting for the reply
    assert b.mesh.busy_poll.polling  # it read a call: the next may follow soon
    answer.set()
    assert await asyncio.wait_for(call, 5) == "ping"


async def test_an_idle_node_stops_polling(make_node: NodeFactory) -> None:
    a, b = await mesh_of(make_node, 2)
    b.register("echo", lambda payload, _sender: payload, sync_to_thread=False)
    for i in range(200):
        assert await a.call(b.name, "echo", i) == i
    cpu = time.process_time()
    await asyncio.sleep(1.0)  # heartbeats only (both nodes are in this process)
    # Polling for good would take most of a core; idle nodes take a few ms.
    assert time.process_time() - cpu < 0.3


async def test_busy_polling_off_never_polls(make_node: NodeFactory) -> None:
    a, b = await mesh_of(make_node, 2, busy_poll=0.0)
    b.register("echo", lambda payload, _sender: payload, sync_to_thread=False)
    for i in range(20):
        assert await a.call(b.name, "echo", i) == i
        assert a.mesh is not None and b.mesh is not None
        assert not a.mesh.busy_poll.polling and not b.mesh.busy_poll.polling
