"""Who may take a handshake slot, and which learned addresses may be dialed.

Handshakes: unauthenticated connections are capped per source address and in
total. When the total is reached, a newcomer from an address with fewer
pending handshakes than the busiest address evicts that address's oldest
pending handshake (fair share), so hosts that hold and recycle half-open
connections cannot keep a new node out: its one handshake always gets a slot.
Between half the cap and the cap, connections from addresses that already
hold slots are dropped at random, with a probability growing to 1 (random
early drop), so a flood thins out before it fills the table. Refusals are
logged at most once per second.

Dialing: addresses that peers tell us about (MEMBERS frames, gossip beacons)
are dialed only on our own mesh port, at most `MAX_LEARNED_PEERS` per frame,
and never at loopback, link-local, multicast or unspecified addresses unless
this node itself has such an address. A peer holding the cookie cannot use us
to scan ports or to reach services on our own host.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

log = logging.getLogger("shoal.mesh")

# Unauthenticated connections at once; more evict or are refused (bounded
# memory and file descriptors under a flood of half-open handshakes).
MAX_PENDING_HANDSHAKES = 256
# ... and from one address, so that one flooding host cannot fill the table alone.
MAX_PENDING_HANDSHAKES_PER_HOST = 32
# Random early drop starts at this fraction of MAX_PENDING_HANDSHAKES.
EARLY_DROP_FROM = 0.5
# Peer-supplied addresses considered per MEMBERS frame or gossip round.
MAX_LEARNED_PEERS = 256
# Dials in progress at once: a flood of learned addresses cannot exhaust descriptors.
MAX_CONCURRENT_DIALS = 64


class Pending:
    """One unauthenticated connection holding a slot; `evict` drops it."""

    __slots__ = ("evict", "host", "since")

    def __init__(self, host: str, evict: Callable[[], None]) -> None:
        self.host = host
        self.evict = evict
        self.since = time.monotonic()


class HandshakeAdmission:
    """The table of pending handshakes of one node (see the module docstring)."""

    def __init__(
        self,
        limit: int = MAX_PENDING_HANDSHAKES,
        per_host: int = MAX_PENDING_HANDSHAKES_PER_HOST,
        rng: random.Random | None = None,
    ) -> None:
        self.limit = limit
        self.per_host = per_host
        self._by_host: dict[str, collections.OrderedDict[int, Pending]] = {}
        self._total = 0
        if rng is None:
            import random  # here, not at the top: `import shoal` need not pay for it

            rng = random.Random()
        self._rng = rng
        self.refused = 0
        self.evicted = 0
        self._logged = -1.0

    @property
    def total(self) -> int:
        return self._total

    def count(self, host: str) -> int:
        slots = self._by_host.get(host)
        return len(slots) if slots else 0

    def admit(self, host: str, address: str, evict: Callable[[], None]) -> Pending | None:
        """A slot for a new connection from `host`, or None (refused: drop it)."""
        mine = self.count(host)
        if mine >= self.per_host:
            self._refuse(address, "too many handshakes from this address")
            return None
        if self._total >= self.limit:
            if not self._evict_from_busiest(mine):
                self._refuse(address, "too many handshakes in progress")
                return None
        elif mine and self._total >= self.limit * EARLY_DROP_FROM:
            # Hosts already holding slots lose new ones more often as the table
            # fills; a host with none always gets one (possibly by eviction).
            fill = (self._total - self.limit * EARLY_DROP_FROM) / (
                self.limit * (1 - EARLY_DROP_FROM)
            )
            if self._rng.random() < fill:
                self._refuse(address, "handshake table filling up (early drop)")
                return None
        pending = Pending(host, evict)
        self._by_host.setdefault(host, collections.OrderedDict())[id(pending)] = pending
        self._total += 1
        return pending

    def release(self, pending: Pending) -> None:
        """The handshake ended (done, failed or evicted): free its slot."""
        slots = self._by_host.get(pending.host)
        if slots is None or slots.pop(id(pending), None) is None:
            return
        self._total -= 1
        if not slots:
            del self._by_host[pending.host]

    def _evict_from_busiest(self, mine: int) -> bool:
        host, slots = max(self._by_host.items(), key=lambda item: len(item[1]))
        if len(slots) <= mine + 1:
            return False  # we are (nearly) the busiest ourselves: no fair claim
        _, oldest = slots.popitem(last=False)
        self._total -= 1
        if not slots:
            del self._by_host[host]
        self.evicted += 1
        oldest.evict()
        return True

    def _refuse(self, address: str, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged >= 1.0:  # a flood must not flood the log too
            self._logged = now
            log.warning(
                "refusing %s: %s (%d refused, %d evicted so far)",
                address,
                why,
                self.refused,
                self.evicted,
            )


def learned_address_allowed(host: str, own_host: str) -> bool:
    """May we dial `host`, learned from a peer? (IP literals only; see the module docstring.)"""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_unspecified or address.is_multicast or host == "255.255.255.255":
        return False
    try:
        own = ipaddress.ip_address(own_host)
    except ValueError:
        own = None
    if address.is_loopback:
        return own is not None and own.is_loopback
    if address.is_link_local:
        return own is not None and own.is_link_local
    return True
