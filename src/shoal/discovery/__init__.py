"""Discovery strategies, one module each, selected by `TOPOLOGY_TYPE`."""

from __future__ import annotations

from shoal.config import Settings
from shoal.discovery.base import Propose, Strategy

__all__ = ["Propose", "Strategy", "strategy_for"]


def strategy_for(settings: Settings) -> Strategy:
    """The strategy configured by `settings.topology`."""
    if settings.topology == "gossip":
        from shoal.discovery.gossip import GossipStrategy

        return GossipStrategy(settings)
    if settings.topology == "dns":
        from shoal.discovery.dns import DNSPollStrategy

        return DNSPollStrategy(settings)
    if settings.topology == "static":
        from shoal.discovery.static import StaticStrategy

        return StaticStrategy(settings)
    from shoal.discovery.cloudmap import CloudMapStrategy

    return CloudMapStrategy(settings)
