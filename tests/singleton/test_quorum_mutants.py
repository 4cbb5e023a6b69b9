"""Quorum-mode guarantees that a mutation run found untested, with in-process nodes.

Each test names the deliberate bug (mutant) it was written to catch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shoal import Node, Peer
from shoal.singleton import PREPARE_HANDLER, STATE_HANDLER, SingletonContext
from tests.singleton.test_quorum_mode import FAST, answered, three
from tests.singleton.test_singletons import Recorder, make_node, reconciled, stopper
from tests.support.procs import async_wait_until

__all__ = ["stopper"]  # the fixture, imported for the tests here


def refuse_confirmations(node: Node) -> None:
    """`node`'s acceptor answers "acceptor just started", as a restarted one does, for a
    minute: it stays connected and heartbeats, but confirms and promises nothing."""
    node.singletons.acceptor.started = time.monotonic() + 60


async def test_a_holder_without_confirmations_stops_a_drain_bound_before_they_lapse(
    stopper: list[Node],
) -> None:
    """A holder whose peers stay connected but no longer confirm: `confirm()` answers within
    the per-peer call bound (1 s) although a peer does not answer; the holder keeps its task
    until a drain bound and one check (1.1 s) before its last confirmation lapses, and has
    stopped it by the lapse (when a successor may start), so the task never sees
    `ctx.is_valid()` False while it runs.

    Mutants: the step-down compared with `confirmed_until + margin` (the task ran past the
    lapse); the margin taken from `drain_timeout` (10 s) instead of the quorum drain bound
    (1 s), so the holder stepped down 1.9 s early; a per-peer call bound of 2 s."""
    # Confirmation window 4 s (failure timeout - one heartbeat): wide enough that the
    # bounds differ (the margin is at most half of window - heartbeat = 1.9 s).
    nodes, _ = three("127.0.131", heartbeat_interval=0.2, failure_timeout=4.2)
    seen: list[tuple[str, float, bool]] = []  # (node, monotonic, ctx.is_valid()) while running
    stopped: list[tuple[str, float]] = []
    for node in nodes:

        async def run(ctx: SingletonContext, name: str = node.name) -> None:
            try:
                while True:
                    seen.append((name, time.monotonic(), ctx.is_valid()))
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                stopped.append((name, time.monotonic()))
                raise

        node.add_singleton("s", run, mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    # The acceptors answer a window (4 s) after they start.
    await async_wait_until(lambda: seen, 8.0, message="a holder")
    holder = next(n for n in nodes if n.name == seen[0][0])
    await async_wait_until(lambda: seen[-1][2], 2.0, message="a confirmed context")
    refusing, silent = (n for n in nodes if n is not holder)

    # One peer refuses, the other does not read what the holder sends (it still heartbeats).
    refuse_confirmations(refusing)
    assert silent.mesh is not None
    transport = silent.mesh.connections[holder.name].transport
    assert transport is not None
    transport.pause_reading()
    asked = time.monotonic()
    assert await holder.singletons.confirm("s") is False
    took = time.monotonic() - asked
    transport.resume_reading()
    refuse_confirmations(silent)
    assert took < 1.6, f"confirm() took {took:.2f} s with one peer silent (bound 1 s per peer)"

    # No confirmation comes any more: the holder steps down on its own, before the lapse.
    item = holder.singletons._items["s"]
    until = item.confirmed_until  # the end of its last confirmation's window (no renewal since)
    assert until > time.monotonic()
    await async_wait_until(lambda: stopped, 6.0, message="the holder stops its task")
    (name, at), *_ = stopped
    assert name == holder.name and not item.holding
    print(f"confirm() with a silent peer: {took:.2f} s; stopped {until - at:.2f} s before lapse")
    assert at < until, f"stopped {at - until:.2f} s after its confirmation lapsed"
    assert at >= until - 1.1 - 0.01, f"stopped {until - at:.2f} s before the lapse (1.1 s due)"
    assert all(valid for _, _, valid in seen), "the task ran on with an invalid context"


async def test_a_draining_node_is_passed_over_while_it_still_drains(
    stopper: list[Node],
) -> None:
    """A node that stops gracefully hands a quorum singleton over as soon as it has stopped
    that task, while it still drains another (slow) one: the others do not wait for it as
    their candidate (it said it drains). Mutant: peers never read the draining flag."""
    rec = Recorder()
    nodes, _ = three("127.0.132", drain_timeout=5.0)  # mesh drain bound: 5 s
    drain_began: list[str] = []
    drained = asyncio.Event()
    for node in nodes:

        async def slow(ctx: SingletonContext, name: str = node.name) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                drain_began.append(name)
                await drained.wait()  # a long clean-up, within the drain bound
                raise

        node.add_singleton("q", rec.func(node.name), mode="quorum")
        node.add_singleton("slow", slow, mode="mesh")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    await async_wait_until(lambda: holder.singletons.is_holder("slow"), 2.0)
    others = [n for n in nodes if n is not holder]
    await asyncio.gather(*(reconciled(n, 2) for n in others))  # they know what it holds

    stopping = asyncio.create_task(holder.stop())
    try:
        await async_wait_until(lambda: drain_began == [holder_name], 2.0)
        await async_wait_until(
            lambda: len(rec.running) == 1 and holder_name not in rec.running,
            3.0,
            message="a handover while the old holder still drains",
        )
        assert not stopping.done() and all(holder_name in n.nodes() for n in others)
    finally:
        drained.set()
        await stopping


async def test_a_malformed_ballot_in_a_peer_state_spoils_only_itself(
    stopper: list[Node],
) -> None:
    """A state message's ballots are checked one by one: a malformed entry is skipped and
    the well-formed ones after it are still learnt (b never promises below them). Mutant:
    the check `isinstance(name, str) and ballot is not None` with `or` (the handler then
    fails on the first malformed entry and drops the rest)."""
    peers = [Peer("hi", h, 4371) for h in ("127.0.133.2", "127.0.133.3")]
    a, _ = make_node(peers[0].host, peers, **FAST)
    b, _ = make_node(peers[1].host, peers, **FAST)
    stopper.extend([a, b])
    await a.start()
    await b.start()
    await async_wait_until(lambda: a.nodes() == [b.name] and b.nodes() == [a.name], 2.0)
    state = {"held": {}, "registered": [], "ballots": {"z": "bad", "y": [1], "q": [7, a.name]}}
    a.messaging.send_to_peers(STATE_HANDLER, state, [b.name])
    low = await answered(a, b.name, PREPARE_HANDLER, {"name": "q", "ballot": [6, a.name]})
    assert low["ok"] is False and low["promised"] == [7, a.name]


async def test_the_younger_claim_names_the_older_holder_when_it_steps_down(
    stopper: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    """After a partition heals, the younger holder's log says which node holds the older
    claim (an operator reads it to see where the singleton went). Mutant: it named itself."""
    caplog.set_level(logging.INFO, "shoal.singleton")
    rec = Recorder()
    a_peer, b_peer = (Peer("hi", h, 4371) for h in ("127.0.134.2", "127.0.134.3"))
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
    assert f"singleton s: stopping on {a.name} ({b.name} holds an older claim)" in caplog.text


async def test_without_expected_nodes_the_majority_is_of_the_largest_membership_seen(
    stopper: list[Node],
) -> None:
    """With SHOAL_EXPECTED_NODES unset, the cluster size is the largest membership seen:
    three nodes run it once; when the two others leave, the holder (1 of 3) steps down
    and claims nothing. Mutant: the size was not recorded on a node-up."""
    rec = Recorder()
    peers = [Peer("hi", f"127.0.135.{i}", 4371) for i in (2, 3, 4)]
    # Not FAST: its holder, renewing every 0.1 s, may step down on a loaded machine's lag.
    slower = {"heartbeat_interval": 0.2, "failure_timeout": 1.2}
    nodes = [make_node(p.host, peers, **slower)[0] for p in peers]
    for node in nodes:
        node.add_singleton("s", rec.func(node.name), mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 4.0)
    await async_wait_until(lambda: all(len(n.nodes()) == 2 for n in nodes), 2.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    others = [n for n in nodes if n is not holder]
    await others[0].stop()
    await reconciled(holder, 3)
    assert rec.running == {holder_name}  # 2 of 3 are a majority
    await others[1].stop()
    await async_wait_until(lambda: rec.running == set(), 3.0, message="the holder steps down")
    await reconciled(holder, 5)
    assert rec.running == set() and len(rec.starts) == 1, rec.starts


async def test_a_graceful_stop_hands_a_quorum_singleton_over_without_waiting_out_its_window(
    stopper: list[Node],
) -> None:
    """The holder said it stopped, so no acceptor (its own included) makes the successor
    wait out its last confirmation: the handover takes round trips, not the window (2.5 s
    here, the default). It did wait whenever the stopping holder's own acceptor was among
    the first majority to answer (2.1-2.6 s measured)."""
    rec = Recorder()
    nodes, _ = three("127.0.136", heartbeat_interval=0.5, failure_timeout=3.0)
    for node in nodes:
        node.add_singleton("q", rec.func(node.name), mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 8.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    others = [n for n in nodes if n is not holder]
    await asyncio.gather(*(reconciled(n, 6) for n in others))  # past a renewal: a recent ack
    await holder.stop()
    stopped = time.monotonic()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0, message="a successor")
    took = time.monotonic() - stopped
    print(f"quorum handover after a graceful stop: {took:.2f} s")
    assert took < 1.0, f"the successor waited {took:.2f} s (window 2.5 s)"
    (successor, token), *_ = rec.starts[1:]
    assert successor != holder_name and token > rec.starts[0][1]
