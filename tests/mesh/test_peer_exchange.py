"""Peer exchange (MEMBERS): a node reaches peers its own discovery never returned."""

from __future__ import annotations

from tests.mesh.conftest import NodeFactory, peer_of
from tests.support.procs import async_wait_until


async def test_a_node_reaches_a_third_only_through_peer_exchange(make_node: NodeFactory) -> None:
    """`left` and `right` are each told only of `hub`, and `hub` of nobody: they can only
    learn of each other from the members `hub` announces (plain TCP, no TLS)."""
    hub = await make_node()
    left = await make_node([peer_of(hub)])
    right = await make_node([peer_of(hub)])
    await async_wait_until(
        lambda: right.name in left.nodes() and left.name in right.nodes(),
        timeout=5,
        message="left and right connected through peer exchange",
    )
    assert hub.nodes() == sorted([left.name, right.name])
