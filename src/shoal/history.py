"""Run history: the last N runs of each job on this node, with their attempts.

    history = RunHistory(node.scheduler, limit=50)
    history.runs("hi")  # newest first: node, tick, start, duration, status, error, attempts

Fed by the scheduler's start/stop hooks (hooks the application set before are kept). A
node records the runs it executed; the cluster-wide view and the durable copy in Postgres
are the job store's part (shoal.jobstore).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shoal import retries
from shoal.scheduler import Job, RunResult, Scheduler

__all__ = ["RunHistory", "RunRecord"]


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


class RunHistory:
    """A bounded, in-memory history per job; reading it never blocks the scheduler."""

    def __init__(self, scheduler: Scheduler, limit: int = 50) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self.limit = limit
        self._runs: dict[str, deque[RunRecord]] = {}
        start, stop = scheduler.on_job_start, scheduler.on_job_stop
        scheduler.on_job_start = _then(self._on_start, start)
        scheduler.on_job_stop = _then(self._on_stop, stop)

    def runs(self, job: str) -> list[RunRecord]:
        """The job's recorded runs, newest first."""
        return list(reversed(self._runs.get(job, ())))

    def _on_start(self, job: Job, tick: datetime) -> None:
        retries.start_run()

    def _on_stop(self, job: Job, result: RunResult) -> None:
        record = RunRecord(
            job=result.job,
            tick=result.tick,
            node=result.node,
            started_at=result.started_at,
            duration=result.duration,
            status=result.status,
            error=result.error,
            attempts=max(1, retries.attempts()),
        )
        self._runs.setdefault(job.name, deque(maxlen=self.limit)).append(record)


def _then(mine: Callable[..., None], theirs: Callable[..., None] | None) -> Callable[..., None]:
    if theirs is None:
        return mine

    def both(*args: Any) -> None:
        mine(*args)
        theirs(*args)

    return both
