"""The one small interface every discovery strategy implements.

A strategy only *proposes* peers; the mesh decides whom it is connected to.
Proposals are additive: a peer missing from a later round is never dropped
because of that (only the mesh's failure detection drops peers), so a DNS
outage or an empty answer disconnects nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from shoal.config import Peer

# Called by a strategy after each round with the peers it found (possibly none,
# e.g. when the lookup failed). The first call marks "first discovery round done".
Propose = Callable[[Iterable[Peer]], None]


class Strategy(Protocol):
    """A discovery strategy. `run` loops until cancelled, calling `propose` each round."""

    async def run(self, propose: Propose) -> None: ...
