"""The job model: what a job is, what the cluster shares about it, and what a run returns.

Plain data and errors, with their wire forms (msgpack- and JSON-able dicts); the engine
that times the ticks is shoal.scheduler, and everything here is re-exported from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from shoal.cron import CronSchedule
from shoal.retries import Retry

__all__ = [
    "InvalidJob",
    "Job",
    "JobExists",
    "JobNotFound",
    "JobNotRun",
    "JobRunning",
    "JobState",
    "Misfire",
    "RunContext",
    "RunResult",
    "RunStatus",
    "RunStrategy",
    "SchedulerError",
]

RunStrategy = Literal["cluster", "all", "random", "local"]
Misfire = Literal["skip", "run_once"]
RunStatus = Literal["ok", "error", "timeout", "cancelled"]

# -- errors ---------------------------------------------------------------------------------


class SchedulerError(Exception):
    """Base of every error the Job API raises."""


class JobNotFound(SchedulerError):
    """No job has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no job named {name!r}")
        self.name = name


class JobExists(SchedulerError):
    """A job with this name is already defined."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a job named {name!r} already exists")
        self.name = name


class JobRunning(SchedulerError):
    """run_now on an overlap=False job whose previous run has not finished."""

    def __init__(self, name: str) -> None:
        super().__init__(f"job {name!r} is still running and does not allow overlap")
        self.name = name


class JobNotRun(SchedulerError):
    """The dispatcher decided not to run the job (or could not tell where it ran)."""


class InvalidJob(SchedulerError, ValueError):
    """A job definition has a bad argument; the message names it."""


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """Passed to a job function that takes one argument: what is running and why."""

    job: str
    tick: datetime
    node: str


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run of a job function, as the node that ran it saw it."""

    job: str
    tick: datetime
    node: str
    started_at: datetime
    finished_at: datetime
    status: RunStatus
    error: str | None = None
    attempts: int = 1  # attempts this one run of the tick made (see Job.retry)

    @property
    def lateness(self) -> float:
        """Seconds between the tick and the moment the job function started."""
        return (self.started_at - self.tick).total_seconds()

    @property
    def duration(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict, for a dispatcher that runs jobs on another node."""
        return {
            "job": self.job,
            "tick": _dt_to_wire(self.tick),
            "node": self.node,
            "started_at": _dt_to_wire(self.started_at),
            "finished_at": _dt_to_wire(self.finished_at),
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RunResult:
        """Inverse of :meth:`to_wire`; raises ValueError on malformed input."""
        try:
            status = data["status"]
            if status not in get_args(RunStatus):
                raise ValueError(f"unknown status {status!r}")
            return cls(
                job=_str(data["job"]),
                tick=_dt_required(data["tick"]),
                node=_str(data["node"]),
                started_at=_dt_required(data["started_at"]),
                finished_at=_dt_required(data["finished_at"]),
                status=status,
                error=_opt_str(data.get("error")),
                attempts=_int(data.get("attempts", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad RunResult wire data: {exc}") from exc


@dataclass
class JobState:
    """What the cluster shares about a job, so any node can take over its schedule.

    ``last_tick`` is the newest scheduled tick that was *started* (a new leader never
    re-runs a tick at or before it); ``last_completed`` the newest tick whose run
    finished (ok or failed). ``running_since``/``running_tick``/``running_on`` are set
    while a run is in flight (``running_on``: the node that launched it); ``ran_on``
    names the node where the last run executed.
    """

    last_tick: datetime | None = None
    last_completed: datetime | None = None
    running_since: datetime | None = None
    running_tick: datetime | None = None
    running_on: str | None = None
    ran_on: str | None = None
    last_run_at: datetime | None = None
    last_status: str | None = None
    last_error: str | None = None
    last_duration: float | None = None
    runs: int = 0
    failures: int = 0

    def copy(self) -> JobState:
        return replace(self)

    def check(self) -> None:
        """Raise ValueError unless every time in it is a timezone-aware datetime.

        The engine compares them with its UTC clock: a naive one would raise TypeError
        later, inside a ticker, far from the code that passed it.
        """
        for name in ("last_tick", "last_completed", "running_since", "running_tick", "last_run_at"):
            value = getattr(self, name)
            aware = isinstance(value, datetime) and value.utcoffset() is not None
            if value is not None and not aware:
                raise ValueError(f"JobState.{name} must be a timezone-aware datetime: {value!r}")

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict: datetimes as UTC ISO-8601 strings, everything else plain."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _dt_to_wire(value) if isinstance(value, datetime) else value
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> JobState:
        """Inverse of :meth:`to_wire`; unknown keys are ignored (newer peers), bad values raise
        ValueError."""
        try:
            duration = data.get("last_duration")
            return cls(
                last_tick=_dt(data.get("last_tick")),
                last_completed=_dt(data.get("last_completed")),
                running_since=_dt(data.get("running_since")),
                running_tick=_dt(data.get("running_tick")),
                running_on=_opt_str(data.get("running_on")),
                ran_on=_opt_str(data.get("ran_on")),
                last_run_at=_dt(data.get("last_run_at")),
                last_status=_opt_str(data.get("last_status")),
                last_error=_opt_str(data.get("last_error")),
                last_duration=None if duration is None else float(duration),
                runs=_int(data.get("runs", 0)),
                failures=_int(data.get("failures", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad JobState wire data: {exc}") from exc


@dataclass(eq=False)
class Job:
    """A job definition. Read it freely; change it only through the Scheduler's methods."""

    name: str
    schedule: CronSchedule
    fn: Callable[..., Any]
    overlap: bool = False
    timeout: float | None = None
    misfire: Misfire = "skip"
    run_strategy: RunStrategy = "cluster"
    active: bool = True
    retry: Retry | None = None  # attempts within one run of a tick (max_attempts, backoff)
    _is_async: bool = field(default=False, repr=False)
    _wants_context: bool = field(default=False, repr=False)

    @property
    def is_cluster(self) -> bool:
        """Cluster jobs run once per cluster and tick only on the leader."""
        return self.run_strategy == "cluster"


def recency(state: JobState) -> tuple[datetime, int, bool]:
    """Orders states of one job from older to newer."""
    tick = state.last_tick or datetime.min.replace(tzinfo=UTC)
    return tick, state.runs, state.running_since is None


def _dt_to_wire(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(value: Any) -> datetime | None:
    if value is None:
        return None
    return _dt_required(value)


def _dt_required(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO-8601 string, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"datetime {value!r} has no UTC offset")
    return parsed


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
