"""Singleton semantics with in-process nodes on loopback (fast; processes are in tests/cluster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from shoal import Node, Peer, Settings
from shoal.discovery import Propose
from shoal.singleton import SingletonContext
from tests.support.procs import async_wait_until

COOKIE = "singleton-test-cookie-3f2e1d0c9b8a7654"


class Gate:
    """Discovery that proposes `peers` every 50 ms, but only once `open` is set."""

    def __init__(self, peers: Iterable[Peer], open_now: bool = True) -> None:
        self.peers = list(peers)
        self.open = asyncio.Event()
        if open_now:
            self.open.set()

    async def run(self, propose: Propose) -> None:
        await self.open.wait()
        while True:
            propose(self.peers)
            await asyncio.sleep(0.05)


class Recorder:
    """A singleton function that records where it runs and how it was stopped."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.starts: list[tuple[str, int]] = []
        self.cancelled: list[str] = []

    def func(self, node_name: str):  # type: ignore[no-untyped-def]
        async def run(ctx: SingletonContext) -> None:
            self.running.add(node_name)
            self.starts.append((node_name, ctx.token))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(node_name)
                raise
            finally:
                self.running.discard(node_name)

        return run


def make_node(host: str, peers: list[Peer], **settings: object) -> tuple[Node, Gate]:
    gate = Gate(peers)
    node = Node(Settings(cookie=COOKIE, host=host, port=4371, topology="static", **settings), gate)  # type: ignore[arg-type]
    return node, gate


@pytest.fixture
async def stopper() -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        await node.stop()


async def reconciled(node: Node, passes: int = 5) -> None:
    """Wait until `node` has re-evaluated its singletons `passes` more times (its periodic
    check runs every 0.1 s): a witness that it had every chance to act, not a fixed sleep."""
    manager = node.singletons
    original = manager._reconcile
    count = 0

    def counting() -> None:
        nonlocal count
        count += 1
        original()

    manager._reconcile = counting  # type: ignore[method-assign]
    try:
        await async_wait_until(lambda: count >= passes, 5.0, message=f"{passes} re-evaluations")
    finally:
        del manager._reconcile


async def test_no_claim_before_the_first_discovery_round(stopper: list[Node]) -> None:
    rec = Recorder()
    node, gate = make_node("127.0.70.2", [])
    gate.open.clear()
    node.add_singleton("s", rec.func(node.name))
    stopper.append(node)
    await node.start()
    await reconciled(node)
    assert rec.running == set() and rec.starts == []
    gate.open.set()
    await async_wait_until(lambda: rec.running == {node.name}, 2.0)


async def test_incumbent_keeps_it_when_a_smaller_node_joins(stopper: list[Node]) -> None:
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.71.2", "127.0.71.3")]
    late, _ = make_node("127.0.71.2", peers)  # the smaller name
    first, _ = make_node("127.0.71.3", peers)
    for node in (first, late):
        node.add_singleton("s", rec.func(node.name))
        stopper.append(node)
    await first.start()
    await async_wait_until(lambda: rec.running == {first.name}, 2.0)
    await late.start()
    await async_wait_until(lambda: late.nodes() == [first.name], 2.0)
    await async_wait_until(lambda: late.singletons.holders()["s"] == first.name, 2.0)
    await reconciled(late)
    await reconciled(first)
    assert rec.running == {first.name}
    assert rec.starts == [(first.name, 1)]


async def test_graceful_stop_hands_over_at_once(stopper: list[Node]) -> None:
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.72.2", "127.0.72.3", "127.0.72.4")]
    nodes = [make_node(p.host, peers)[0] for p in peers]
    for node in nodes:
        node.add_singleton("s", rec.func(node.name))
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    await holder.stop()
    assert rec.cancelled == [holder_name]
    await async_wait_until(lambda: len(rec.running) == 1 and holder_name not in rec.running, 0.5)


async def test_a_service_object_is_started_and_stopped(stopper: list[Node]) -> None:
    events: list[str] = []

    class Service:
        async def start(self) -> None:
            events.append("start")

        async def stop(self) -> None:
            events.append("stop")

    node, _ = make_node("127.0.73.2", [])
    node.add_singleton("svc", Service())
    await node.start()
    await async_wait_until(lambda: events == ["start"], 2.0)
    await node.stop()
    assert events == ["start", "stop"]


async def test_after_a_partition_heals_the_older_claim_survives(stopper: list[Node]) -> None:
    rec = Recorder()
    a_peer, b_peer = (Peer("hi", h, 4371) for h in ("127.0.74.2", "127.0.74.3"))
    a, gate_a = make_node(a_peer.host, [])
    b, _ = make_node(b_peer.host, [])
    for node in (a, b):
        node.add_singleton("s", rec.func(node.name))
        stopper.append(node)
    await b.start()  # b claims first (alone), then a claims (alone): two holders
    await async_wait_until(lambda: rec.running == {b.name}, 2.0)
    await a.start()
    await async_wait_until(lambda: rec.running == {a.name, b.name}, 2.0)
    gate_a.peers = [b_peer]  # the partition heals
    await async_wait_until(lambda: rec.running == {b.name}, 2.0)
    assert rec.cancelled == [a.name]
    assert a.singletons.holders()["s"] == b.name == b.singletons.holders()["s"]


async def test_unknown_mode_and_duplicate_names_are_refused() -> None:
    node, _ = make_node("127.0.75.2", [])
    node.add_singleton("s", Recorder().func("x"))
    with pytest.raises(ValueError, match="already registered"):
        node.add_singleton("s", Recorder().func("x"))
    with pytest.raises(ValueError, match="unknown singleton mode"):
        node.add_singleton("t", Recorder().func("x"), mode="raft")
    with pytest.raises(ValueError, match="SHOAL_LEASE_DSN"):
        node.add_singleton("u", Recorder().func("x"), mode="lease")


async def test_a_singleton_that_raises_is_logged_and_started_again(
    stopper: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    starts: list[float] = []

    async def flaky(ctx: SingletonContext) -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) == 1:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    node, _ = make_node("127.0.77.2", [])
    node.add_singleton("flaky", flaky)
    stopper.append(node)
    await node.start()
    await async_wait_until(lambda: len(starts) == 2, 3.0)
    assert starts[1] - starts[0] >= 0.9  # a pause, not a crash loop
    assert "singleton flaky failed" in caplog.text and "RuntimeError: boom" in caplog.text
    assert node.singletons.holders()["flaky"] == node.name


async def test_quorum_holder_that_hears_nobody_steps_down_once_and_stays_down(
    stopper: list[Node],
) -> None:
    """The holder stops hearing its peers (its reading is paused: a one-way cut). It must
    step down before its failure detector drops them, and not claim again meanwhile."""
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.78.2", "127.0.78.3", "127.0.78.4")]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 0.6, "expected_nodes": 3}
    made = [make_node(p.host, peers, **timing) for p in peers]
    nodes = [node for node, _ in made]
    for node in nodes:
        node.add_singleton("s", rec.func(node.name), mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    for _, gate in made:
        gate.peers = []  # no redial after the cut: the connections stay down
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    assert holder.mesh is not None
    for conn in holder.mesh.connections.values():
        assert conn.transport is not None
        conn.transport.pause_reading()
    await async_wait_until(lambda: holder_name not in rec.running, 2.0)
    await async_wait_until(lambda: holder.nodes() == [], 2.0)  # its detector drops them
    await reconciled(holder, 3)  # a few of the 0.1 s re-checks: it must stay down
    assert [name for name, _ in rec.starts].count(holder_name) == 1, rec.starts


async def test_quorum_is_valid_lapses_during_a_stall_and_confirm_asks_again(
    stopper: list[Node],
) -> None:
    """After the loop was blocked longer than the confirmation window, `is_valid()` is
    False at once (no stale view) and a majority must confirm a holder again."""
    contexts: dict[str, SingletonContext] = {}

    def func(name: str):  # type: ignore[no-untyped-def]
        async def run(ctx: SingletonContext) -> None:
            contexts[name] = ctx
            await asyncio.Event().wait()

        return run

    peers = [Peer("hi", h, 4371) for h in ("127.0.79.2", "127.0.79.3", "127.0.79.4")]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 0.5, "expected_nodes": 3}
    nodes = [make_node(p.host, peers, **timing)[0] for p in peers]
    for node in nodes:
        node.add_singleton("s", func(node.name), mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(contexts) == 1, 5.0)
    (ctx,) = contexts.values()
    await async_wait_until(ctx.is_valid, 1.0)
    window = nodes[0].singletons.window
    time.sleep(window + 0.1)  # noqa: ASYNC251 (the fault under test: a blocked loop)
    assert not ctx.is_valid()
    # Its peers were not heard within the window either, so it may step down;
    # either way a majority soon confirms one holder (maybe the same node) again.
    await ctx.confirm()

    def valid() -> list[str]:
        return [name for name, c in contexts.items() if c.is_valid()]

    await async_wait_until(lambda: len(valid()) == 1, 8.0)


async def test_an_even_quorum_split_runs_it_on_neither_side(stopper: list[Node]) -> None:
    """Four expected nodes split 2 against 2: two of four is no strict majority, so neither
    side runs the quorum singleton, nor even asks for promises; once the halves meet,
    exactly one node runs it."""
    rec, marker = Recorder(), Recorder()
    hosts = ("127.0.79.2", "127.0.79.3", "127.0.79.4", "127.0.79.5")
    everyone = [Peer("hi", h, 4371) for h in hosts]
    halves = [everyone[:2], everyone[2:]]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 0.4, "expected_nodes": 4}
    made = [make_node(p.host, half, **timing) for half in halves for p in half]
    nodes = [node for node, _ in made]
    for node in nodes:
        # Reconciled in registration order: when a mesh-mode singleton has started on
        # both halves, the quorum one has been decided in the same pass, or before.
        node.add_singleton("q", rec.func(node.name), mode="quorum")
        node.add_singleton("m", marker.func(node.name), mode="mesh")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: marker.running == {nodes[0].name, nodes[2].name}, 3.0)
    # Acceptors answer nothing for a window after they start: wait that out, then let
    # every node re-evaluate, so that a side that thought 2 of 4 enough would have claimed.
    acceptors = [node.singletons.acceptor for node in nodes]
    await async_wait_until(
        lambda: all(time.monotonic() - a.started >= a.window for a in acceptors), 3.0
    )
    await asyncio.gather(*(reconciled(node) for node in nodes))
    assert rec.running == set() and rec.starts == []
    assert [a.promised for a in acceptors] == [{}] * 4, "a 2-of-4 side asked for promises"
    for _, gate in made:
        gate.peers = everyone  # the halves meet
    await async_wait_until(lambda: len(rec.running) == 1, 5.0)
    assert len(rec.starts) == 1, rec.starts


async def test_a_quorum_holder_steps_down_before_its_failure_detector_fires(
    stopper: list[Node],
) -> None:
    """A majority counts only peers heard from within a heartbeat less than the failure
    timeout, so a holder whose peers went silent stops while it still lists them as
    connected (and so before the majority side can declare it down and take over)."""
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.80.2", "127.0.80.3", "127.0.80.4")]
    timing = {"heartbeat_interval": 0.2, "failure_timeout": 1.2, "expected_nodes": 3}
    made = [make_node(p.host, peers, **timing) for p in peers]
    nodes = [node for node, _ in made]
    connected_at_step_down: list[list[str]] = []
    for node in nodes:
        stop_watch = rec.func(node.name)

        async def run(ctx: SingletonContext, node: Node = node, inner=stop_watch) -> None:  # type: ignore[no-untyped-def]
            try:
                await inner(ctx)
            finally:
                connected_at_step_down.append(node.nodes())

        node.add_singleton("s", run, mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    for _, gate in made:
        gate.peers = []
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    assert holder.mesh is not None
    for conn in holder.mesh.connections.values():
        assert conn.transport is not None
        conn.transport.pause_reading()
    await async_wait_until(lambda: connected_at_step_down != [], 5.0)
    assert len(connected_at_step_down[0]) == 2, connected_at_step_down


async def test_validity_holder_flag_and_snapshot_follow_the_claim(stopper: list[Node]) -> None:
    """What a running task and `/cluster` see: `ctx.is_valid()` is true while this node holds
    it and false once it let go; `is_holder` and `snapshot()` name the holder, mode, token."""
    contexts: list[SingletonContext] = []

    async def keep(ctx: SingletonContext) -> None:
        contexts.append(ctx)
        await asyncio.Event().wait()

    peers = [Peer("hi", h, 4371) for h in ("127.0.81.2", "127.0.81.3")]
    a, _ = make_node(peers[0].host, peers)
    b, _ = make_node(peers[1].host, peers)
    for node in (a, b):
        node.add_singleton("s", keep)
        stopper.append(node)
    a.add_singleton("only-a", Recorder().func(a.name))
    await a.start()
    await async_wait_until(lambda: len(contexts) == 1, 2.0)
    await b.start()
    await async_wait_until(lambda: b.singletons.holders().get("s") == a.name, 2.0)
    await async_wait_until(lambda: b.singletons.holders().get("only-a") == a.name, 2.0)
    assert contexts[0].is_valid() and contexts[0].token == 1 and contexts[0].mode == "mesh"
    assert a.singletons.is_holder("s") and not b.singletons.is_holder("s")
    expected = {"s": {"holder": a.name, "mode": "mesh", "token": 1}}
    assert {k: v for k, v in a.singletons.snapshot().items() if k == "s"} == expected
    assert b.singletons.snapshot()["s"]["holder"] == a.name
    # A singleton registered only on a: b names its holder, but knows no mode or token.
    assert b.singletons.snapshot()["only-a"] == {"holder": a.name, "mode": None, "token": None}
    assert b.singletons.starts("only-a") == 0 and a.singletons.starts("only-a") == 1
    await a.stop()
    assert not contexts[0].is_valid()
    await async_wait_until(lambda: len(contexts) == 2, 2.0)  # b took over
    assert contexts[1].is_valid() and b.singletons.is_holder("s")
    assert b.singletons.snapshot()["s"] == {"holder": b.name, "mode": "mesh", "token": 1}


async def test_mesh_is_valid_lapses_after_a_stall_until_confirm_has_heard_the_peers_again(
    stopper: list[Node],
) -> None:
    """Mesh mode: right after its loop was blocked, a holder's `is_valid()` is False (its
    view may be stale); `confirm()` waits until it has heard its peers again, then says it
    still holds, and `is_valid()` is True again."""
    contexts: list[SingletonContext] = []

    async def keep(ctx: SingletonContext) -> None:
        contexts.append(ctx)
        await asyncio.Event().wait()

    peers = [Peer("hi", h, 4371) for h in ("127.0.90.2", "127.0.90.3")]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 3.0}
    a, _ = make_node(peers[0].host, peers, **timing)
    b, _ = make_node(peers[1].host, peers, **timing)
    for node in (a, b):
        node.add_singleton("s", keep)
        stopper.append(node)
    await a.start()
    await async_wait_until(lambda: len(contexts) == 1, 2.0)
    await b.start()
    await async_wait_until(lambda: b.singletons.holders().get("s") == a.name, 2.0)
    ctx = contexts[0]
    assert ctx.is_valid()
    time.sleep(0.8)  # noqa: ASYNC251 (the fault under test: a blocked loop)
    blocked_until = time.monotonic()
    assert not ctx.is_valid()
    assert await ctx.confirm() is True
    assert a.mesh is not None
    heard = a.mesh.connections[b.name].last_received
    # A heartbeat sent after the stall (those sent before it were buffered meanwhile), and
    # soon: not only once the failure timeout bounds the wait.
    assert 0.1 < heard - blocked_until, "confirmed before hearing the peer again"
    assert time.monotonic() - blocked_until < 1.5
    assert ctx.is_valid() and a.singletons.is_holder("s")
    assert await a.singletons.confirm("s") is True
    # Without a confirm, the node revalidates on its own after each stall.
    for _ in range(2):
        time.sleep(0.6)  # noqa: ASYNC251
        assert not ctx.is_valid()
        await async_wait_until(ctx.is_valid, 2.0, message="revalidated in the background")
    assert len(contexts) == 1  # b never took over


async def test_mesh_confirm_after_a_stall_waits_for_lost_peers_until_the_failure_timeout(
    stopper: list[Node],
) -> None:
    """A peer lost during the stall may come back with news (it may have taken over): the
    holder's `confirm()` waits for it, bounded by the failure timeout, then answers."""
    contexts: list[SingletonContext] = []

    async def keep(ctx: SingletonContext) -> None:
        contexts.append(ctx)
        await asyncio.Event().wait()

    peers = [Peer("hi", h, 4371) for h in ("127.0.92.2", "127.0.92.3")]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 0.5}
    (a, gate_a), (b, gate_b) = (make_node(p.host, peers, **timing) for p in peers)
    a.add_singleton("s", keep)
    stopper.extend([a, b])
    await a.start()
    await b.start()
    await async_wait_until(lambda: a.nodes() == [b.name] and len(contexts) == 1, 2.0)
    gate_a.peers = gate_b.peers = []  # the lost peer stays away
    time.sleep(0.8)  # noqa: ASYNC251 (a blocked loop, longer than the failure timeout)
    blocked_until = time.monotonic()
    assert await contexts[0].confirm() is True  # still the holder: nobody else runs it
    waited = time.monotonic() - blocked_until
    assert a.nodes() == []
    assert 0.4 < waited < 2.0, waited
