"""Majority confirmation for `quorum`-mode singletons: ballots, promises, confirmed ticks.

Every node is an acceptor, in memory, per singleton name (Paxos-style):

- A holder claims with a ballot `(token, node)` higher than any it has seen; it
  holds only once a majority of the expected cluster *promised* that ballot.
  An acceptor promises only a ballot at least as high as its last promise, so
  once a majority promised a new ballot, no older holder can be confirmed.
- A holder acts (runs a tick, answers `ctx.is_valid()`) only on a *confirmation*
  from a majority, asked after the need arose; an acceptor confirms only the
  ballot it promised (or a higher one, which it then promises).
- A tick is confirmed at most once per job: an acceptor refuses a tick at or
  before the newest tick it confirmed for that job. Two majorities share an
  acceptor, so two confirmations of one tick (by any holders) cannot both
  succeed, whatever the timing.
- A confirmation is good for `window` seconds from when it was *asked*, on the
  holder's monotonic clock, which runs on while a process is paused. A new
  holder waits until `window` has passed since its promisers last said yes
  (promise or confirmation) to any *other* ballot, so the old holder's
  confirmation has lapsed before it starts. An acceptor keeps the time and
  ballot of its last yes per node, so neither a claimant's ballot learned from
  a peer before its own request, nor a retried request, nor a claimant saying
  it holds nothing hides the old holder's; only a node's own word that it
  stopped holding forgets its.
- Acceptors keep no disk state. A restarted node answers nothing for `window`
  seconds (confirmations from before its restart have lapsed by then) and
  refuses ticks due before it started, which it cannot know about.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Ballot = tuple[int, str]
NO_BALLOT: Ballot = (0, "")
# Clock difference between nodes that a tick's due time may carry (seconds).
TICK_SKEW = 1.0


def majority(expected: int) -> int:
    """How many nodes (the holder included) make a strict majority of `expected`."""
    return expected // 2 + 1


def parse_ballot(value: Any) -> Ballot | None:
    """A ballot from the wire (`[token, node]`), or None when malformed."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
        and 0 <= value[0] < 2**62
    ):
        return (value[0], value[1])
    return None


class Acceptor:
    """One node's promises and confirmed ticks, per singleton name."""

    def __init__(
        self,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.clock = clock
        self.wall = wall
        self.started = clock()
        self.started_wall = wall()
        self.promised: dict[str, Ballot] = {}
        self.ticks: dict[tuple[str, str], float] = {}  # (name, job) -> tick
        # name -> node -> (monotonic time, ballot) of our last yes to that node
        self.last_ack: dict[str, dict[str, tuple[float, Ballot]]] = {}

    def _fenced(self) -> bool:
        return self.clock() - self.started < self.window

    def prepare(self, name: str, ballot: Ballot) -> dict[str, Any]:
        """Promise `ballot` if no higher one was promised; say how long ago we last said
        yes to another ballot (None: never, or its node said it stopped holding)."""
        current = self.promised.get(name, NO_BALLOT)
        if self._fenced():
            return {"ok": False, "promised": list(current), "why": "acceptor just started"}
        if ballot < current:
            return {"ok": False, "promised": list(current), "why": "promised a higher ballot"}
        others = [t for t, acked in self.last_ack.get(name, {}).values() if acked != ballot]
        age = self.clock() - max(others) if others else None
        self.promised[name] = ballot
        self._ack(name, ballot)
        return {"ok": True, "promised": list(ballot), "age": age}

    def _ack(self, name: str, ballot: Ballot) -> None:
        self.last_ack.setdefault(name, {})[ballot[1]] = (self.clock(), ballot)

    def confirm(
        self, name: str, ballot: Ballot, job: str | None = None, tick: float | None = None
    ) -> dict[str, Any]:
        """Confirm `ballot` (and record `job`'s `tick`, once) unless a higher one was promised."""
        current = self.promised.get(name, NO_BALLOT)
        if self._fenced():
            return {"ok": False, "promised": list(current), "why": "acceptor just started"}
        if ballot < current:
            return {"ok": False, "promised": list(current), "why": "promised a higher ballot"}
        if ballot > current:
            # Never promised here (we were away): accepting it is a promise too.
            self.promised[name] = ballot
        if job is not None and tick is not None:
            if tick < self.started_wall + TICK_SKEW:
                return {"ok": False, "promised": list(ballot), "why": "tick before acceptor start"}
            if tick <= self.ticks.get((name, job), float("-inf")):
                return {"ok": False, "promised": list(ballot), "why": "tick already confirmed"}
            self.ticks[(name, job)] = tick
        self._ack(name, ballot)
        return {"ok": True, "promised": list(ballot)}

    def learn(self, name: str, ballot: Ballot) -> None:
        """A peer promised `ballot`: never promise below it (covers a restart's lost memory)."""
        if ballot > self.promised.get(name, NO_BALLOT):
            self.promised[name] = ballot

    def released(self, name: str, holder: str) -> None:
        """`holder` says it no longer holds `name`: its past confirmations need no waiting
        out (others' still do, also when `holder`'s ballot is the one promised here)."""
        self.last_ack.get(name, {}).pop(holder, None)

    def highest(self, name: str) -> Ballot:
        return self.promised.get(name, NO_BALLOT)
