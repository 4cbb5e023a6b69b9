"""The one small interface every discovery strategy implements.

A strategy only *proposes* peers; the mesh decides whom it is connected to.
Proposals are additive: a peer missing from a later round is never dropped
because of that (only the mesh's failure detection drops peers), so a DNS
outage or an empty answer disconnects nobody.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from shoal.config import Peer, Settings

# Called by a strategy after each round with the peers it found (possibly none,
# e.g. when the lookup failed). The first call marks "first discovery round done".
Propose = Callable[[Iterable[Peer]], None]


class Strategy(Protocol):
    """A discovery strategy. `run` loops until cancelled, calling `propose` each round."""

    async def run(self, propose: Propose) -> None: ...


def host_peers(settings: Settings, hosts: Iterable[str]) -> list[Peer]:
    """The nodes that may run on these hosts (addresses from DNS or Cloud Map).

    One node per host: `NODE_NAME_QUERY@host` on SHOAL_PORT, our own host left
    out. Several (SHOAL_NODES_PER_HOST): every port of the range on every host,
    ours included (the other workers of this host); the mesh probes them.
    """
    if settings.nodes_per_host == 1:
        own = _normalize(settings.host)
        return [Peer(settings.name_query, host, settings.port) for host in hosts if host != own]
    return [peer for host in hosts for peer in settings.peers_on(settings.name_query, host)]


def _normalize(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


async def poll_forever(
    poll: Callable[[], Awaitable[Iterable[Peer]]], interval: float, propose: Propose
) -> None:
    """Call `poll` every `interval` s (start to start, no drift) and propose what it finds."""
    next_round = time.monotonic()
    while True:
        propose(await poll())
        next_round = max(next_round + interval, time.monotonic())
        await asyncio.sleep(next_round - time.monotonic())
