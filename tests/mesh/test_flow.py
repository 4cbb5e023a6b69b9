"""Messages between two real nodes: order, flow control, malformed frames.

The send path batches frames into large writes; these tests hold it to the
semantics: per-pair order across sends, calls and replies; a sender that never
yields is still held back by a slow receiver (bounded memory); and an
authenticated peer that sends a malformed message is dropped, not crashed on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from shoal import wire
from shoal.mesh import WRITE_BATCH, WRITE_HIGH_WATER
from shoal.node import Node
from tests.mesh.conftest import NodeFactory, peer_of
from tests.support.procs import async_wait_until


async def connected_pair(make_node: NodeFactory) -> tuple[Node, Node]:
    b = await make_node()
    a = await make_node([peer_of(b)])
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    return a, b


async def test_sends_and_calls_arrive_in_order(make_node: NodeFactory) -> None:
    a, b = await connected_pair(make_node)
    seen: list[int] = []
    # On the loop: handlers in worker threads (the default) may run in any order.
    b.register("seq", lambda payload, _sender: seen.append(payload), sync_to_thread=False)
    b.register("last", lambda _payload, _sender: seen[-1] if seen else None, sync_to_thread=False)
    for i in range(20_000):
        await a.send(b.name, "seq", i)
        if i % 5000 == 4999:  # a call is ordered behind every send before it
            assert await a.call(b.name, "last", None) == i
    assert seen == list(range(20_000))


async def test_a_sender_that_never_yields_is_held_back_by_a_slow_reader(
    make_node: NodeFactory,
) -> None:
    a, b = await connected_pair(make_node)
    received: list[int] = []
    b.register("sink", lambda payload, _sender: received.append(payload[0]), sync_to_thread=False)
    assert b.mesh is not None and a.mesh is not None
    reader = b.mesh.connection_to(a.name)
    assert reader.transport is not None
    reader.transport.pause_reading()  # b stops reading: a's writes pile up
    writer = a.mesh.connection_to(b.name)
    assert writer.transport is not None
    blob = b"x" * 1000
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for i in range(200_000):  # 200 MB if nothing held it back
            await a.send(b.name, "sink", [i, blob])
            sent += 1

    task = asyncio.create_task(flood())
    await async_wait_until(lambda: not writer._writable.is_set(), timeout=5, message="paused")
    sent_when_paused = sent
    for _ in range(1000):  # the flood gets every chance to run: it must be stuck, not queueing
        await asyncio.sleep(0)
    assert sent == sent_when_paused
    assert writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + WRITE_BATCH + 2000
    assert len(writer._out) == 0
    reader.transport.resume_reading()
    await asyncio.wait_for(task, 60)
    await async_wait_until(lambda: len(received) == 200_000, timeout=30, message="all received")
    assert received == list(range(200_000))


@pytest.mark.parametrize(
    "frame",
    [[[1], "x"], [True], [2.0, "h", None], ["send"], [99], [], {"t": "welcome"}, None],
    ids=repr,
)
async def test_an_authenticated_peer_sending_a_malformed_message_is_dropped(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture, frame: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal")
    a, b = await connected_pair(make_node)
    assert a.mesh is not None
    a.mesh.connection_to(b.name).send(frame)
    await async_wait_until(lambda: a.name not in b.nodes(), timeout=5, message="dropped")
    assert any("malformed" in r.getMessage() and a.name in r.getMessage() for r in caplog.records)
    # It comes back once discovery proposes it again, and works.
    a.mesh.propose([peer_of(b)])
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    b.register("echo", lambda payload, _sender: payload)
    assert await a.call(b.name, "echo", "ok") == "ok"


async def test_a_frame_over_the_size_limit_drops_the_connection(make_node: NodeFactory) -> None:
    b = await make_node(max_frame_size=64 * 1024)
    a = await make_node([peer_of(b)])
    await async_wait_until(lambda: a.name in b.nodes(), timeout=5)
    received: list[int] = []
    b.register("sink", lambda payload, _sender: received.append(len(payload)))
    # Under the limit (and far over the 4 KiB handshake limit): delivered, still connected.
    under = 64 * 1024 - 1024
    assert under > wire.MAX_HANDSHAKE_FRAME
    await a.send(b.name, "sink", b"x" * under)
    await async_wait_until(lambda: received == [under], timeout=5, message="delivered")
    await a.send(b.name, "sink", b"x" * (64 * 1024))  # header + envelope: over the limit
    await async_wait_until(lambda: a.name not in b.nodes(), timeout=5, message="dropped")
    assert received == [under]
