"""Run history: the last N runs of each job, with their attempts.

    history = RunHistory(node.scheduler, limit=50)
    history.runs("hi")  # newest first: node, tick, start, duration, status, error, attempts

Fed by the scheduler's stop hook (a hook the application set before is kept) with the
runs this node executed, and by :meth:`RunHistory.add` with runs that peers report or
that the job store loads, so every node of a cluster shows the cluster's history
(``node.jobs.history(name)``, ``/cluster``, ``shoal jobs history NAME``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shoal.jobmodel import RunResult, _dt_required, _int, _opt_str, _str
from shoal.scheduler import Job, Scheduler, add_hook

__all__ = ["RunHistory", "RunRecord"]

STATUSES = ("ok", "error", "timeout", "cancelled")
MAX_ERROR = 2000  # characters of an error kept per run (a peer's record included)


@dataclass(frozen=True)
class RunRecord:
    """One finished run of a job."""

    job: str
    tick: datetime
    node: str
    started_at: datetime
    duration: float
    status: str
    error: str | None
    attempts: int

    @classmethod
    def of(cls, result: RunResult) -> RunRecord:
        return cls(
            job=result.job,
            tick=result.tick,
            node=result.node,
            started_at=result.started_at,
            duration=result.duration,
            status=result.status,
            error=result.error,
            attempts=result.attempts,
        )

    @property
    def key(self) -> tuple[str, datetime, str, datetime]:
        """What tells one run from another (a record heard twice is one run)."""
        return self.job, self.tick, self.node, self.started_at

    def to_wire(self) -> dict[str, Any]:
        """A JSON- and msgpack-able dict (datetimes as UTC ISO-8601)."""
        return {
            "job": self.job,
            "tick": self.tick.astimezone(UTC).isoformat(),
            "node": self.node,
            "started_at": self.started_at.astimezone(UTC).isoformat(),
            "duration": self.duration,
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_wire` (a peer's record); raises ValueError when malformed."""
        try:
            status = _str(data["status"])
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}")
            duration = data["duration"]
            if isinstance(duration, bool) or not isinstance(duration, int | float):
                raise TypeError(f"duration {duration!r} is not a number")
            error = _opt_str(data.get("error"))
            return cls(
                job=_str(data["job"]),
                tick=_dt_required(data["tick"]),
                node=_str(data["node"]),
                started_at=_dt_required(data["started_at"]),
                duration=float(duration),
                status=status,
                error=None if error is None else error[:MAX_ERROR],
                attempts=_int(data.get("attempts", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad run record: {exc}") from exc


class RunHistory:
    """A bounded, in-memory history per job; reading it never blocks the scheduler."""

    def __init__(self, scheduler: Scheduler | None = None, limit: int = 50) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self.limit = limit
        self._runs: dict[str, deque[RunRecord]] = {}
        #: called with each record of a run executed here (replication, the store)
        self.on_record: Callable[[RunRecord], None] | None = None
        if scheduler is not None:
            scheduler.on_job_stop = add_hook(scheduler.on_job_stop, self._on_stop)

    def runs(self, job: str, limit: int | None = None) -> list[RunRecord]:
        """The job's recorded runs, newest first (at most ``limit``)."""
        newest_first = list(reversed(self._runs.get(job, ())))
        return newest_first if limit is None else newest_first[: max(0, limit)]

    def jobs(self) -> list[str]:
        return sorted(self._runs)

    def add(self, record: RunRecord) -> bool:
        """Keep ``record`` in start order unless it is already known; True if it was new."""
        runs = self._runs.setdefault(record.job, deque(maxlen=self.limit))
        if any(r.key == record.key for r in runs):
            return False
        if runs and len(runs) == runs.maxlen and record.started_at < runs[0].started_at:
            return False  # older than everything kept
        runs.append(record)
        if len(runs) > 1 and runs[-2].started_at > record.started_at:
            ordered = sorted(runs, key=lambda r: r.started_at)
            runs.clear()
            runs.extend(ordered)
        return True

    def forget(self, job: str) -> None:
        self._runs.pop(job, None)

    def _on_stop(self, job: Job, result: RunResult) -> None:
        record = RunRecord.of(result)
        if self.add(record) and self.on_record is not None:
            self.on_record(record)
