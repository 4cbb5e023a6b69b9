"""Limits that a peer (or our own code) may hit, in-process: what each one does.

- A message over the frame limit fails where it is made (`MessageTooLarge`),
  and a reply over it reaches the caller as `ReplyTooLarge`; no connection drops.
- Sync handlers run in worker threads: a blocking one does not stall the node.
- Handler calls from one peer are capped: a call over the cap gets `Busy`.
- A call without a reply in time raises `CallTimeout`, and leaves nothing behind.
- A peer that does not read what we send is dropped before it grows our memory,
  and a sender awaiting it does not wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from shoal import (
    Busy,
    CallTimeout,
    ConfigError,
    MessageTooLarge,
    NodeDown,
    RemoteError,
    ReplyTooLarge,
)
from shoal.mesh import MembershipEvent
from shoal.node import Node
from tests.mesh.conftest import COOKIE, NodeFactory, peer_of, settings_for
from tests.support.procs import async_wait_until

KIB = 1024


async def pair(make_node: NodeFactory, **b_settings: Any) -> tuple[Node, Node]:
    b = await make_node(**b_settings)
    a = await make_node([peer_of(b)])
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    return a, b


def record_downs(node: Node) -> list[MembershipEvent]:
    downs: list[MembershipEvent] = []
    node.add_listener(lambda event: downs.append(event) if event.kind == "down" else None)
    return downs


async def test_oversized_messages_fail_at_the_sender_and_the_connection_stays(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    downs = record_downs(a) + record_downs(b)
    got: list[Any] = []
    b.register("sink", lambda payload, _sender: got.append(payload), sync_to_thread=False)
    too_big = b"x" * a.settings.max_frame_size
    for attempt in (
        a.send(b.name, "sink", too_big),
        a.call(b.name, "sink", too_big),
        a.publish("topic", too_big),
        a.send(a.name, "sink", too_big),  # the same rule for this node itself
    ):
        with pytest.raises(MessageTooLarge, match="SHOAL_MAX_FRAME_BYTES"):
            await attempt
    assert isinstance(MessageTooLarge("x"), ValueError)
    await a.send(b.name, "sink", "fits")
    await async_wait_until(lambda: got == ["fits"], timeout=5)
    assert downs == []


async def test_a_reply_over_the_limit_reaches_the_caller_as_reply_too_large(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    downs = record_downs(a) + record_downs(b)
    b.register("blob", lambda size, _sender: b"x" * size)
    with pytest.raises(ReplyTooLarge, match="the reply") as raised:
        await a.call(b.name, "blob", b.settings.max_frame_size)
    assert isinstance(raised.value, RemoteError) and isinstance(raised.value, MessageTooLarge)
    with pytest.raises(ReplyTooLarge):
        await b.call(b.name, "blob", b.settings.max_frame_size)  # a local call alike
    assert await a.call(b.name, "blob", 10) == b"x" * 10  # the connection is fine
    assert downs == []


async def test_a_call_without_a_reply_in_time_raises_call_timeout(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    release = asyncio.Event()

    async def stuck(_payload: Any, _sender: str) -> str:
        await release.wait()
        return "late"

    b.register("stuck", stuck)
    started = time.monotonic()
    with pytest.raises(CallTimeout, match=r"'stuck' on .* did not reply within 0\.3 s"):
        # Bounded here too: a call whose timer never fires must fail the test, not hang it.
        await asyncio.wait_for(a.call(b.name, "stuck", None, timeout=0.3), 5)
    assert 0.25 <= time.monotonic() - started < 3
    assert a.messaging._calls == {}  # the pending call is gone
    release.set()  # the late reply finds no call and is dropped
    assert await a.call(b.name, "stuck", None, timeout=5) == "late"
    assert a.messaging._calls == {}


async def test_call_deadlines_share_one_timer_and_a_shorter_one_still_fires_on_time(
    make_node: NodeFactory,
) -> None:
    """Calls share one deadline timer: a short timeout behind a long one fires on time,
    calls that end leave no deadlines behind, and one timeout does not end the others."""
    a, b = await pair(make_node)
    release = asyncio.Event()

    async def stuck(_payload: Any, _sender: str) -> str:
        await release.wait()
        return "late"

    b.register("stuck", stuck)
    b.register("echo", lambda payload, _sender: payload, sync_to_thread=False)
    slow = asyncio.create_task(a.call(b.name, "stuck", None, timeout=30))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(CallTimeout, match=r"within 0\.3 s"):
        await a.call(b.name, "stuck", None, timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3
    assert not slow.done()  # the long call is still waiting for its reply
    for i in range(1000):
        assert await a.call(b.name, "echo", i) == i
    # Deadlines of calls that ended are dropped as calls end (not kept for their timeout).
    assert len(a.messaging._deadlines) <= 2 * len(a.messaging._calls) + 64
    release.set()
    assert await slow == "late"
    assert a.messaging._calls == {}


async def test_a_blocking_sync_handler_runs_in_a_thread_and_the_node_stays_responsive(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    threads: list[str] = []

    def slow(seconds: float, _sender: str) -> str:
        threads.append(threading.current_thread().name)
        time.sleep(seconds)
        return "slept"

    b.register("slow", slow)
    b.register("where", lambda _p, _s: threading.current_thread().name, sync_to_thread=False)
    call = asyncio.ensure_future(a.call(b.name, "slow", 1.5, timeout=5))
    await async_wait_until(lambda: threads, timeout=5)
    started = time.monotonic()
    await a.ping(b.name)  # answered by b's loop while `slow` blocks its thread
    assert time.monotonic() - started < 0.5
    assert await call == "slept"
    assert threads[0].startswith("shoal-handler")
    assert await a.call(b.name, "where", None) == threading.current_thread().name  # on the loop
    assert await b.call(b.name, "slow", 0.01) == "slept"  # local calls too, in a thread
    assert threads[1].startswith("shoal-handler")


async def test_calls_over_the_per_peer_cap_get_busy_and_sends_are_dropped(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal")
    a, b = await pair(make_node, max_inflight_per_peer=3)
    release = asyncio.Event()
    ran = 0

    async def wait(_payload: Any, _sender: str) -> str:
        nonlocal ran
        ran += 1
        await release.wait()
        return "done"

    b.register("wait", wait)
    calls = [asyncio.ensure_future(a.call(b.name, "wait", None)) for _ in range(3)]
    await async_wait_until(lambda: ran == 3, timeout=5)
    with pytest.raises(Busy, match="busy"):
        await a.call(b.name, "wait", None)
    await a.send(b.name, "wait", None)  # dropped, not queued
    await a.ping(b.name)  # shoal's own handlers run on the loop: never refused
    release.set()
    assert await asyncio.gather(*calls) == ["done"] * 3
    assert ran == 3
    assert any("SHOAL_MAX_INFLIGHT_PER_PEER" in r.getMessage() for r in caplog.records)
    assert await a.call(b.name, "wait", None) == "done"  # free again


async def test_a_peer_that_does_not_read_is_dropped_at_the_send_buffer_limit(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal")
    limit = 4 * 1024 * KIB + 2 * 64 * KIB
    a = await make_node(max_frame_size=64 * KIB, max_send_buffer=limit, failure_timeout=30)
    b = await make_node([peer_of(a)], max_frame_size=64 * KIB, failure_timeout=30)
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    downs = record_downs(a)
    assert b.mesh is not None and a.mesh is not None
    reader = b.mesh.connection_to(a.name).transport
    assert reader is not None
    reader.pause_reading()  # b never reads again
    conn = a.mesh.connection_to(b.name)
    assert conn.transport is not None
    for _ in range(limit // (60 * KIB) + 100):  # publish does not wait for slow peers
        await a.publish("t", b"x" * (60 * KIB))
        assert conn.transport.get_write_buffer_size() <= limit + 64 * KIB
        if downs:
            break
        await asyncio.sleep(0)
    await async_wait_until(lambda: downs, timeout=5, message="b dropped")
    assert downs[0].reason == "not reading"
    assert any("has not read" in r.getMessage() for r in caplog.records)


async def test_a_send_waiting_on_a_peer_that_stopped_reading_ends_after_the_failure_timeout(
    make_node: NodeFactory,
) -> None:
    a = await make_node(failure_timeout=1.0)
    b = await make_node([peer_of(a)], failure_timeout=30)  # b itself would wait 30 s
    await async_wait_until(lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5)
    b.register("sink", lambda _p, _s: None, sync_to_thread=False)
    assert b.mesh is not None
    transport = b.mesh.connection_to(a.name).transport
    assert transport is not None
    transport.pause_reading()
    started = time.monotonic()
    with pytest.raises(NodeDown):
        async with asyncio.timeout(10):  # fails the test, rather than hanging it
            for _ in range(100_000):  # 6 GB if nothing stopped it
                await a.send(b.name, "sink", b"x" * (60 * KIB))
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_frame_size": 1000},
        {"max_send_buffer": 1024 * KIB},
        {"max_inflight_per_peer": 0},
        {"handler_threads": 0},
    ],
    ids=repr,
)
def test_limits_are_validated(overrides: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="SHOAL_"):
        settings_for("127.0.0.1", **overrides).validate()


def test_limits_come_from_the_environment() -> None:
    from shoal import Settings

    env = {
        "RELEASE_COOKIE": COOKIE,
        "NODE_HOST": "127.0.0.1",
        "SHOAL_MAX_FRAME_BYTES": str(1024 * KIB),
        "SHOAL_MAX_SEND_BUFFER_BYTES": str(32 * 1024 * KIB),
        "SHOAL_MAX_INFLIGHT_PER_PEER": "10",
        "SHOAL_HANDLER_THREADS": "4",
    }
    settings = Settings.from_env(env)
    assert (settings.max_frame_size, settings.max_send_buffer) == (1024 * KIB, 32 * 1024 * KIB)
    assert (settings.max_inflight_per_peer, settings.handler_threads) == (10, 4)
    defaults = Settings.from_env({"RELEASE_COOKIE": COOKIE, "NODE_HOST": "127.0.0.1"})
    assert defaults.max_frame_size == 512 * KIB


async def test_a_handler_that_raises_type_error_fails_the_call_not_the_connection(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    downs = record_downs(a)

    # One with the wrong parameters is refused by register (tests/api/test_misuse.py).
    async def bad(payload: Any, _sender: str) -> Any:
        return payload + 1  # a TypeError for None

    b.register("bad", bad)
    with pytest.raises(RemoteError, match="TypeError"):
        await a.call(b.name, "bad", None)
    assert await a.ping(b.name) >= 0
    assert downs == []
