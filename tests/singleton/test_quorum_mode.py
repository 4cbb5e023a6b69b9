"""Quorum-mode singletons with in-process nodes on short timings (fast enough for mutation runs).

The slower quorum scenarios (stalls, one-way cuts, an even split) are in test_singletons.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoal import Node, Peer
from shoal.singleton import CONFIRM_HANDLER, PREPARE_HANDLER, STATE_HANDLER, SingletonContext
from tests.singleton.test_singletons import Recorder, make_node, reconciled, stopper
from tests.support.procs import async_wait_until

__all__ = ["stopper"]  # the fixture, imported for the tests here

# window (failure timeout - one heartbeat) 0.3 s: acceptors answer 0.3 s after start
FAST = {"heartbeat_interval": 0.1, "failure_timeout": 0.4}


def three(prefix: str, **settings: Any) -> tuple[list[Node], list[Any]]:
    peers = [Peer("hi", f"{prefix}.{i}", 4371) for i in (2, 3, 4)]
    made = [make_node(p.host, peers, **{**FAST, "expected_nodes": 3, **settings}) for p in peers]
    return [node for node, _ in made], [gate for _, gate in made]


async def answered(node: Node, peer: str, handler: str, payload: Any) -> dict[str, Any]:
    """`peer`'s reply once its acceptor answers at all (it is silent for a window after start)."""
    replies: list[dict[str, Any]] = []

    async def ask() -> bool:
        reply = await node.call(peer, handler, payload, timeout=1.0)
        replies.append(reply)
        return reply.get("why") != "acceptor just started"

    await async_wait_until(ask, 3.0, message=f"{peer} answers")
    return replies[-1]


async def test_acceptors_answer_only_well_formed_requests_for_the_senders_own_ballot(
    stopper: list[Node],
) -> None:
    """A node promises and confirms ballots only as the wire protocol says: a request names
    the singleton and a ballot of the sender's own; a tick is confirmed once per job."""
    peers = [Peer("hi", h, 4371) for h in ("127.0.83.2", "127.0.83.3")]
    a, _ = make_node(peers[0].host, peers, **FAST)
    b, _ = make_node(peers[1].host, peers, **FAST)
    stopper.extend([a, b])
    await a.start()
    await b.start()
    await async_wait_until(lambda: a.nodes() == [b.name], 2.0)

    async def ask(handler: str, payload: Any) -> dict[str, Any]:
        return dict(await a.call(b.name, handler, payload, timeout=1.0))

    promised = await answered(a, b.name, PREPARE_HANDLER, {"name": "s", "ballot": [5, a.name]})
    assert promised["ok"] is True and promised["promised"] == [5, a.name]
    malformed = {"ok": False, "why": "malformed request"}
    for bad in (
        [5, a.name],
        {"ballot": [5, a.name]},
        {"name": 7, "ballot": [5, a.name]},
        {"name": "s", "ballot": [6, b.name]},  # someone else's ballot
        {"name": "s", "ballot": "6"},
    ):
        assert await ask(PREPARE_HANDLER, bad) == malformed, bad
        assert await ask(CONFIRM_HANDLER, bad) == malformed, bad
    lower = await ask(PREPARE_HANDLER, {"name": "s", "ballot": [4, a.name]})
    assert lower["ok"] is False and lower["promised"] == [5, a.name]
    assert (await ask(CONFIRM_HANDLER, {"name": "s", "ballot": [4, a.name]}))["ok"] is False
    assert (await ask(CONFIRM_HANDLER, {"name": "s", "ballot": [5, a.name]}))["ok"] is True
    # The ballot is per singleton name.
    assert (await ask(PREPARE_HANDLER, {"name": "t", "ballot": [1, a.name]}))["ok"] is True

    tick = time.time() + 5
    confirm_tick = {"name": "s", "ballot": [5, a.name], "job": "j", "tick": tick}
    assert (await ask(CONFIRM_HANDLER, confirm_tick))["ok"] is True
    again = await ask(CONFIRM_HANDLER, confirm_tick)
    assert again["ok"] is False and again["why"] == "tick already confirmed"
    assert (await ask(CONFIRM_HANDLER, {**confirm_tick, "tick": int(tick) + 2}))["ok"] is True
    for bad_tick in (
        {"name": "s", "ballot": [5, a.name], "job": "j"},
        {"name": "s", "ballot": [5, a.name], "tick": tick + 9},
        {"name": "s", "ballot": [5, a.name], "job": 3, "tick": tick + 9},
        {"name": "s", "ballot": [5, a.name], "job": "j", "tick": "later"},
    ):
        assert await ask(CONFIRM_HANDLER, bad_tick) == malformed, bad_tick
    # Another job's tick is its own.
    assert (await ask(CONFIRM_HANDLER, {**confirm_tick, "job": "k"}))["ok"] is True


async def test_a_quorum_singleton_runs_once_confirmed_and_moves_on_a_graceful_stop(
    stopper: list[Node],
) -> None:
    """One node runs it, with a context that a majority confirms (and a job's tick confirmed
    once); every node names it; on a graceful stop another node takes over with a higher
    fencing token, and the old context is no longer valid."""
    contexts: dict[str, SingletonContext] = {}
    rec = Recorder()
    nodes, _ = three("127.0.84")
    for node in nodes:
        inner = rec.func(node.name)

        async def run(ctx: SingletonContext, name: str = node.name, inner: Any = inner) -> None:
            contexts[name] = ctx
            await inner(ctx)

        node.add_singleton("s", run, mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    ctx = contexts[holder_name]
    assert ctx.mode == "quorum" and ctx.token >= 1 and ctx.node is holder
    await async_wait_until(ctx.is_valid, 1.0)
    assert await ctx.confirm() is True
    for node in nodes:
        await async_wait_until(lambda n=node: n.singletons.holders()["s"] == holder_name, 2.0)
    snapshot = nodes[0].singletons.snapshot()["s"]
    assert snapshot["holder"] == holder_name and snapshot["mode"] == "quorum"
    assert holder.singletons.is_holder("s") and holder.singletons.starts("s") == 1
    others = [n for n in nodes if n is not holder]
    assert not any(n.singletons.is_holder("s") for n in others)
    assert not await others[0].singletons.confirm("s")  # not the holder: never confirmed

    tick = time.time() + 5
    assert await holder.singletons.confirm("s", "job", tick) is True
    assert await holder.singletons.confirm("s", "job", tick) is False  # once per tick
    assert await holder.singletons.confirm("s", "job", tick + 1) is True

    await holder.stop()
    assert not ctx.is_valid() and await ctx.confirm() is False
    await async_wait_until(lambda: len(rec.running) == 1 and holder_name not in rec.running, 3.0)
    (successor,) = rec.running
    assert contexts[successor].token > ctx.token
    assert [name for name, _ in rec.starts] == [holder_name, successor]


async def test_a_node_cut_off_alone_neither_claims_nor_disturbs_the_holder(
    stopper: list[Node],
) -> None:
    """A node that hears nobody has no majority: it must not ask for promises (the others
    would promise its higher ballot and so fence off the working holder)."""
    rec = Recorder()
    nodes, gates = three("127.0.85", heartbeat_interval=0.3, failure_timeout=1.5)
    for node in nodes:
        node.add_singleton("s", rec.func(node.name), mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 4.0)
    (holder_name,) = rec.running
    # The larger-named of the other two: while it still hears the third node, that one is
    # the candidate (a deaf node that would be the candidate is a known weak spot, see
    # the README's "Singletons" section).
    lone = max((n for n in nodes if n.name != holder_name), key=lambda n: n.name)
    for gate in gates:
        gate.peers = []  # no redials: its connections stay down
    assert lone.mesh is not None
    for conn in lone.mesh.connections.values():
        assert conn.transport is not None
        conn.transport.pause_reading()  # it hears nobody; the others still hear it
    await async_wait_until(lambda: lone.nodes() == [], 3.0)  # its detector dropped them
    holder = next(n for n in nodes if n.name == holder_name)
    await reconciled(holder, 3)  # a renewal came since: it was not fenced off
    assert rec.running == {holder_name} and len(rec.starts) == 1, rec.starts


async def test_a_majority_is_of_the_expected_cluster_not_of_the_nodes_present(
    stopper: list[Node],
) -> None:
    """With five expected nodes, two connected nodes are no majority: nothing runs; a third
    node makes one, and then exactly one node runs it."""
    rec = Recorder()
    peers = [Peer("hi", f"127.0.86.{i}", 4371) for i in (2, 3, 4)]
    made = [make_node(p.host, peers, **FAST, expected_nodes=5) for p in peers]
    nodes = [node for node, _ in made]
    marker = Recorder()
    for node in nodes:
        node.add_singleton("q", rec.func(node.name), mode="quorum")
        node.add_singleton("m", marker.func(node.name), mode="mesh")  # decided in the same pass
        stopper.append(node)
    await nodes[0].start()
    await nodes[1].start()
    await async_wait_until(lambda: len(nodes[0].nodes()) == 1, 2.0)
    await async_wait_until(lambda: len(marker.running) == 1, 2.0)
    await asyncio.gather(*(reconciled(n, 6) for n in nodes[:2]))  # past the acceptors' window
    assert rec.starts == []
    assert nodes[0].singletons.holders()["q"] is None  # known, but nobody runs it
    assert not await nodes[0].singletons.confirm("q")
    assert not await nodes[0].singletons.confirm("never-registered")
    await nodes[2].start()
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    await asyncio.gather(*(reconciled(n, 3) for n in nodes))
    assert len(rec.starts) == 1, rec.starts


async def test_the_majority_takes_over_from_a_silent_holder_before_its_detector_fires(
    stopper: list[Node],
) -> None:
    """Cut off silently, the holder steps down as its confirmation lapses; the majority side
    takes over as soon as that is safe, while it still lists the old holder as connected
    (it does not wait for its failure detector)."""
    rec = Recorder()
    timing = {"heartbeat_interval": 0.5, "failure_timeout": 1.5, "drain_timeout": 0.2}
    nodes, gates = three("127.0.89", **timing)
    seen_at_start: list[list[str]] = []
    for node in nodes:
        inner = rec.func(node.name)

        async def run(ctx: SingletonContext, node: Node = node, inner: Any = inner) -> None:
            seen_at_start.append(node.nodes())
            await inner(ctx)

        node.add_singleton("s", run, mode="quorum")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 4.0)
    (holder_name,) = rec.running
    for gate in gates:
        gate.peers = []  # no redials
    for node in nodes:  # a silent cut between the holder and the others, both ways
        assert node.mesh is not None
        for peer, conn in node.mesh.connections.items():
            if holder_name in (node.name, peer):
                assert conn.transport is not None
                conn.transport.pause_reading()
    await async_wait_until(lambda: len(rec.starts) == 2, 4.0, message="a takeover")
    assert rec.starts[1][0] != holder_name and holder_name not in rec.running
    assert holder_name in seen_at_start[1], seen_at_start


async def test_peer_state_messages_are_checked_and_teach_holders_and_ballots(
    stopper: list[Node],
) -> None:
    """What a node takes from a peer's state message: which singletons it holds (malformed
    messages and values are dropped), the ballots it promised (never promise below them),
    and a release (the released holder's confirmations need no waiting out)."""
    peers = [Peer("hi", h, 4371) for h in ("127.0.91.2", "127.0.91.3")]
    a, _ = make_node(peers[0].host, peers, **FAST)
    b, _ = make_node(peers[1].host, peers, **FAST)
    stopper.extend([a, b])
    await a.start()
    await b.start()
    await async_wait_until(lambda: a.nodes() == [b.name] and b.nodes() == [a.name], 2.0)

    def tell_b(payload: Any) -> None:
        a.messaging.send_to_peers(STATE_HANDLER, payload, [b.name])

    for bad in (
        ["held"],
        {"held": {"x": 1.0}},  # no registered list
        {"held": [["x", 1.0]], "registered": ["x"]},
    ):
        tell_b(bad)
    tell_b({"held": {"w": 5.0, "x": "old", "y": True}, "registered": ["w", "x", "y"]})
    await async_wait_until(lambda: b.singletons.holders().get("w") == a.name, 2.0)
    holders = b.singletons.holders()
    assert "x" not in holders and holders.get("y") == a.name  # True is a number in Python
    assert b.singletons.snapshot()["w"] == {"holder": a.name, "mode": None, "token": None}

    # Ballots: a peer's promise of (7, a) means b never promises below it.
    tell_b({"held": {}, "registered": ["w"], "ballots": {"q": [7, a.name], "z": "bad"}})
    await async_wait_until(lambda: b.singletons.holders().get("w") is None, 2.0)
    low = await answered(a, b.name, PREPARE_HANDLER, {"name": "q", "ballot": [6, a.name]})
    assert low["ok"] is False and low["promised"] == [7, a.name]

    # A confirmed holder that says it no longer holds: a claimant need not wait for it.
    assert (await a.call(b.name, CONFIRM_HANDLER, {"name": "q", "ballot": [7, a.name]}))["ok"]
    later = await a.call(b.name, PREPARE_HANDLER, {"name": "q", "ballot": [8, a.name]})
    assert later["ok"] is True and later["age"] is not None  # it confirmed (7, a) just now
    tell_b({"held": {}, "registered": ["q"], "ballots": {"q": [8, a.name]}})
    await reconciled(b, 2)
    released = await a.call(b.name, PREPARE_HANDLER, {"name": "q", "ballot": [9, a.name]})
    assert released["ok"] is True and released["age"] is None

    # A claimant's state sent while its confirmation is under way is no release: the
    # confirmation may make it the holder, so the next claimant must wait it out.
    assert (await a.call(b.name, CONFIRM_HANDLER, {"name": "q", "ballot": [9, a.name]}))["ok"]
    tell_b({"held": {}, "registered": ["q"], "claiming": ["q"], "ballots": {"q": [9, a.name]}})
    await reconciled(b, 2)
    claimed = await a.call(b.name, PREPARE_HANDLER, {"name": "q", "ballot": [10, a.name]})
    assert claimed["ok"] is True and claimed["age"] is not None
