"""Why an authenticated dialer is refused, as the dialer is told (the REJECT reason).

A client that knows the cookie speaks the handshake itself (shoal.wire, real
frames over TCP) so that it can send what a real node never would: another
basename, another encryption setting, an acceptor name it does not expect, or a
second connection for a peer that is already connected.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from shoal import wire
from shoal.node import Node
from tests.mesh.conftest import COOKIE, MESH_PORT, NodeFactory, Proposals, peer_of
from tests.support.procs import async_wait_until

KEY = wire.cookie_key(COOKIE)


def hello_from(host: str, **changes: Any) -> wire.Hello:
    fields: dict[str, Any] = dict(
        version=wire.PROTOCOL_VERSION,
        name=f"hi@{host}",
        port=MESH_PORT,
        incarnation=os.urandom(8),
        nonce=os.urandom(32),
        expected=None,
        encrypt=True,
    )
    fields.update(changes)
    return wire.Hello(**fields)


async def answer(acceptor: Node, hello: wire.Hello, source: str) -> dict[str, Any]:
    """Dial `acceptor` from `source`, prove the cookie, and return its answer frame."""
    reader, writer = await asyncio.open_connection(
        acceptor.settings.host, MESH_PORT, local_addr=(source, 0)
    )
    try:
        writer.write(wire.encode_frame(hello.to_wire()))
        decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
        frames: list[Any] = []
        async with asyncio.timeout(5):
            while not frames:
                chunk = await reader.read(4096)
                assert chunk, "closed before the challenge"
                frames += decoder.feed(chunk, max_frames=1)
            challenge = wire.parse_challenge(frames[0])
            assert challenge.name == acceptor.name
            writer.write(wire.encode_frame(wire.make_proof(KEY, hello, challenge)))
            while len(frames) < 2:
                chunk = await reader.read(4096)
                assert chunk, "closed without an answer"
                frames += decoder.feed(chunk, max_frames=2 - len(frames))
    finally:
        writer.close()
    result: dict[str, Any] = frames[1]
    return result


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"expected": "hi@127.0.20.251"}, "wrong node"),
        ({"name": "krillin@{host}"}, "basename not in cluster"),
        ({"encrypt": False}, "encryption setting differs (SHOAL_TLS_* or mesh encryption)"),
        (
            {"name": "hi@{host}:4371"},
            "name does not match its port (SHOAL_PORT or SHOAL_NODES_PER_HOST differ)",
        ),
    ],
    ids=["expects-another-node", "other-basename", "encryption-differs", "name-not-its-port"],
)
async def test_a_proven_dialer_is_refused_with_the_reason(
    make_node: NodeFactory, hosts: Any, changes: dict[str, Any], reason: str
) -> None:
    acceptor = await make_node()
    client = hosts()
    changes = {k: v.format(host=client) if isinstance(v, str) else v for k, v in changes.items()}
    said = await answer(acceptor, hello_from(client, **changes), client)
    assert said == {"t": "reject", "reason": reason}
    assert acceptor.nodes() == []


async def test_the_same_dialer_done_right_is_welcomed(make_node: NodeFactory, hosts: Any) -> None:
    acceptor = await make_node()
    client = hosts()
    said = await answer(acceptor, hello_from(client, expected=acceptor.name), client)
    assert said["t"] == "welcome"


async def test_a_second_connection_of_a_connected_peer_is_a_duplicate(
    make_node: NodeFactory,
) -> None:
    """Same name, same incarnation, while our own connection to it is alive: a duplicate
    (the connection dialed by the smaller name is the one both sides keep)."""
    sx, sy = Proposals(), Proposals()
    x = await make_node(strategy=sx)
    y = await make_node(strategy=sy)
    (low, low_strategy), (high, _) = sorted([(x, sx), (y, sy)], key=lambda p: p[0].name)
    low_strategy.add(peer_of(high))
    await async_wait_until(lambda: high.name in low.nodes(), timeout=5, message="connected")
    assert high.mesh is not None
    twin = hello_from(high.settings.host, incarnation=high.mesh.incarnation)
    said = await answer(low, twin, high.settings.host)
    assert said == {"t": "reject", "reason": "duplicate"}
    assert low.nodes() == [high.name]
