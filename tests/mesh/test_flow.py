"""Messages between two real nodes: order, flow control, malformed frames.

The send path batches frames into large writes; these tests hold it to the
semantics: per-pair order across sends, calls and replies; a lone call is written
at once and the replies to one read leave in one write; a sender that never
yields is still held back by a slow receiver (bounded memory); and an
authenticated peer that sends a malformed message is dropped, not crashed on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from shoal import wire
from shoal.mesh import WRITE_BATCH, WRITE_HIGH_WATER, Connection
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


class Tap(asyncio.Protocol):
    """Stands between an established connection and its real transport (either loop's).

    Records each write the connection makes and the task that made it (None: a callback
    the loop ran later, such as the batch flush), and for each read, the handler calls
    and the writes made while the connection handled it.
    """

    def __init__(self, conn: Connection) -> None:
        assert conn.transport is not None
        self.conn = conn
        self.real = conn.transport
        self.writers: list[asyncio.Task[Any] | None] = []
        self.handled = 0  # bumped by the test's handler
        self.reads: list[tuple[int, int]] = []  # (handler calls, writes) per read
        conn.transport = cast(asyncio.Transport, self)
        self.real.set_protocol(self)

    # the transport, as the connection sees it
    def write(self, data: bytes) -> None:
        self.writers.append(asyncio.current_task())
        self.real.write(data)

    def writelines(self, data: Any) -> None:
        self.writers.append(asyncio.current_task())
        self.real.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    # the protocol, as the transport sees it
    def data_received(self, data: bytes) -> None:
        handled, writes = self.handled, len(self.writers)
        self.conn.data_received(data)
        self.reads.append((self.handled - handled, len(self.writers) - writes))

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


async def test_a_lone_call_is_written_by_the_calling_task_in_the_step_it_is_sent(
    make_node: NodeFactory,
) -> None:
    """Latency: a call's frame goes to the socket at once, not one loop iteration later
    (the batch flush), also right after a read (the previous call's reply)."""
    b = await make_node()
    # Heartbeats from a only after 5 s idle: nothing else of a's goes out meanwhile.
    a = await make_node([peer_of(b)], heartbeat_interval=10.0, failure_timeout=30)
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    b.register("echo", lambda payload, _sender: payload, sync_to_thread=False)
    assert a.mesh is not None
    tap = Tap(a.mesh.connection_to(b.name))
    assert await a.call(b.name, "echo", -1) == -1  # from here, each call follows a reply
    me = asyncio.current_task()
    for i in range(20):
        before = len(tap.writers)
        assert await a.call(b.name, "echo", i) == i
        by = [
            "caller" if t is me else "a later callback" if t is None else repr(t)
            for t in tap.writers[before:]
        ]
        assert by == ["caller"], f"call {i}: its frame was written by {by}"


async def test_the_replies_to_the_calls_of_one_read_leave_in_one_write(
    make_node: NodeFactory,
) -> None:
    """Syscalls: the replies a node sends while it handles one read are batched into one
    write (one record), not one write for the first and another for the rest."""
    b = await make_node()
    a = await make_node([peer_of(b)])
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    assert b.mesh is not None
    tap = Tap(b.mesh.connection_to(a.name))

    def echo(payload: int, _sender: str) -> int:
        tap.handled += 1
        return payload

    b.register("echo", echo, sync_to_thread=False)
    for _ in range(5):  # calls made in one step reach b in one or two reads
        assert await asyncio.gather(*(a.call(b.name, "echo", i) for i in range(50))) == list(
            range(50)
        )
    with_calls = [(calls, writes) for calls, writes in tap.reads if calls]
    assert sum(calls for calls, _ in with_calls) == 250
    assert max(calls for calls, _ in with_calls) >= 2, with_calls
    assert all(writes == 1 for _, writes in with_calls), with_calls


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
