"""Static discovery: the peers listed in `SHOAL_HOSTS`.

The list is re-proposed every polling interval, not just once, so that a peer
that restarted (and was dropped by the mesh) is dialled again.
"""

from __future__ import annotations

import asyncio
import logging

from shoal.config import Peer, Settings
from shoal.discovery.base import Propose

log = logging.getLogger(__name__)


class StaticStrategy:
    """Propose `settings.hosts` whose basename is `settings.name_query`, excluding ourselves.

    With several nodes per host (SHOAL_NODES_PER_HOST), an entry on SHOAL_PORT
    (`name@host`, `host`) stands for every port of the range on that host.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.peers: tuple[Peer, ...] = tuple(
            peer
            for peer in dict.fromkeys(_expand(settings))
            if peer.basename == settings.name_query and not _is_self(settings, peer)
        )

    async def run(self, propose: Propose) -> None:
        log.debug("static discovery: %s", ", ".join(p.name for p in self.peers) or "no peers")
        while True:
            propose(self.peers)
            await asyncio.sleep(self.settings.polling_interval)


def _expand(settings: Settings) -> list[Peer]:
    if settings.nodes_per_host == 1:
        return list(settings.hosts)
    return [
        peer
        for entry in settings.hosts
        for peer in (
            settings.peers_on(entry.basename, entry.host)
            if entry.port == settings.port
            else [settings.peer(entry.basename, entry.host, entry.port)]
        )
    ]


def _is_self(settings: Settings, peer: Peer) -> bool:
    return peer.host == settings.host and peer.port == settings.listen_port
