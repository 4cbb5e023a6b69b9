"""Several nodes per host, in one process: claimed ports, names, one mesh, the dial policy.

Each node claims the first free port of SHOAL_PORT..SHOAL_PORT+N-1 on its
address when it is made; its name carries the port unless it is SHOAL_PORT.
(The acceptance test with real worker processes on two hosts is
tests/cluster/test_nodes_per_host_netns.py.)
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shoal import wire
from shoal.config import ConfigError, Peer, Settings, parse_hosts
from shoal.mesh import ClaimedPort
from shoal.node import Node
from tests.mesh.conftest import COOKIE, MESH_PORT, Proposals, peer_of, settings_for
from tests.support.procs import async_wait_until

NodeMaker = Callable[..., Node]


@pytest.fixture
async def nodes() -> AsyncIterator[NodeMaker]:
    """`nodes(host, **settings)`: a node made (port claimed) but not started; stopped after."""
    made: list[Node] = []

    def make(host: str, strategy: Any = None, **overrides: Any) -> Node:
        overrides.setdefault("nodes_per_host", 4)
        node = Node(settings_for(host, **overrides), strategy)
        made.append(node)
        return node

    yield make
    for node in reversed(made):
        await node.stop()


def mesh_of(nodes: list[Node]) -> bool:
    names = {n.name for n in nodes}
    return all(set(n.nodes()) == names - {n.name} for n in nodes)


async def test_nodes_of_one_host_claim_the_range_in_order(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    host = hosts()
    made = [nodes(host) for _ in range(4)]
    assert [n.settings.listen_port for n in made] == [4370, 4371, 4372, 4373]
    assert [n.name for n in made] == [
        f"hi@{host}",
        f"hi@{host}:4371",
        f"hi@{host}:4372",
        f"hi@{host}:4373",
    ]
    with pytest.raises(ConfigError, match=r"every mesh port 4370-4373 on .* is in use"):
        nodes(host)
    # A node that stops frees its port, and the next one takes it, name and all.
    await made[1].stop()
    assert nodes(host).name == f"hi@{host}:4371"


async def test_one_node_per_host_claims_nothing_and_binds_at_start(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    host = hosts()
    node = nodes(host, nodes_per_host=1)
    assert node.settings.own_port == 0 and node.name == f"hi@{host}"
    with socket.socket() as probe:  # nothing listens before start(), as before
        assert probe.connect_ex((host, MESH_PORT)) != 0
    await node.start()
    assert node.settings.listen_port == MESH_PORT


async def test_four_and_two_nodes_on_two_hosts_form_one_mesh_from_the_hosts_alone(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    """Static discovery lists the two hosts only (as DNS gives addresses only): every
    node probes the range on both and all six connect."""
    a, b = hosts(), hosts()
    listed = parse_hosts(f"hi@{a},{b}", "hi", MESH_PORT)
    made = [nodes(h, hosts=listed) for h in (a, a, a, a, b, b)]
    for node in made:
        await node.start()
    await async_wait_until(lambda: mesh_of(made), timeout=10, message="one 6-node mesh")
    assert sorted(made[0].nodes()) == sorted(
        [f"hi@{a}:4371", f"hi@{a}:4372", f"hi@{a}:4373", f"hi@{b}", f"hi@{b}:4371"]
    )
    reply = await made[5].call(f"hi@{a}:4373", "shoal.ping", None, timeout=5)
    assert reply == "pong"
    # Calls go by name to the right process, in both directions.
    assert await made[3].ping(made[4].name) >= 0


async def test_peers_of_peers_are_dialed_on_the_range_only(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    """A member list may name nodes on the other ports of the range (dialed), never a
    port outside it, even on an address that listens there."""
    a, b, c = hosts(), hosts(), hosts()
    hub, near = nodes(a), nodes(b, nodes_per_host=2)
    outside = socket.create_server((c, MESH_PORT + 4))  # one past the range
    outside.setblocking(False)
    try:
        await hub.start()
        await near.start()
        far = nodes(a, strategy=Proposals([Peer("hi", a, MESH_PORT)]))
        await far.start()
        assert far.name == f"hi@{a}:4371"
        # `near` is told of the hub only: the hub's member list introduces `far`.
        assert near.mesh is not None
        near.mesh.propose([Peer("hi", a, MESH_PORT)])
        await async_wait_until(
            lambda: far.name in near.nodes(), timeout=5, message="member on the range dialed"
        )
        assert hub.mesh is not None
        conn = hub.mesh.connection_to(near.name)
        conn.send([wire.MEMBERS, [[f"hi@{c}:{MESH_PORT + 4}", c, MESH_PORT + 4]]])
        conn.send([wire.MEMBERS, [[f"hi@{c}", c, MESH_PORT + 4]]])
        await near.ping(hub.name)  # both frames handled
        with pytest.raises(BlockingIOError):
            outside.accept()
    finally:
        outside.close()


async def test_a_name_its_port_does_not_give_is_refused(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    """The name a member list spreads is the dialer's address: it must be the name its
    port gives (or a peer could claim another node's name, or make us dial elsewhere)."""
    acceptor = nodes(hosts())
    await acceptor.start()
    key = wire.cookie_key(COOKIE)
    client = hosts()
    for name, port, verdict in [
        (f"hi@{client}:4372", 4371, "does not match its port"),
        (f"hi@{client}", 4371, "does not match its port"),
        (f"hi@{client}:4370", 4370, "does not match its port"),
        (f"hi@{client}:4374", 4374, "does not match its port"),
        (f"hi@{client}:4372", 4372, "welcome"),
    ]:
        reader, writer = await asyncio.open_connection(
            acceptor.settings.host, MESH_PORT, local_addr=(client, 0)
        )
        hello = wire.Hello(wire.PROTOCOL_VERSION, name, port, os.urandom(8), os.urandom(32), None)
        writer.write(wire.encode_frame(hello.to_wire()))
        decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
        frames: list[Any] = []
        async with asyncio.timeout(5):
            while len(frames) < 1:
                frames += decoder.feed(await reader.read(4096))
            writer.write(
                wire.encode_frame(wire.make_proof(key, hello, wire.parse_challenge(frames[0])))
            )
            while len(frames) < 2:
                chunk = await reader.read(4096)
                assert chunk, f"{name}: closed without an answer"
                # Only the answer: encrypted records may follow a welcome in the same read.
                frames += decoder.feed(chunk, max_frames=2 - len(frames))
        writer.close()
        answer = frames[1]
        said = answer["t"] if answer["t"] == "welcome" else answer.get("reason", "")
        assert verdict in said, (name, port, answer)


async def test_refused_probes_back_off_but_a_member_list_dials_at_once(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    host = hosts()
    node = nodes(host)
    await node.start()
    mesh = node.mesh
    assert mesh is not None
    empty = Peer("hi", hosts(), 4372, True)
    mesh.propose([empty])
    await async_wait_until(lambda: not mesh.dialing, timeout=5, message="probe refused")
    _retry_at, delay = mesh._probe_backoff[(empty.host, empty.port)]
    assert delay == 1.0
    mesh.propose([empty])
    assert not mesh.dialing, "a refused port is not probed again at once"
    mesh.propose([empty], known=True)
    assert mesh.dialing, "a member list's word that a node is there is dialed at once"
    await async_wait_until(lambda: not mesh.dialing, timeout=5, message="refused again")
    # A node comes up there: the app's connect() dials it at once, back-off or not.
    *_, late = [nodes(empty.host) for _ in range(3)]
    await late.start()
    assert late.name == empty.name
    assert await node.connect(empty.name) == empty.name
    # Found: the back-off is forgotten, so a later loss of this node is probed at once.
    assert (empty.host, empty.port) not in mesh._probe_backoff


async def test_a_node_made_before_a_fork_refuses_to_start_in_the_child(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    node = nodes(hosts())
    claimed = node._claimed_port
    assert claimed is not None
    node._claimed_port = ClaimedPort(claimed.sock, claimed.pid + 1)  # as seen after fork()
    with pytest.raises(OSError, match="make the Node in each worker process"):
        await node.start()


def test_settings_made_in_code_take_nodes_per_host() -> None:
    s = Settings(cookie=COOKIE, host="127.0.20.1", nodes_per_host=2)
    assert list(s.ports) == [4370, 4371]
    with pytest.raises(ConfigError, match="SHOAL_NODES_PER_HOST=40"):
        s.with_overrides(nodes_per_host=40)


async def test_a_member_list_naming_a_backed_off_port_is_dialed_at_once(
    nodes: NodeMaker, hosts: Callable[[], str]
) -> None:
    """A peer's MEMBERS frame is its word that a node is there: the probe back-off of that
    port (refused a moment ago) does not delay the dial."""
    node, hub = nodes(hosts()), nodes(hosts())
    await node.start()
    await hub.start()
    assert node.mesh is not None and hub.mesh is not None
    node.mesh.propose([peer_of(hub)])
    await async_wait_until(lambda: hub.name in node.nodes(), timeout=5, message="connected")
    empty = Peer("hi", hosts(), 4372, True)
    node.mesh.propose([empty])
    await async_wait_until(lambda: not node.mesh.dialing, timeout=5, message="probe refused")
    key = (empty.host, empty.port)
    assert node.mesh._probe_backoff[key][1] == 1.0
    hub.mesh.connection_to(node.name).send([wire.MEMBERS, [[empty.name, empty.host, 4372]]])
    # Dialed again at once, and refused again: the back-off doubles.
    await async_wait_until(
        lambda: node.mesh is not None and node.mesh._probe_backoff[key][1] == 2.0,
        timeout=5,
        message="the member dialed at once",
    )
