"""Membership between real in-process nodes: who is up, who goes down, and why.

Failure detection, heartbeats, a clean leave, simultaneous dials and a restarted
peer, on loopback aliases with short timeouts. In-process, so that mutation
testing (scripts/mutation) sees shoal.mesh's mutants here; the multi-process
versions of these stories are in tests/cluster.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoal import wire
from shoal.config import Peer
from shoal.mesh import MembershipEvent
from shoal.node import Node
from tests.mesh.conftest import MESH_PORT, NodeFactory, Proposals, peer_of
from tests.support.procs import async_wait_until


def events_of(node: Node) -> list[MembershipEvent]:
    events: list[MembershipEvent] = []
    node.add_listener(events.append)
    return events


async def connected(a: Node, b: Node) -> None:
    await async_wait_until(
        lambda: b.name in a.nodes() and a.name in b.nodes(), timeout=5, message="connected"
    )


def silence(node: Node) -> None:
    """The node hangs: it stays connected but sends and reads nothing more (a frozen
    process, a dead host whose connections were not reset)."""
    assert node.mesh is not None and node.mesh._ticker is not None
    node.mesh._ticker.cancel()
    if node.mesh._server is not None:
        node.mesh._server.close()
    for conn in node.mesh.connections.values():
        assert conn.transport is not None
        conn.transport.pause_reading()


async def test_a_silent_peer_is_down_after_the_failure_timeout(make_node: NodeFactory) -> None:
    a = await make_node(heartbeat_interval=0.1, failure_timeout=0.6)
    b = await make_node([peer_of(a)], heartbeat_interval=0.1, failure_timeout=30)
    await connected(a, b)
    assert a.mesh is not None
    conn = a.mesh.connection_to(b.name)
    events = events_of(a)
    silenced = time.monotonic()
    silence(b)
    await async_wait_until(lambda: events, timeout=5, message="b down")
    elapsed = time.monotonic() - silenced
    assert events == [MembershipEvent("down", b.name, "closed")]
    assert b.name not in a.nodes()
    # Not before the timeout (last heard at most half a heartbeat before the silence).
    assert 0.6 - 0.1 <= elapsed < 0.6 + 1.0, elapsed
    # The connection is closed, not only forgotten (a frozen peer must not hold a socket).
    assert conn.transport is not None and conn.transport.is_closing()


async def test_idle_peers_stay_up_on_heartbeats_alone(make_node: NodeFactory) -> None:
    """No messages at all for several failure timeouts: heartbeats keep both sides up."""
    a = await make_node(heartbeat_interval=0.1, failure_timeout=0.5)
    b = await make_node([peer_of(a)], heartbeat_interval=0.1, failure_timeout=0.5)
    await connected(a, b)
    events = events_of(a) + events_of(b)
    assert a.mesh is not None and b.mesh is not None
    start = a.mesh.stats.frames_received, b.mesh.stats.frames_received
    # At one heartbeat per half interval at most, 16 frames span >= 0.8 s, more than a
    # failure timeout; both directions are checked.
    await async_wait_until(
        lambda: (
            a.mesh is not None
            and b.mesh is not None
            and a.mesh.stats.frames_received - start[0] >= 16
            and b.mesh.stats.frames_received - start[1] >= 16
        ),
        timeout=10,
        message="heartbeats both ways",
    )
    assert events == []
    assert a.nodes() == [b.name] and b.nodes() == [a.name]


async def test_a_node_that_stops_is_down_at_once_as_leaving(make_node: NodeFactory) -> None:
    a = await make_node(failure_timeout=30)
    b = await make_node([peer_of(a)], failure_timeout=30)
    await connected(a, b)
    events = events_of(a)
    started = time.monotonic()
    await b.stop()
    await async_wait_until(lambda: events, timeout=5, message="b down")
    assert events == [MembershipEvent("down", b.name, "leaving")]
    assert time.monotonic() - started < 5  # told, not detected (that takes 30 s here)
    assert a.nodes() == []


async def test_stop_is_bounded_when_a_peer_never_lets_the_connection_close(
    make_node: NodeFactory,
) -> None:
    """A peer that stopped reading while our write buffer is full never lets a graceful
    close finish (the buffer cannot drain): stop gives it 1 s, then aborts."""
    a = await make_node(failure_timeout=30)
    # b itself would drop the connection only after its failure timeout, 8 s.
    b = await make_node([peer_of(a)], failure_timeout=8)
    await connected(a, b)
    b.register("sink", lambda _payload, _sender: None, sync_to_thread=False)
    assert a.mesh is not None and b.mesh is not None
    reader = b.mesh.connection_to(a.name).transport
    writer = a.mesh.connection_to(b.name).transport
    assert reader is not None and writer is not None
    reader.pause_reading()
    blob = b"x" * 60_000
    for _ in range(1000):  # 60 MB at most: the kernel's buffers take a few MB
        await a.send(b.name, "sink", blob)
        if writer.get_write_buffer_size() > 0:
            break
    assert writer.get_write_buffer_size() > 0, "the socket buffers never filled"
    events = events_of(b)
    started = time.monotonic()
    async with asyncio.timeout(20):  # fails the test, rather than hanging it
        await a.stop()
    elapsed = time.monotonic() - started
    # Not before the 1 s given to the close (so the peer did hold it), and well before
    # b's failure timeout, which would end a stop waiting for ever.
    assert 0.9 <= elapsed < 3.0, elapsed
    assert writer.is_closing()
    await async_wait_until(lambda: events, timeout=5, message="b sees a down")
    assert events == [MembershipEvent("down", a.name, "closed")]


async def test_simultaneous_dials_leave_one_connection_both_sides_agree_on(
    make_node: NodeFactory,
) -> None:
    """Each dials the other in the same loop iteration: the dial of the smaller name wins."""
    sx, sy = Proposals(), Proposals()
    x = await make_node(strategy=sx)
    y = await make_node(strategy=sy)
    sx.add(peer_of(y))
    sy.add(peer_of(x))
    await connected(x, y)
    assert x.mesh is not None and y.mesh is not None
    await async_wait_until(
        lambda: not (x.mesh is None or x.mesh.dialing or y.mesh is None or y.mesh.dialing),
        timeout=5,
        message="dials settled",
    )
    cx, cy = x.mesh.connection_to(y.name), y.mesh.connection_to(x.name)
    assert cx.transport is not None and cy.transport is not None
    assert not cx.transport.is_closing() and not cy.transport.is_closing()
    # One TCP connection, seen from its two ends.
    assert cx.transport.get_extra_info("sockname") == cy.transport.get_extra_info("peername")
    smaller = x if x.name < y.name else y
    winner = cx if smaller is x else cy
    assert winner.dialed, "the connection dialed by the smaller name is the one kept"
    assert x.nodes() == [y.name] and y.nodes() == [x.name]


async def test_a_restarted_peer_replaces_its_hung_predecessor(make_node: NodeFactory) -> None:
    """A peer restarts (new incarnation, same name) while we still hold its old connection,
    which we dialed and would otherwise keep: the new one replaces it at once."""
    sx, sy = Proposals(), Proposals()
    # Long heartbeat and failure timeouts: only the new incarnation can tell the restart.
    slow = dict(heartbeat_interval=5.0, failure_timeout=30)
    x = await make_node(strategy=sx, **slow)
    y = await make_node(strategy=sy, **slow)
    (low, low_strategy), (high, _) = sorted([(x, sx), (y, sy)], key=lambda p: p[0].name)
    low_strategy.add(peer_of(high))
    await connected(low, high)
    assert low.mesh is not None and low.mesh.connection_to(high.name).dialed
    events = events_of(low)
    silence(high)
    again = await make_node([peer_of(low)], host=high.settings.host, **slow)
    assert again.name == high.name
    await async_wait_until(lambda: len(events) >= 2, timeout=5, message="replaced")
    assert events == [
        MembershipEvent("down", high.name, "replaced"),
        MembershipEvent("up", high.name),
    ]
    assert again.mesh is not None
    assert low.mesh.connection_to(high.name).peer_incarnation == again.mesh.incarnation
    assert again.nodes() == [low.name]


async def test_a_member_list_up_to_ten_thousand_entries_is_read_and_a_longer_one_drops(
    make_node: NodeFactory,
) -> None:
    """MEMBERS is bounded: a peer sending more than 10 000 entries is cut off."""
    a = await make_node()
    b = await make_node([peer_of(a)])
    await connected(a, b)
    events = events_of(a)
    assert b.mesh is not None
    conn = b.mesh.connection_to(a.name)
    filler = [["x", "", 0]] * 10_000  # ignored entries, but counted
    conn.send([wire.MEMBERS, filler])
    assert await b.ping(a.name) >= 0  # read and still connected
    conn.send([wire.MEMBERS, [*filler, ["x", "", 0]]])
    await async_wait_until(lambda: events, timeout=5, message="b dropped")
    assert events == [MembershipEvent("down", b.name, "closed")]


async def test_the_mesh_counts_frames_and_bytes_both_ways(make_node: NodeFactory) -> None:
    """The counters behind shoal_mesh_* metrics add up what really went over the wire."""
    a = await make_node()
    b = await make_node([peer_of(a)])
    await connected(a, b)
    b.register("sink", lambda _payload, _sender: None)
    assert a.mesh is not None and b.mesh is not None
    sent, received = a.mesh.stats, b.mesh.stats
    before = (sent.frames_sent, sent.bytes_sent, received.frames_received, received.bytes_received)
    for _ in range(10):
        await a.send(b.name, "sink", b"x" * 1000)
    await async_wait_until(
        lambda: received.frames_received - before[2] >= 10, timeout=5, message="10 frames"
    )
    assert sent.frames_sent - before[0] >= 10
    assert sent.bytes_sent - before[1] >= 10_000
    assert received.bytes_received - before[3] >= 10_000


async def test_with_one_node_per_host_a_refused_peer_is_dialed_again_next_round(
    make_node: NodeFactory, hosts: Any
) -> None:
    """Probe back-off is for the ports of a range only: a peer that was down (refused) is
    dialed again on the very next proposal once it is up."""
    a = await make_node()
    assert a.mesh is not None
    later = hosts()
    peer = Peer("hi", later, MESH_PORT)
    a.mesh.propose([peer])
    await async_wait_until(lambda: a.mesh is not None and not a.mesh.dialing, 5, message="refused")
    b = await make_node(host=later)
    a.mesh.propose([peer])
    assert a.mesh.dialing, "dialed at once, no back-off"
    await connected(a, b)


async def test_a_slow_membership_events_consumer_keeps_the_newest_events_only(
    make_node: NodeFactory, caplog: Any
) -> None:
    a = await make_node()
    b = await make_node([peer_of(a)])
    events = a.membership_events()
    first = asyncio.ensure_future(events.__anext__())  # subscribes, then waits
    await connected(a, b)
    assert await asyncio.wait_for(first, 5) == MembershipEvent("up", b.name)
    # The consumer stalls while the cluster churns: it may not hold every event for good.
    churn = [MembershipEvent("down", f"n{i}@127.0.0.9", "closed") for i in range(2500)]
    for event in churn:
        a._membership_changed(event)
    kept = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(1000)]
    assert kept == churn[-1000:]  # the newest 1000 (MEMBERSHIP_QUEUE)
    assert "membership_events() consumer is slow: 1 events dropped" in caplog.text
    await events.aclose()
