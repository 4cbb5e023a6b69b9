"""The one small interface every discovery strategy implements.

A strategy only *proposes* peers; the mesh decides whom it is connected to.
Proposals are additive: a peer missing from a later round is never dropped
because of that (only the mesh's failure detection drops peers), so a DNS
outage or an empty answer disconnects nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from shoal.config import Peer

# Called by a strategy after each round with the peers it found (possibly none,
# e.g. when the lookup failed). The first call marks "first discovery round done".
Propose = Callable[[Iterable[Peer]], None]


class Strategy(Protocol):
    """A discovery strategy. `run` loops until cancelled, calling `propose` each round."""

    async def run(self, propose: Propose) -> None: ...


async def poll_forever(
    poll: Callable[[], Awaitable[Iterable[Peer]]], interval: float, propose: Propose
) -> None:
    """Call `poll` every `interval` s (start to start, no drift) and propose what it finds."""
    next_round = time.monotonic()
    while True:
        propose(await poll())
        next_round = max(next_round + interval, time.monotonic())
        await asyncio.sleep(next_round - time.monotonic())
