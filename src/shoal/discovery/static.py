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
    """Propose `settings.hosts` whose basename is `settings.name_query`, excluding ourselves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.peers: tuple[Peer, ...] = tuple(
            peer
            for peer in dict.fromkeys(settings.hosts)
            if peer.basename == settings.name_query and not _is_self(settings, peer)
        )

    async def run(self, propose: Propose) -> None:
        log.debug("static discovery: %s", ", ".join(p.name for p in self.peers) or "no peers")
        while True:
            propose(self.peers)
            await asyncio.sleep(self.settings.polling_interval)


def _is_self(settings: Settings, peer: Peer) -> bool:
    return peer.host == settings.host and peer.port == settings.port
