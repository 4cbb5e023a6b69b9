"""Helpers for in-process mesh tests: nodes on loopback aliases 127.0.20.x.

Each test gets fresh addresses from `hosts` so that tests never share a
listening socket; nodes are started with a discovery strategy the test
controls (`Proposals`), and always stopped, even when the test fails.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest

from shoal.config import Peer, Settings, TLSFiles
from shoal.discovery.base import Propose
from shoal.node import Node

COOKIE = "test-cookie-mesh-20-a7b6c5d4e3f21098"
# 127.0.20.0/24 is this directory's range; other tests use other ranges.
_HOSTS = itertools.cycle(f"127.0.20.{i}" for i in range(2, 250))


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Proposals:
    """A discovery strategy that proposes what the test tells it to, once per `add`."""

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self.peers = list(peers)
        self._propose: Propose | None = None

    async def run(self, propose: Propose) -> None:
        import asyncio

        self._propose = propose
        propose(self.peers)
        await asyncio.Event().wait()

    def add(self, *peers: Peer) -> None:
        self.peers.extend(peers)
        if self._propose is not None:
            self._propose(peers)


# Every node listens on the same mesh port, on its own address, as the contract
# says (SHOAL_PORT is the same on every node): addresses learned from peers are
# dialed on our own mesh port only.
MESH_PORT = 4370


def settings_for(
    host: str, cookie: str = COOKIE, tls: TLSFiles | None = None, **overrides: Any
) -> Settings:
    values: dict[str, Any] = dict(
        cookie=cookie,
        basename="hi",
        name_query="hi",
        host=host,
        port=MESH_PORT,
        topology="static",
        heartbeat_interval=0.2,
        failure_timeout=2.0,
        handshake_timeout=1.0,
        tls=tls,
    )
    values.update(overrides)
    return Settings(**values)


def peer_of(node: Node) -> Peer:
    return Peer(node.settings.basename, node.settings.host, node.settings.port)


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
def hosts() -> Callable[[], str]:
    return lambda: next(_HOSTS)


@pytest.fixture
async def make_node(hosts: Callable[[], str]) -> AsyncIterator[NodeFactory]:
    """`await make_node(peers=[...], **settings)`: a started node; stopped after the test."""
    nodes: list[Node] = []

    async def make(
        peers: Iterable[Peer] = (), strategy: Proposals | None = None, **overrides: Any
    ) -> Node:
        host = overrides.pop("host", None) or hosts()
        node = Node(settings_for(host, **overrides), strategy or Proposals(peers))
        nodes.append(node)
        await node.start()
        await node.wait_ready(5)
        return node

    yield make
    for node in reversed(nodes):
        await node.stop()
