"""Reading the `hi` job's log lines back: which node ran which tick, and when.

`hi` logs `2026-11-30T02:00:05.001+00:00 INFO    hi.jobs: Job running on: NODE with
cookie ...` at the start of every run and `Job done on: NODE ...` at its end; the job
runs within milliseconds of its tick, so the start time rounded down is the tick for a
one-second schedule. Times are read as seconds since local midnight (the tests compare
them with `time.localtime()`); the stamp's date and zone are accepted and not needed,
and undated `HH:MM:SS.mmm` stamps (older builds) are read too.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

#: A line's leading stamp: optional ISO date, the local time of day, optional UTC offset.
STAMP = r"(?:\d{4}-\d\d-\d\dT)?(?P<time>\d\d:\d\d:\d\d\.\d{3})(?:Z|[+-]\d\d:\d\d)?"
LINE = re.compile(rf"^{STAMP} \S+\s+hi\.jobs: Job (?P<what>running|done) on: (?P<node>\S+)")
TOKEN = re.compile(
    rf"^{STAMP} .*singleton shoal\.scheduler: running on (?P<node>\S+) "
    r"\(mode (?P<mode>\w+), token (?P<token>\d+)\)"
)


@dataclass(frozen=True)
class Run:
    node: str
    started: float  # seconds since midnight
    ended: float | None

    @property
    def tick(self) -> int:
        return int(self.started)


def parse_stamp(text: str) -> float:
    """Seconds since midnight of a `HH:MM:SS.mmm` log stamp."""
    parsed = datetime.strptime(text, "%H:%M:%S.%f")
    return parsed.hour * 3600 + parsed.minute * 60 + parsed.second + parsed.microsecond / 1e6


def runs(outputs: list[str]) -> list[Run]:
    """All job runs found in the given node outputs, ordered by start time."""
    found: list[Run] = []
    for output in outputs:
        open_runs: list[tuple[str, float]] = []
        for line in output.splitlines():
            match = LINE.match(line)
            if not match:
                continue
            at = parse_stamp(match["time"])
            if match["what"] == "running":
                open_runs.append((match["node"], at))
            elif open_runs:
                node, started = open_runs.pop(0)
                found.append(Run(node, started, at))
        found.extend(Run(node, started, None) for node, started in open_runs)
    return sorted(found, key=lambda r: r.started)


def ticks_between(found: list[Run], first: int, last: int) -> Counter[int]:
    """How many runs each tick in [first, last] had (zero-count ticks included)."""
    counts: Counter[int] = Counter({tick: 0 for tick in range(first, last + 1)})
    for run in found:
        if first <= run.tick <= last:
            counts[run.tick] += 1
    return counts


def tokens(outputs: list[str]) -> list[tuple[float, str, int]]:
    """(time, node, fencing token) of every scheduler takeover, in time order."""
    found = []
    for output in outputs:
        for line in output.splitlines():
            match = TOKEN.match(line)
            if match:
                found.append((parse_stamp(match["time"]), match["node"], int(match["token"])))
    return sorted(found)
