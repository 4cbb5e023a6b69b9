"""Jobs defined at run time: added, removed, paused and resumed on one node, for all.

A run-time job names a *task*, a function every node registered under that name
(``node.jobs.task("report")``): code travels with the image, never over the wire. Each
change is a :class:`JobDef` with a version (a Lamport counter, then the node's name);
every node keeps the newest version of each job's definition and applies it to its own
scheduler, so the nodes converge whatever order the changes arrive in. A removal is kept
as a tombstone, so an older "add" heard later cannot bring the job back.

Pausing and resuming also works for a job defined in code: its JobDef carries only
``active`` (``schedule`` is None). A job defined in code cannot be removed this way (it
would come back at the next start); pause it instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast, get_args

from shoal.cron import DayMatch
from shoal.jobmodel import InvalidJob, Misfire, RunStrategy
from shoal.scheduler import Scheduler

__all__ = ["OPTION_TYPES", "JobDef", "JobDefs", "parse_options"]

log = logging.getLogger("shoal.jobdefs")

MAX_DEFS = 1000  # definitions (tombstones included) a node keeps; more are refused
MAX_NAME = 200  # characters of a job or task name

#: job options a run-time job may set, with their types (as Scheduler.add_job takes them)
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "tz": (str,),
    "overlap": (bool,),
    "timeout": (int, float),
    "misfire": (str,),
    "run_strategy": (str,),
    "day_match": (str,),
    "max_attempts": (int,),
    "backoff": (int, float),
}


@dataclass(frozen=True)
class JobDef:
    """One version of a job's run-time definition (or of a code job's pause state)."""

    name: str
    version: int
    origin: str  # the node that made this version; breaks ties between equal versions
    active: bool = True
    deleted: bool = False
    schedule: str | None = None  # None: the job is defined in code, only `active` is shared
    task: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def order(self) -> tuple[int, str]:
        return self.version, self.origin

    @property
    def defined_in_code(self) -> bool:
        """A pause/resume of a job defined in code (a removal is never one)."""
        return self.schedule is None and not self.deleted

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "active": self.active,
            "deleted": self.deleted,
            "schedule": self.schedule,
            "task": self.task,
            "options": dict(self.options),
        }

    @classmethod
    def from_wire(cls, data: Any) -> JobDef:
        """Inverse of :meth:`to_wire` for data from a peer or the store; ValueError if bad."""
        if not isinstance(data, Mapping):
            raise ValueError("a job definition must be a map")
        name, origin = data.get("name"), data.get("origin")
        schedule, task = data.get("schedule"), data.get("task")
        version, options = data.get("version"), data.get("options", {})
        active, deleted = data.get("active", True), data.get("deleted", False)
        if not _is_name(name) or not _is_name(origin):
            raise ValueError("a job definition needs a name and an origin")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"bad version {version!r}")
        if not isinstance(active, bool) or not isinstance(deleted, bool):
            raise ValueError("active and deleted are booleans")
        if (schedule is None) != (task is None):
            raise ValueError("a run-time job has both a schedule and a task")
        if schedule is not None and (not isinstance(schedule, str) or len(schedule) > MAX_NAME):
            raise ValueError(f"bad schedule {schedule!r}")
        if task is not None and not _is_name(task):
            raise ValueError(f"bad task name {task!r}")
        return cls(name, version, origin, active, deleted, schedule, task, check_options(options))


def check_options(options: Any) -> dict[str, Any]:
    """The options, if every key is known and every value has its type; else ValueError."""
    if not isinstance(options, Mapping):
        raise ValueError("options must be a map")
    for key, value in options.items():
        types = OPTION_TYPES.get(key)
        if types is None:
            raise ValueError(f"unknown job option {key!r} (known: {', '.join(OPTION_TYPES)})")
        if value is None and key in ("timeout", "tz", "day_match"):
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"job option {key}={value!r} has the wrong type")
    if options.get("day_match") not in (None, *get_args(DayMatch)):
        raise ValueError(f"day_match must be one of {', '.join(get_args(DayMatch))}")
    return dict(options)


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["max_attempts=3", "overlap=true", "timeout=none"]`` as typed job options."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        types = OPTION_TYPES.get(key)
        if not sep or types is None:
            raise ValueError(
                f"expected KEY=VALUE with KEY one of {', '.join(OPTION_TYPES)}, got {pair!r}"
            )
        options[key] = _parse_value(key, text.strip(), types)
    return check_options(options)


def _parse_value(key: str, text: str, types: tuple[type, ...]) -> Any:
    if text.lower() in ("none", "null") and key in ("timeout", "tz", "day_match"):
        return None
    if bool in types:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{key} takes true or false, got {text!r}")
    try:
        if int in types and float not in types:
            return int(text)
        if float in types:
            return float(text)
    except ValueError:
        raise ValueError(f"{key} takes a number, got {text!r}") from None
    return text


def _is_name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()


class JobDefs:
    """The newest known definition of each run-time job, applied to one scheduler."""

    def __init__(self, scheduler: Scheduler, node: str) -> None:
        self.scheduler = scheduler
        self.node = node
        self.tasks: dict[str, Callable[..., Any]] = {}
        self._defs: dict[str, JobDef] = {}
        self._added: set[str] = set()  # jobs this registry put in the scheduler
        self._clock = 0

    def task(self, name: str, fn: Callable[..., Any]) -> None:
        """Make ``fn`` what run-time jobs naming task ``name`` run; applies waiting jobs."""
        if not _is_name(name):
            raise InvalidJob(f"bad task name {name!r}")
        self.tasks[name] = fn
        for spec in list(self._defs.values()):
            if spec.task == name and not spec.deleted and spec.name not in self.scheduler:
                self._apply(spec)

    def get(self, name: str) -> JobDef | None:
        return self._defs.get(name)

    def all(self) -> list[JobDef]:
        return sorted(self._defs.values(), key=lambda d: d.name)

    def next(self, name: str, **fields: Any) -> JobDef:
        """A new version of ``name``'s definition with ``fields`` changed (not adopted yet)."""
        if name not in self._defs and len(self._defs) >= MAX_DEFS:
            raise InvalidJob(f"too many run-time job definitions (at most {MAX_DEFS})")
        current = self._defs.get(name)
        base: dict[str, Any] = (
            {}
            if current is None or current.deleted
            else {
                "active": current.active,
                "schedule": current.schedule,
                "task": current.task,
                "options": current.options,
            }
        )
        base.update(fields)
        return JobDef(name=name, version=self._clock + 1, origin=self.node, **base)

    def adopt(self, spec: JobDef) -> bool:
        """Keep ``spec`` if it is newer than what is known and apply it; True if it was."""
        self._clock = max(self._clock, spec.version)
        current = self._defs.get(spec.name)
        if current is not None and spec.order <= current.order:
            return False
        if current is None and len(self._defs) >= MAX_DEFS:
            log.warning("job definition %r dropped: %d definitions already", spec.name, MAX_DEFS)
            return False
        self._defs[spec.name] = spec
        self._apply(spec, current)
        return True

    def _apply(self, spec: JobDef, previous: JobDef | None = None) -> None:
        """Make this node's scheduler match ``spec`` (errors are logged: a peer's
        definition that does not fit here must not break the node)."""
        name, scheduler = spec.name, self.scheduler
        try:
            if spec.deleted:
                if name in self._added:
                    self._added.discard(name)
                    scheduler.delete_job(name)
                    log.info("run-time job %r removed", name)
                return
            if spec.defined_in_code:
                if name in scheduler:
                    if spec.active:
                        scheduler.activate_job(name)
                    else:
                        scheduler.deactivate_job(name)
                return
            if name in scheduler and name not in self._added:
                log.warning("run-time job %r ignored: a job defined in code has that name", name)
                return
            same = (
                previous is not None
                and not previous.deleted
                and (previous.schedule, previous.task, previous.options)
                == (spec.schedule, spec.task, spec.options)
                and name in scheduler
            )
            if same:
                if spec.active:
                    scheduler.activate_job(name)
                else:
                    scheduler.deactivate_job(name)
                return
            fn = self.tasks.get(spec.task or "")
            if fn is None:
                log.warning(
                    "run-time job %r needs task %r, which this node does not have; "
                    "it does not run here",
                    name,
                    spec.task,
                )
                return
            if name in self._added:
                self._added.discard(name)
                scheduler.delete_job(name)
            assert spec.schedule is not None
            options = dict(spec.options)
            scheduler.add_job(
                spec.schedule,
                fn,
                name=name,
                tz=options.pop("tz", None),
                active=spec.active,
                misfire=cast(Misfire, options.pop("misfire", "skip")),  # add_job checks
                run_strategy=cast(RunStrategy, options.pop("run_strategy", "cluster")),
                **options,
            )
            self._added.add(name)
            log.info("run-time job %r: %s, task %r", name, spec.schedule, spec.task)
        except (ValueError, TypeError) as exc:
            log.warning("run-time job %r not applied here: %s", name, exc)
