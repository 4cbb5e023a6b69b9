"""What happens right at the end of a handshake, between two real nodes.

The acceptor is established the moment it sends WELCOME, so whatever it sends
next (its MEMBERS announcement, messages from node-up listeners) can arrive in
the same TCP segment as the WELCOME, before the dialer has finished its own
handshake. None of it may be lost, reordered before "up", or judged by the
handshake's small frame limit.
"""

from __future__ import annotations

from typing import Any

from shoal import wire
from shoal.mesh import MembershipEvent
from tests.mesh.conftest import NodeFactory, Proposals, peer_of
from tests.support.procs import async_wait_until


async def test_messages_sent_with_the_welcome_reach_the_dialer(make_node: NodeFactory) -> None:
    acceptor = await make_node()
    big = "x" * (3 * wire.MAX_HANDSHAKE_FRAME)  # more than a handshake frame may carry

    def greet_on_up(event: MembershipEvent) -> None:
        if event.kind == "up":
            assert acceptor.mesh is not None
            conn = acceptor.mesh.connection_to(event.node)
            # Synchronously, in the same loop iteration as the WELCOME.
            conn.send([wire.SEND, "greet", "small"])
            conn.send([wire.SEND, "greet", big])

    acceptor.add_listener(greet_on_up)
    strategy = Proposals()
    dialer = await make_node(strategy=strategy)
    received: list[tuple[Any, bool]] = []
    dialer.register(
        "greet", lambda payload, sender: received.append((payload, sender in dialer.nodes()))
    )
    strategy.add(peer_of(acceptor))
    await async_wait_until(lambda: len(received) == 2, timeout=5, message="both greetings")
    assert received == [("small", True), (big, True)]  # in order, after node-up
    assert acceptor.name in dialer.nodes()


async def test_dialer_learns_the_members_the_acceptor_announces(make_node: NodeFactory) -> None:
    hub = await make_node()
    learned: list[list[Any]] = []
    strategy = Proposals()
    dialer = await make_node(strategy=strategy)
    assert dialer.mesh is not None
    learn = dialer.mesh._learn_members
    dialer.mesh._learn_members = lambda frame: (learned.append(frame), learn(frame))[1]
    strategy.add(peer_of(hub))
    await async_wait_until(lambda: learned, timeout=5, message="MEMBERS from the hub")
    names = {member[0] for member in learned[0][1]}
    assert {hub.name, dialer.name} <= names
