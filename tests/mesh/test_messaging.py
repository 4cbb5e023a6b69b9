"""Messaging as an application sees it, in-process on real nodes: send, call, publish and
subscribe, wait_for, how handlers run, and what a caller gets for each kind of reply.

(Limits, Busy, timeouts and oversized messages: test_limits.py; order and flow control:
test_flow.py; error types: tests/api/test_errors.py.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import msgpack
import pytest

from shoal import (
    Busy,
    CallTimeout,
    NodeDown,
    RemoteError,
    ReplyTooLarge,
    Settings,
    WaitTimeout,
    messaging,
    wire,
)
from shoal.node import Node
from tests.mesh.conftest import COOKIE, NodeFactory, peer_of
from tests.support.procs import async_wait_until

DEADLINE = 5.0


async def mesh_of(make_node: NodeFactory, count: int, **settings: Any) -> list[Node]:
    """`count` started nodes, all connected to each other."""
    first = await make_node(**settings)
    nodes = [first] + [await make_node([peer_of(first)], **settings) for _ in range(count - 1)]
    names = {n.name for n in nodes}
    await async_wait_until(
        lambda: all(set(n.nodes()) == names - {n.name} for n in nodes),
        timeout=DEADLINE,
        message=f"a {count}-node mesh",
    )
    return nodes


async def next_of(subscription: messaging.Subscription) -> tuple[Any, str]:
    return await asyncio.wait_for(subscription.get(), DEADLINE)


def recorder(into: list[tuple[Any, str]]) -> Any:
    """A quick handler (on the loop) that records (payload, sender) and replies 'ok'."""

    def record(payload: Any, sender: str) -> str:
        into.append((payload, sender))
        return "ok"

    return record


# publish / subscribe ---------------------------------------------------------------------
async def test_publish_reaches_every_subscriber_on_every_node_with_the_sender(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    here, here_too, there = a.subscribe("news"), a.subscribe("news"), b.subscribe("news")
    other = b.subscribe("other")
    await a.publish("news", {"n": 1})
    for subscription in (here, here_too, there):
        assert await next_of(subscription) == ({"n": 1}, a.name)
    await b.publish("news", [2])
    assert await next_of(here) == ([2], b.name)
    assert await next_of(there) == ([2], b.name)
    # The other topic got nothing: its first message is the one published on it.
    await a.publish("other", "o")
    assert await next_of(other) == ("o", a.name)


async def test_a_closed_subscription_gets_nothing_and_leaves_no_topic_behind(
    make_node: NodeFactory,
) -> None:
    (a,) = await mesh_of(make_node, 1)
    kept = a.subscribe("t")
    with a.subscribe("t") as first:
        async with a.subscribe("t") as second:
            await a.publish("t", 1)
        second_got = await next_of(second)
        await a.publish("t", 2)
    closed = a.subscribe("t")
    closed.close()
    await a.publish("t", 3)
    assert [await next_of(kept) for _ in range(3)] == [(1, a.name), (2, a.name), (3, a.name)]
    assert second_got == (1, a.name)
    assert [await next_of(first) for _ in range(2)] == [(1, a.name), (2, a.name)]
    for subscription in (first, second, closed):  # nothing was delivered after the close
        with pytest.raises(messaging.SubscriptionClosed, match="subscription to 't' is closed"):
            await asyncio.wait_for(subscription.get(), DEADLINE)
    kept.close()
    closed.close()  # twice is harmless
    assert "t" not in a.messaging._topics  # no subscriber left: no memory held for the topic


async def test_a_subscription_iterates_payloads_in_order(make_node: NodeFactory) -> None:
    a, b = await mesh_of(make_node, 2)
    subscription = b.subscribe("seq")
    for n in range(5):
        await a.publish("seq", n)
    got: list[int] = []

    async def read() -> None:
        async for payload in subscription:
            got.append(payload)
            if len(got) == 5:
                return

    await asyncio.wait_for(read(), DEADLINE)
    assert got == [0, 1, 2, 3, 4]


async def test_closing_a_subscription_ends_the_loops_reading_it(make_node: NodeFactory) -> None:
    # Before, a task in `async for` over a subscription that another part of the app
    # closed (a request that ended, a shutdown) waited forever.
    a, b = await mesh_of(make_node, 2)
    subscription = b.subscribe("orders")
    got: list[list[int]] = [[], []]

    async def read(into: list[int]) -> str:
        async for payload in subscription:
            into.append(payload)
        return "ended"

    readers = [asyncio.ensure_future(read(into)) for into in got]
    await a.publish("orders", 1)
    await async_wait_until(lambda: sum(map(len, got)) == 1, timeout=DEADLINE, message="read 1")
    subscription.close()
    assert await asyncio.wait_for(asyncio.gather(*readers), DEADLINE) == ["ended", "ended"]
    assert sorted(got[0] + got[1]) == [1]
    await a.publish("orders", 2)  # after the close: nobody gets it, nothing is kept
    async for payload in subscription:  # a new loop over it ends at once
        raise AssertionError(f"got {payload!r} after the close")
    assert "orders" not in b.messaging._topics


async def test_a_slow_subscriber_loses_the_oldest_messages_and_is_warned_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.messaging")
    (a,) = await mesh_of(make_node, 1)
    monkeypatch.setattr(messaging, "SUBSCRIPTION_QUEUE", 3)
    slow = a.subscribe("t")
    assert slow.closed is False and slow.dropped == 0
    for n in range(5):
        await a.publish("t", n)
    assert slow.dropped == 2
    assert [(await next_of(slow))[0] for _ in range(3)] == [2, 3, 4]
    for n in range(3 + 10_000):  # the log says so at the 1st, 100th and 10000th drop only
        slow.deliver(n, a.name)
    assert slow.dropped == 10_002
    warnings = [m for r in caplog.records if "is slow" in (m := r.getMessage())]
    assert warnings == [
        f"subscriber to 't' is slow: {n} messages dropped" for n in (1, 100, 10_000)
    ]
    # Closing it while full: the oldest message makes room for the end, counted as dropped.
    slow.close()
    assert slow.closed is True and slow.dropped == 10_003
    assert [payload async for payload in slow] == [10_001, 10_002]


async def test_wait_for_returns_the_first_match_from_any_node_and_unsubscribes(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    waiting = asyncio.ensure_future(a.wait_for("orders", DEADLINE, match=lambda p: p["id"] >= 2))
    await async_wait_until(lambda: "orders" in a.messaging._topics, timeout=DEADLINE)
    for n in range(1, 4):
        await b.publish("orders", {"id": n})
    assert await waiting == {"id": 2}
    assert "orders" not in a.messaging._topics
    anything = asyncio.ensure_future(a.wait_for("orders", DEADLINE))
    await async_wait_until(lambda: "orders" in a.messaging._topics, timeout=DEADLINE)
    await a.publish("orders", None)
    assert await anything is None
    with pytest.raises(WaitTimeout) as raised:
        await a.wait_for("orders", 0.05, match=lambda _p: False)
    assert (raised.value.timeout, raised.value.topic) == (0.05, "orders")
    assert str(raised.value) == "no message on topic 'orders' matched within 0.05 s"
    assert "orders" not in a.messaging._topics


# send ----------------------------------------------------------------------------------------
async def test_send_runs_the_handler_on_the_node_named_with_the_sender(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    on_a: list[tuple[Any, str]] = []
    on_b: list[tuple[Any, str]] = []
    a.register("inbox", recorder(on_a), sync_to_thread=False)
    b.register("inbox", recorder(on_b), sync_to_thread=False)
    await a.send(a.name, "inbox", "to myself")
    assert on_a == [("to myself", a.name)]  # at once, here
    await a.send(b.name, "inbox", "to b")
    await async_wait_until(lambda: on_b == [("to b", a.name)], timeout=DEADLINE)
    assert on_a == [("to myself", a.name)]
    # A call to the node itself tells the handler so, as a peer's call names the peer.
    for sync_to_thread in (True, False):
        a.register(f"sender-{sync_to_thread}", lambda _p, s: s, sync_to_thread=sync_to_thread)
        assert await a.call(a.name, f"sender-{sync_to_thread}", None) == a.name
        assert await b.call(a.name, f"sender-{sync_to_thread}", None) == b.name
    with pytest.raises(NodeDown, match=r"hi@127\.0\.20\.254 is not connected"):
        await a.send("hi@127.0.20.254", "inbox", None)


async def test_a_node_that_is_not_started_says_so() -> None:
    idle = Node(Settings(cookie=COOKIE, host="127.0.20.1", topology="static"))
    for attempt in (
        idle.send("hi@127.0.20.2", "inbox", None),
        idle.call("hi@127.0.20.2", "inbox", None),
        idle.publish("t", None),
    ):
        with pytest.raises(NodeDown, match="the node is not started"):
            await attempt
    idle.messaging.send_to_peers("inbox", None)  # nothing to send to: no error


async def test_send_to_peers_reaches_the_peers_named_or_all_but_never_this_node(
    make_node: NodeFactory,
) -> None:
    a, b, c = await mesh_of(make_node, 3)
    got: dict[str, list[tuple[Any, str]]] = {n.name: [] for n in (a, b, c)}
    for node in (a, b, c):
        node.register("state", recorder(got[node.name]), sync_to_thread=False)
    a.messaging.send_to_peers("state", 1, [b.name, "hi@127.0.20.254"])
    a.messaging.send_to_peers("state", 2)
    expected = {a.name: [], b.name: [(1, a.name), (2, a.name)], c.name: [(2, a.name)]}
    await async_wait_until(lambda: got == expected, timeout=DEADLINE, message=str(expected))


# handlers --------------------------------------------------------------------------------------
async def test_a_handler_name_is_registered_once_and_can_be_removed(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    b.register("h", lambda _p, _s: "first", sync_to_thread=False)
    with pytest.raises(ValueError, match="a handler named 'h' is already registered"):
        b.register("h", lambda _p, _s: "second")
    assert await a.call(b.name, "h", None) == "first"
    b.messaging.unregister("h")
    b.messaging.unregister("never registered")
    with pytest.raises(RemoteError) as raised:
        await a.call(b.name, "h", None)
    assert raised.value.type_name == "NoHandler"
    b.register("h", lambda _p, _s: "again", sync_to_thread=False)
    assert await a.call(b.name, "h", None) == "again"


class AsyncCallable:
    async def __call__(self, payload: Any, sender: str) -> Any:
        return ["async object", payload, threading.current_thread().name]


async def test_each_kind_of_handler_runs_where_it_should_and_replies(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    loop_thread = threading.current_thread().name

    def where(payload: Any, _sender: str) -> Any:
        return [payload, threading.current_thread().name]

    async def coroutine_handler(payload: Any, _sender: str) -> Any:
        await asyncio.sleep(0)
        return ["async", payload, threading.current_thread().name]

    def returns_a_coroutine(payload: Any, sender: str) -> Any:
        return coroutine_handler(payload, sender)

    b.register("threaded", where)
    b.register("inline", where, sync_to_thread=False)
    b.register("shoal.own", where)
    b.register("shoal.own-threaded", where, sync_to_thread=True)
    b.register("async", coroutine_handler)
    b.register("async-object", AsyncCallable())
    b.register("returns-coroutine", returns_a_coroutine, sync_to_thread=False)
    b.register("returns-coroutine-threaded", returns_a_coroutine)
    for caller in (a, b):  # a peer's call and a local one run the handler the same way
        threaded = await caller.call(b.name, "threaded", 1)
        assert threaded[0] == 1 and threaded[1].startswith("shoal-handler")
        assert await caller.call(b.name, "inline", 2) == [2, loop_thread]
        assert await caller.call(b.name, "shoal.own", 3) == [3, loop_thread]
        own_threaded = await caller.call(b.name, "shoal.own-threaded", 4)
        assert own_threaded[1].startswith("shoal-handler")
        assert await caller.call(b.name, "async", 5) == ["async", 5, loop_thread]
        assert await caller.call(b.name, "async-object", 6) == ["async object", 6, loop_thread]
        assert await caller.call(b.name, "returns-coroutine", 7) == ["async", 7, loop_thread]
        answer = await caller.call(b.name, "returns-coroutine-threaded", 8)
        assert answer == ["async", 8, loop_thread]


async def test_sync_handlers_share_the_configured_number_of_threads(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2, handler_threads=2)
    lock = threading.Lock()
    running = peak = 0
    release = threading.Event()

    def blocking(_payload: Any, _sender: str) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(DEADLINE)
        with lock:
            running -= 1
        return peak

    b.register("blocking", blocking)
    calls = [asyncio.ensure_future(a.call(b.name, "blocking", None)) for _ in range(3)]
    await async_wait_until(lambda: running == 2, timeout=DEADLINE, message="two threads busy")
    assert not any(call.done() for call in calls)
    release.set()
    assert max(await asyncio.gather(*calls)) == 2


# calls -------------------------------------------------------------------------------------------
async def test_calls_answer_in_any_order_and_each_caller_gets_its_own_reply(
    make_node: NodeFactory,
) -> None:
    a, b, c = await mesh_of(make_node, 3)
    gates = {n: asyncio.Event() for n in range(4)}

    async def gated(payload: int, sender: str) -> Any:
        await gates[payload].wait()
        return [payload, sender]

    b.register("gated", gated)
    from_a = [asyncio.ensure_future(a.call(b.name, "gated", n)) for n in (0, 1)]
    from_c = [asyncio.ensure_future(c.call(b.name, "gated", n)) for n in (2, 3)]
    for n in (3, 1, 2, 0):  # replies in another order than the calls
        gates[n].set()
    assert await asyncio.gather(*from_a) == [[0, a.name], [1, a.name]]
    assert await asyncio.gather(*from_c) == [[2, c.name], [3, c.name]]
    assert a.messaging._calls == {} and c.messaging._calls == {}
    # Nothing is kept of the handler runs once they are over (no growth per message).
    await async_wait_until(lambda: not b.messaging._tasks, timeout=DEADLINE, message="tasks")


async def test_each_remote_call_is_timed_for_the_metrics(make_node: NodeFactory) -> None:
    a, b = await mesh_of(make_node, 2)
    timed: list[float] = []
    a.messaging.call_observer = timed.append
    assert await a.call(b.name, "shoal.ping", None) == "pong"
    assert len(timed) == 1 and 0 < timed[0] < DEADLINE
    with pytest.raises(RemoteError):
        await a.call(b.name, "missing", None)
    assert len(timed) == 2  # failed calls count too
    assert await a.call(a.name, "shoal.ping", None) == "pong"
    assert len(timed) == 2  # a local call is not a round trip


async def test_a_node_going_down_fails_only_the_calls_waiting_on_it_at_once(
    make_node: NodeFactory,
) -> None:
    a, b, c = await mesh_of(make_node, 3)
    never = asyncio.Event()

    async def hang(_payload: Any, _sender: str) -> None:
        await never.wait()

    b.register("hang", hang)
    c.register("hang", hang)
    on_b = asyncio.ensure_future(a.call(b.name, "hang", None, timeout=60))
    on_c = asyncio.ensure_future(a.call(c.name, "hang", None, timeout=60))
    await async_wait_until(lambda: len(a.messaging._calls) == 2, timeout=DEADLINE)
    await b.stop()
    with pytest.raises(NodeDown, match=f"{b.name} went down"):
        await asyncio.wait_for(on_b, DEADLINE)
    assert not on_c.done()
    on_c.cancel()


async def hanging_call(
    a: Node, b: Node, timeout: float = DEADLINE
) -> tuple[asyncio.Future[Any], int]:
    """A call from a to b that b never answers, and its id (to forge b's replies)."""
    never = asyncio.Event()

    async def hang(_payload: Any, _sender: str) -> None:
        await never.wait()

    if "hang" not in b.messaging._handlers:
        b.register("hang", hang)
    before = set(a.messaging._calls)
    call = asyncio.ensure_future(a.call(b.name, "hang", None, timeout=timeout))
    await async_wait_until(lambda: set(a.messaging._calls) - before, timeout=DEADLINE)
    (call_id,) = set(a.messaging._calls) - before
    return call, call_id


def reply_to(sender: Node, node: Node, *frame: Any) -> None:
    assert sender.mesh is not None
    sender.mesh.connection_to(node.name).send([wire.REPLY, *frame])


@pytest.mark.parametrize(
    "frame",
    [
        [wire.CALL, "h", 1],  # a call without its id
        [wire.SEND, "h", 1, 2],
        [wire.SEND, 5, 1],
        [wire.PUBLISH, 5, 1],
        [wire.PUBLISH, "t"],
        [wire.REPLY, 1, True],
    ],
    ids=repr,
)
async def test_a_malformed_message_drops_the_peer_that_sent_it(
    make_node: NodeFactory, frame: list[Any]
) -> None:
    a, b = await mesh_of(make_node, 2)
    got: list[Any] = []
    b.register("h", lambda payload, _sender: got.append(payload), sync_to_thread=False)
    with b.subscribe("t") as topic:
        assert a.mesh is not None
        a.mesh.connection_to(b.name).send(frame)
        await async_wait_until(lambda: a.name not in b.nodes(), timeout=DEADLINE, message="dropped")
        assert got == [] and topic._queue.empty()


async def test_a_reply_for_no_call_is_ignored_whatever_its_id(make_node: NodeFactory) -> None:
    a, b = await mesh_of(make_node, 2)
    for call_id in ([1], "1", None, 10**6):
        reply_to(b, a, call_id, True, "for no call")
    assert await a.call(b.name, "shoal.ping", None) == "pong"
    assert b.name in a.nodes() and a.name in b.nodes()


async def test_a_reply_counts_only_from_the_called_node_and_for_a_waiting_call(
    make_node: NodeFactory,
) -> None:
    a, b, c = await mesh_of(make_node, 3)
    call, call_id = await hanging_call(a, b)
    reply_to(c, a, call_id, True, "from the wrong node")
    reply_to(b, a, call_id + 1000, True, "for no call")
    reply_to(b, a, str(call_id), True, "an id that is not a number")
    await c.ping(a.name)
    await b.ping(a.name)  # a has read all of those by now
    assert not call.done()
    reply_to(b, a, call_id, True, "the answer")
    assert await call == "the answer"
    reply_to(b, a, call_id, True, "late")  # a reply after the call ended is ignored
    assert await a.ping(b.name) >= 0 and b.name in a.nodes()


@pytest.mark.parametrize(
    ("ok", "value", "error", "text"),
    [
        (False, ["KeyError", "'k'"], RemoteError, "KeyError: 'k'"),
        (False, "old style", RemoteError, "RemoteError: old style"),
        ("busy", "too many", Busy, "Busy: too many"),
        ("too_large", "the reply: 2 MB", ReplyTooLarge, "ReplyTooLarge: the reply: 2 MB"),
        ("from a newer node", ["X", "y"], RemoteError, "X: y"),
        (None, ["X", "y"], RemoteError, "X: y"),
        ([1], ["X", "y"], RemoteError, "X: y"),
    ],
)
async def test_each_kind_of_failed_reply_raises_its_error(
    make_node: NodeFactory, ok: Any, value: Any, error: type[RemoteError], text: str
) -> None:
    a, b = await mesh_of(make_node, 2)
    call, call_id = await hanging_call(a, b)
    reply_to(b, a, call_id, ok, value)
    with pytest.raises(error) as raised:
        await call
    assert type(raised.value) is error and str(raised.value) == text


async def test_a_reply_that_cannot_be_sent_fails_the_call_with_the_reason(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2, max_frame_size=64 * 1024)
    b.register("object", lambda _p, _s: object(), sync_to_thread=False)
    b.register("huge", lambda _p, _s: b"x" * 64 * 1024, sync_to_thread=False)
    for caller in (a, b):
        with pytest.raises(RemoteError) as raised:
            await caller.call(b.name, "object", None)
        assert raised.value.type_name == "TypeError"
        assert "reply is not msgpack-serialisable" in raised.value.message
        with pytest.raises(ReplyTooLarge, match="the reply"):
            await caller.call(b.name, "huge", None)
    assert await a.call(b.name, "shoal.ping", None) == "pong"


async def recording_pair(make_node: NodeFactory) -> tuple[Node, Node, list[str], list[Any]]:
    """Two connected nodes: the peers `a` sees go down, and what b's "record" handler got."""
    a, b = await mesh_of(make_node, 2)
    downs: list[str] = []
    a.add_listener(lambda event: downs.append(event.node) if event.kind == "down" else None)
    got: list[Any] = []
    b.register("record", recorder(got), sync_to_thread=False)
    return a, b, downs, got


async def test_a_dict_keyed_by_tuples_fails_its_message_but_not_the_connection(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # msgpack encodes a tuple key as an array, which Python cannot use as a dict key: the
    # receiver's decode fails. Before, it took that for a malformed frame and dropped the
    # connection, so a payload (or reply) knocked its sender off the mesh.
    a, b, downs, got = await recording_pair(make_node)
    b.register("tuple_keys", lambda _p, _s: {(1, 2): "x"}, sync_to_thread=False)
    keyed = {"ok": 1, "nested": [{(1, "a"): 2}]}
    with pytest.raises(RemoteError) as raised:
        await a.call(b.name, "record", keyed)
    assert raised.value.type_name == "UnreadablePayload"
    assert f"message for 'record' from {a.name} could not be decoded on {b.name}" in str(
        raised.value
    )
    assert "a dict keyed by tuples?" in str(raised.value)
    with pytest.raises(RemoteError, match=f"the reply of 'tuple_keys' from {b.name} could not"):
        await a.call(b.name, "tuple_keys", None)
    with b.subscribe("t") as topic, caplog.at_level(logging.WARNING, logger="shoal"):
        await a.send(b.name, "record", keyed)
        await a.publish("t", keyed)
        await a.publish("t", "after")  # the same connection carries the next message
        assert await next_of(topic) == ("after", a.name)
    assert got == []
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    # The publish's warning is held back: at most one such warning a second.
    assert len(dropped) == 1 and "for 'record'" in dropped[0] and "tuples?" in dropped[0]
    assert await a.call(b.name, "record", {1: (1, 2)}) == "ok"  # int keys, tuple values: fine
    assert got == [({1: [1, 2]}, a.name)]
    assert downs == [] and a.nodes() == [b.name]


async def test_unreadable_sends_in_a_loop_do_not_flood_the_receivers_log(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await mesh_of(make_node, 2)
    got: list[Any] = []
    b.register("record", recorder(got), sync_to_thread=False)
    with caplog.at_level(logging.WARNING, logger="shoal"):
        for _ in range(200):  # before: one warning each, on every receiver
            await a.send(b.name, "record", {(1, 2): "x"})
            await a.publish("t", {(1, 2): "x"})
        assert await a.call(b.name, "record", "after") == "ok"  # all of them were read
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(dropped) <= 3, dropped  # at most one a second
    assert got == [("after", a.name)]


async def test_a_msgpack_extension_type_fails_its_message_but_not_the_connection(
    make_node: NodeFactory,
) -> None:
    # The sender packs msgpack.ExtType and Timestamp, the receiver refuses extension types:
    # before, it dropped the connection as a malformed peer, with every pending call.
    a, b, downs, got = await recording_pair(make_node)
    b.register("stamp", lambda _p, _s: msgpack.Timestamp(1, 0), sync_to_thread=False)
    with pytest.raises(RemoteError, match="msgpack extension type") as raised:
        await a.call(b.name, "record", {"at": msgpack.Timestamp(1, 0)})
    assert raised.value.type_name == "UnreadablePayload"
    with pytest.raises(RemoteError, match=f"the reply of 'stamp' from {b.name} could not"):
        await a.call(b.name, "stamp", None)
    await a.send(b.name, "record", msgpack.ExtType(5, b"x"))
    assert await a.call(b.name, "record", "after") == "ok"  # the same connection
    assert got == [("after", a.name)]
    assert downs == [] and a.nodes() == [b.name]


async def test_an_error_passed_on_from_a_nested_call_keeps_its_type(
    make_node: NodeFactory,
) -> None:
    a, b, c = await mesh_of(make_node, 3)

    def fails(_payload: Any, _sender: str) -> None:
        raise LookupError("not here")

    async def relay(_payload: Any, _sender: str) -> Any:
        return await b.call(c.name, "fails", None)

    c.register("fails", fails)
    b.register("relay", relay)
    with pytest.raises(RemoteError) as raised:
        await a.call(b.name, "relay", None)
    assert (raised.value.type_name, raised.value.message) == ("LookupError", "not here")


async def test_a_handler_slot_is_given_back_however_the_handler_ends(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2, max_inflight_per_peer=1)

    async def fails(_payload: Any, _sender: str) -> None:
        raise ValueError("no")

    def fails_in_thread(_payload: Any, _sender: str) -> None:
        raise ValueError("no")

    async def fine(payload: Any, _sender: str) -> Any:
        return payload

    b.register("fails", fails)
    b.register("fails-in-thread", fails_in_thread)
    b.register("fine", fine)
    for _ in range(3):  # one slot: each call must give it back for the next to run
        with pytest.raises(RemoteError, match="ValueError: no"):
            await a.call(b.name, "fails", None)
        with pytest.raises(RemoteError, match="ValueError: no"):
            await a.call(b.name, "fails-in-thread", None)
        assert await a.call(b.name, "fine", 1) == 1
    assert b.messaging._inflight == {}
    # Calls on the node itself never count against a peer's slots.
    release = asyncio.Event()

    async def held(_payload: Any, _sender: str) -> str:
        await release.wait()
        return "held"

    b.register("held", held)
    local = [asyncio.ensure_future(b.call(b.name, "held", None)) for _ in range(2)]
    assert await a.call(b.name, "fine", 2) == 2
    release.set()
    assert await asyncio.gather(*local) == ["held", "held"]


async def test_a_call_that_gets_no_reply_times_out_with_the_handler_and_node_named(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2)
    call, _ = await hanging_call(a, b, timeout=0.3)
    with pytest.raises(CallTimeout, match=rf"'hang' on {b.name} did not reply within 0.3 s"):
        await asyncio.wait_for(call, DEADLINE)
    assert a.messaging._calls == {}  # nothing left behind


async def test_calls_refused_as_busy_are_logged_at_most_once_a_second(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.messaging")
    a, b = await mesh_of(make_node, 2, max_inflight_per_peer=1)
    release = asyncio.Event()

    async def held(_payload: Any, _sender: str) -> str:
        await release.wait()
        return "held"

    b.register("held", held)
    first = asyncio.ensure_future(a.call(b.name, "held", None))
    await async_wait_until(lambda: b.messaging._inflight, timeout=DEADLINE)
    refused = 0

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refusing a message" in r.msg]

    async def refuse() -> None:
        nonlocal refused
        with pytest.raises(Busy, match=f"{b.name} is busy: too many calls from {a.name}"):
            await a.call(b.name, "held", None)
        refused += 1

    for _ in range(3):
        await refuse()
    assert len(refusals()) == 1 and "; 1 refused so far)" in refusals()[0].getMessage()
    # Refused all along, it is logged again a second later, with the count.
    deadline = time.monotonic() + DEADLINE
    while len(refusals()) < 2:
        assert time.monotonic() < deadline, "an overload that goes on is not logged again"
        await refuse()
        await asyncio.sleep(0.02)  # a steady trickle of refused calls, not a proof
    first_log, second_log = refusals()
    assert 1.0 <= second_log.created - first_log.created < 1.9
    assert f"; {refused} refused so far)" in second_log.getMessage()
    release.set()
    assert await first == "held"


async def test_sends_a_node_makes_to_itself_never_count_against_the_cap(
    make_node: NodeFactory,
) -> None:
    (b,) = await mesh_of(make_node, 1, max_inflight_per_peer=1)
    release = asyncio.Event()
    started: list[int] = []

    async def held(payload: int, _sender: str) -> None:
        started.append(payload)
        await release.wait()

    b.register("held", held)
    for n in range(3):
        await b.send(b.name, "held", n)
    await async_wait_until(lambda: started == [0, 1, 2], timeout=DEADLINE)
    release.set()


async def test_stop_does_not_wait_for_a_blocked_handler_thread_nor_run_queued_ones(
    make_node: NodeFactory,
) -> None:
    a, b = await mesh_of(make_node, 2, handler_threads=1)
    release = threading.Event()
    ran: list[int] = []

    def blocking(payload: int, _sender: str) -> None:
        ran.append(payload)
        release.wait(DEADLINE)

    b.register("blocking", blocking)
    await a.send(b.name, "blocking", 1)
    await a.send(b.name, "blocking", 2)  # queued behind the first: one thread
    await async_wait_until(lambda: ran == [1], timeout=DEADLINE)
    pool = b.messaging._executor
    assert pool is not None
    started = time.monotonic()
    try:
        await b.stop()
    finally:
        release.set()
    # The blocked thread holds the handler for DEADLINE; stop does not wait for it.
    assert time.monotonic() - started < DEADLINE / 2
    await asyncio.to_thread(pool.shutdown, wait=True)  # the pool's work is over after this
    assert ran == [1]


@pytest.mark.parametrize(
    ("value", "type_name", "message"),
    [
        (["ValueError", "boom"], "ValueError", "boom"),
        (("ValueError", "boom"), "ValueError", "boom"),
        (["ValueError"], "RemoteError", "['ValueError']"),
        (["a", "b", "c"], "RemoteError", "['a', 'b', 'c']"),
        (["ValueError", 7], "RemoteError", "['ValueError', 7]"),
        ([7, "boom"], "RemoteError", "[7, 'boom']"),
        (None, "RemoteError", "None"),
    ],
)
def test_a_failed_reply_is_read_as_type_and_message_only_when_it_is_exactly_that(
    value: Any, type_name: str, message: str
) -> None:
    error = RemoteError.from_wire(value)
    assert (error.type_name, error.message) == (type_name, message)
    assert repr(error) == f"RemoteError({message!r})"  # as logs and tracebacks show it
    assert messaging.error_to_wire(error) == [type_name, message]
    assert messaging.error_to_wire(KeyError("k")) == ["KeyError", "'k'"]
