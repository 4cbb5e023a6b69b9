"""What a newcomer gets wrong in the API fails where it is written, naming the fix,
instead of leaving nothing registered or failing on the first message."""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from typing import Any

import pytest

import shoal
from shoal import (
    InvalidJob,
    MembershipEvent,
    Node,
    NodeDown,
    Settings,
    SingletonContext,
    Subscription,
    wire,
)
from shoal.singleton import SCHEDULER_LEADER, STATE_HANDLER
from tests.mesh.conftest import COOKIE, NodeFactory, peer_of
from tests.support.procs import async_wait_until


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


async def test_a_handler_or_singleton_that_cannot_be_called_is_refused_when_registered(
    make_node: NodeFactory,
) -> None:
    node: Node = await make_node()

    async def greet(payload: Any) -> str:  # forgot the sender
        return f"hi {payload}"

    async def no_ctx() -> None:
        pass

    async def with_ctx(_ctx: SingletonContext) -> None:
        pass

    # Without the check, these registered: a handler then failed every call with a
    # RemoteError (the TypeError logged on the receiver), a singleton in its task.
    with pytest.raises(ValueError, match=r"handler 'greet' must take \(payload, sender\)"):
        node.register("greet", greet)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"handler 'hello' must be a function .* got 'hello'"):
        node.register("hello", "hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"singleton 'leader' must take \(ctx\), or be a Service"):
        node.add_singleton("leader", no_ctx)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"singleton 'cache' must be a function .* got None"):
        node.add_singleton("cache", None)  # type: ignore[arg-type]
    # A name too long for the state message ended the singletons' checker at its first
    # broadcast: no singleton, nor the cron leader, ever ran again.
    with pytest.raises(ValueError, match=r"a singleton's name is a string of 1-200 .*: 600000"):
        node.add_singleton("x" * 600_000, with_ctx)
    with pytest.raises(ValueError, match=r"a handler's name is a non-empty string, got 7"):
        node.register(7, lambda payload, sender: payload)  # type: ignore[arg-type]

    # What a handler may be: a function, a lambda, a callable object, with extra defaults.
    class Echo:
        def __call__(self, payload: Any, sender: str, *, loud: bool = False) -> Any:
            return payload

    node.register("echo", Echo())
    node.register("twice", lambda payload, _sender: payload * 2)
    assert await node.call(node.name, "echo", 3) == 3
    assert await node.call(node.name, "twice", 3) == 6

    # A decorator that supplies an argument (functools.wraps copies the inner function's
    # signature as __wrapped__): what is called is the wrapper, so it is what is checked.
    # Before, the inner signature was checked and the handler refused.
    def with_db(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(payload: Any, sender: str) -> Any:
            return await fn(payload, sender, {"db": 1})

        return wrapper

    @with_db
    async def lookup(payload: Any, _sender: str, db: dict[str, int]) -> Any:
        return db[payload]

    node.register("lookup", lookup)
    assert await node.call(node.name, "lookup", "db") == 1
    with pytest.raises(ValueError, match=r"handler 'bad' must take \(payload, sender\)"):
        node.register("bad", functools.wraps(greet)(lambda payload: payload))


async def test_a_handler_or_topic_name_that_is_not_a_str_fails_at_the_sender(
    make_node: NodeFactory,
) -> None:
    a = await make_node()
    b = await make_node(peers=[peer_of(a)])
    await a.wait_for_nodes(1, timeout=10)
    downs: list[MembershipEvent] = []
    a.add_listener(lambda event: downs.append(event) if event.kind == "down" else None)

    # Without the check, the frame went out and the peer dropped the connection for a
    # malformed message: one wrong argument took the node off the mesh.
    with pytest.raises(ValueError, match=r"the handler name must be a str, got int 7"):
        await a.send(b.name, 7, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the handler name must be a str, got int 7"):
        await a.call(b.name, 7, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the topic name must be a str, got bytes b'orders'"):
        await a.publish(b"orders", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the topic name must be a str"):
        a.subscribe(("orders",))  # type: ignore[arg-type]
    assert await a.call(b.name, "shoal.ping", None, timeout=5) == "pong"
    assert downs == [] and a.nodes() == [b.name]


async def test_singletons_too_many_for_one_state_message_are_refused_and_the_rest_run(
    make_node: NodeFactory,
) -> None:
    a = await make_node(max_frame_size=64 * 1024)
    b = await make_node(peers=[peer_of(a)], max_frame_size=64 * 1024)
    await a.wait_for_nodes(1, timeout=10)

    async def hold(_ctx: SingletonContext) -> None:
        await asyncio.Event().wait()

    # Every name travels in each state message: without the check, the name that made it
    # outgrow a frame stayed registered and every broadcast failed with MessageTooLarge.
    names: list[str] = []
    with pytest.raises(
        ValueError, match=r"too many singletons: .* \(SHOAL_MAX_FRAME_BYTES=65536\)"
    ) as refused:
        for i in range(1000):
            name = f"{i:03d}" + "x" * 197
            a.add_singleton(name, hold, mode="mesh")
            names.append(name)
    assert 20 <= len(names) < 1000 and name not in a.singletons.holders()
    assert f"with {name!r}, their " in str(refused.value)  # the name refused
    with pytest.raises(ValueError, match=r"too many singletons"):  # short ones fill the rest
        for i in range(1000):
            a.add_singleton(f"s{i}", hold, mode="mesh")
            names.append(f"s{i}")
    # The state still goes out: b learns every one of them, held by a.
    await async_wait_until(
        lambda: all(b.singletons.holders().get(n) == a.name for n in names),
        timeout=10,
        message=f"b sees a holding all {len(names)} singletons",
    )
    # What the check counted on is the real state message at its largest: each name
    # (the cron leader's too: a started node registered it) held, claimed and promised
    # the largest ballot.
    await a.stop()  # its state is forged below, not to be acted on
    singletons = a.singletons
    assert SCHEDULER_LEADER in singletons._items
    longest = "n" * 300 + "@" + "h" * 19  # the longest node name a peer may have
    for n, item in singletons._items.items():
        item.holding, item.claiming, item.claimed_at = True, True, 1e9
        singletons.acceptor.promised[n] = (2**64 - 1, longest)
    frame = [wire.SEND, STATE_HANDLER, singletons._local_state()]
    assert len(wire.encode_frame(frame)) <= 64 * 1024 + 4  # the frame limit and its header


async def test_singletons_up_to_the_limit_before_start_leave_room_for_the_cron_leader() -> None:
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", topology="static", max_frame_size=65536))

    async def hold(_ctx: SingletonContext) -> None:
        await asyncio.Event().wait()

    for length in (200, 3):  # long names, then short ones to fill what is left
        with pytest.raises(ValueError, match=r"too many singletons"):
            for i in range(1000):
                node.add_singleton(f"{i:03d}".ljust(length, "x"), hold, mode="mesh")
    # The cron leader's singleton, registered with the jobs (here, or when the node starts).
    assert node.jobs.leader is None and SCHEDULER_LEADER in node.singletons._items
    await node.stop()


async def test_connect_says_what_is_wrong_with_its_target_or_the_node(
    make_node: NodeFactory,
) -> None:
    unstarted = Node(Settings(cookie=COOKIE, host="127.0.0.1", topology="static"))
    # Before: an AssertionError without a message, or a ValueError about unpacking.
    with pytest.raises(NodeDown, match="the node is not started"):
        await unstarted.connect("127.0.0.2")
    await unstarted.stop()
    a = await make_node()
    for target in ("", "app@10.0.0.2,app@10.0.0.3"):
        with pytest.raises(ValueError, match=r"connect\(\) takes one `name@host`"):
            await a.connect(target)


async def test_a_subscription_left_with_break_stops_buffering(make_node: NodeFactory) -> None:
    node: Node = await make_node()

    async def first_order() -> Any:
        async for payload in node.subscribe("orders"):  # not closed: no `with`
            return payload

    waiting = asyncio.ensure_future(first_order())
    await async_wait_until(lambda: "orders" in node.messaging._topics, timeout=5)
    await node.publish("orders", 1)
    assert await waiting == 1

    # Before, the dropped subscription stayed registered and kept the next 10,000
    # payloads (up to SHOAL_MAX_FRAME_BYTES each) for a reader that was gone.
    def buffered() -> int:
        gc.collect()
        subscribers = node.messaging._topics.get("orders", ())
        return sum(s._queue.qsize() for s in subscribers)

    for n in range(50):
        await node.publish("orders", n)
    await async_wait_until(lambda: buffered() == 0, timeout=5, message="nothing buffered")

    # A subscription the app holds keeps receiving.
    with node.subscribe("orders") as held:
        gc.collect()
        await node.publish("orders", "kept")
        assert await asyncio.wait_for(held.get(), 5) == ("kept", node.name)


async def test_hooks_that_cannot_be_called_are_refused_when_added() -> None:
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", topology="static"))
    # Before: accepted, then a TypeError logged at every membership event, or at the stop.
    with pytest.raises(ValueError, match=r"a membership listener must take \(event\)"):
        node.add_listener(lambda: None)  # type: ignore[arg-type,misc]
    with pytest.raises(ValueError, match=r"an on_stop hook must be a function .* got 'flush'"):
        node.on_stop("flush")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"an on_stop hook must take no argument"):
        node.on_stop(lambda node: None)
    node.on_stop(lambda: None)
    node.add_listener(print)
    await node.stop()


def test_run_given_a_function_instead_of_a_coroutine_says_to_call_it() -> None:
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", topology="static"))

    async def main() -> None:
        pass

    # Before: the node started, then "'function' object has no attribute 'close'".
    with pytest.raises(
        TypeError, match=r"coroutine as app, got <function .*: shoal.run\(node, main\(\)\)"
    ):
        shoal.run(node, main)  # type: ignore[call-overload]
    assert node.mesh is None and not node.listening
    with pytest.raises(
        TypeError, match=r"coroutine as main, got <function .*: shoal.run\(main\(\)\)"
    ):
        shoal.run(main)  # type: ignore[call-overload]


async def test_topics_whose_subscriptions_were_all_dropped_are_forgotten(
    make_node: NodeFactory,
) -> None:
    node: Node = await make_node()

    async def reply(n: int) -> Any:
        subscription = node.subscribe(f"reply-{n}")
        await node.publish(f"reply-{n}", n)
        async for payload in subscription:  # not closed: no `with`
            return payload

    # One topic per request, each left with break: before, each left an empty entry in
    # the node's topics for good.
    for n in range(400):
        assert await reply(n) == n
        await asyncio.sleep(0)  # the loop closes the iterator left with break (aclose)
    gc.collect()
    with node.subscribe("held") as held:
        assert len(node.messaging._topics) < 200
        await node.publish("held", "kept")
        assert await asyncio.wait_for(held.get(), 5) == ("kept", node.name)


async def test_a_subscription_waited_on_by_a_task_nobody_holds_keeps_receiving(
    make_node: NodeFactory,
) -> None:
    """A listener started as a fire-and-forget task, as many apps start one: while it
    waits for the next message, the node must hold its subscription (and so its task)."""
    node: Node = await make_node()
    received: list[Any] = []

    async def listen() -> None:
        async for payload in node.subscribe("orders"):
            received.append(payload)

    # Not held here on purpose (the loop holds tasks only weakly): what the app does.
    task = weakref.ref(asyncio.ensure_future(listen()))
    await async_wait_until(lambda: "orders" in node.messaging._topics, timeout=5)
    for n in range(3):
        gc.collect()  # before, the waiting task and its subscription were collected here
        await node.publish("orders", n)
        await async_wait_until(
            lambda n=n: len(received) == n + 1, timeout=5, message=f"payload {n} received"
        )
    assert received == [0, 1, 2]
    listener = task()
    assert listener is not None
    listener.cancel()


async def test_a_subscription_is_held_while_any_task_waits_on_it_and_released_after(
    make_node: NodeFactory,
) -> None:
    """Several forgotten tasks waiting on one subscription: the node holds it until the
    last of them is done waiting, and not a moment longer (else it holds it for good)."""
    node: Node = await make_node()
    received: list[Any] = []

    async def take_one(subscription: Subscription) -> None:
        received.append((await subscription.get())[0])

    subscription = node.subscribe("orders")
    released = weakref.ref(subscription)
    for _ in range(3):
        asyncio.ensure_future(take_one(subscription))  # noqa: RUF006 (not held, on purpose)
    del subscription
    await asyncio.sleep(0)  # they start waiting
    for n in range(3):
        gc.collect()  # a task still waiting keeps the subscription, and so itself, alive
        await node.publish("orders", n)
        await async_wait_until(
            lambda n=n: len(received) == n + 1, timeout=5, message=f"payload {n} received"
        )
    assert sorted(received) == [0, 1, 2]
    await asyncio.sleep(0)  # the last task ends
    gc.collect()
    assert released() is None, "the subscription is still held after its waiters are done"


async def test_a_state_message_with_other_nodes_ballots_that_outgrows_a_frame_still_goes_out(
    make_node: NodeFactory,
) -> None:
    """Quorum mode: a node's state message carries the ballots its acceptor promised, also
    for names only other nodes register, which its registration check cannot count."""
    settings: dict[str, Any] = {
        "max_frame_size": 64 * 1024,
        "singleton_mode": "quorum",
        "expected_nodes": 4,
    }
    first = await make_node(**settings)
    nodes = [first, *[await make_node(peers=[peer_of(first)], **settings) for _ in range(3)]]
    for node in nodes:
        await node.wait_for_nodes(3, timeout=10)

    async def hold(_ctx: SingletonContext) -> None:
        await asyncio.Event().wait()

    def register_all(node: Node, prefix: str) -> list[str]:
        names: list[str] = []
        with pytest.raises(ValueError, match=r"too many singletons"):
            for i in range(1000):
                names.append(f"{prefix}{i:03d}" + "x" * 196)
                node.add_singleton(names[-1], hold)
        return names[:-1]

    # Each node registers as many names as fit its own state, each under other names;
    # every acceptor promises them all. Before, the state outgrew a frame: each node's
    # checker ended with MessageTooLarge, and peers stopped learning what it held.
    names = {node.name: register_all(node, "abcd"[i]) for i, node in enumerate(nodes)}

    def settled() -> bool:
        for node in nodes:
            assert node.singletons._checker is not None
            assert not node.singletons._checker.done(), node.singletons._checker
        return all(
            seen.singletons.holders().get(name) == holder
            for holder in names
            for seen in nodes
            for name in names[holder]
        )

    await async_wait_until(settled, timeout=30, message="all see who holds every singleton")


async def test_singletons_registered_before_start_leave_room_for_the_cron_leader(
    hosts: Any,
) -> None:
    from tests.mesh.conftest import Proposals, settings_for

    node = Node(settings_for(hosts(), max_frame_size=64 * 1024), Proposals())

    async def hold(_ctx: SingletonContext) -> None:
        await asyncio.Event().wait()

    # As many as fit, long names then short ones: the last bytes of the state message.
    for width in (200, 16):
        with pytest.raises(ValueError, match=r"too many singletons"):
            for i in range(1000):
                node.add_singleton(f"{width}-{i:03d}".ljust(width, "x"), hold)
    try:
        # Before, the start failed, naming 'shoal.scheduler', a singleton the app never
        # registered: the cron leader's, added at start, after the app's.
        await node.start()
        assert "shoal.scheduler" in node.singletons.holders()
    finally:
        await node.stop()
