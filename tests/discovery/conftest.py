"""Fixtures for discovery tests (shared helpers live in tests/support)."""

from __future__ import annotations

from collections.abc import Iterable

from shoal.config import Peer
from tests.support.fixtures import dns_server, procs  # noqa: F401


class Rounds:
    """A `propose` callback that records every round, for assertions."""

    def __init__(self) -> None:
        self.rounds: list[list[Peer]] = []

    def __call__(self, peers: Iterable[Peer]) -> None:
        self.rounds.append(list(peers))

    @property
    def seen(self) -> set[Peer]:
        return {peer for peers in self.rounds for peer in peers}

    @property
    def last(self) -> list[Peer]:
        return self.rounds[-1] if self.rounds else []
