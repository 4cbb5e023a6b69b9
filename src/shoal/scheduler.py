"""The cron scheduler engine: decides *when* a job's tick is due and runs it *when told to*.

Where and whether a due tick runs is decided by one overridable hook, the
:class:`Dispatcher`; by default it runs locally. Cluster-strategy jobs (the
default) only tick while the engine is told it leads (:meth:`Scheduler.start_leading`),
resuming from shared :class:`JobState`, so the cluster layer plugs in leadership,
state replication and dispatch without the engine knowing about the mesh.

Timing: each active job has a ticker task that sleeps on the event loop's
monotonic clock until the due wall-clock instant, re-checking the wall clock
(sleeps are capped so clock steps are noticed), then launches the run as its own
task so a slow job never delays the next tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, get_args

import shoal.loop
from shoal import logs, retries
from shoal.cron import CronSchedule, DayMatch, resolve_zone
from shoal.jobmodel import (
    InvalidJob,
    Job,
    JobExists,
    JobNotFound,
    JobNotRun,
    JobRunning,
    JobState,
    Misfire,
    RunContext,
    RunResult,
    RunStatus,
    RunStrategy,
    SchedulerError,
    recency,
)
from shoal.retries import Retry

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = [
    "Dispatcher",
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
    "Scheduler",
    "SchedulerError",
]

log = logging.getLogger("shoal.scheduler")

_MAX_SLEEP = 30.0  # seconds; bounds how long a wall-clock step can go unnoticed
_SPIN = 0.0015  # seconds before a tick when timed sleep hands over to yielding (see _sleep_until)
F = TypeVar("F", bound=Callable[..., Any])


class Dispatcher(Protocol):
    """Decides where (and whether) a due tick runs. The engine awaits it once per tick.

    Run locally with ``await scheduler.run_local(job.name, tick)``; to run elsewhere,
    send ``(job.name, tick)`` to that node, have it call ``run_local`` and return its
    ``RunResult`` (``RunResult.from_wire``). Return None when the tick is not run here
    or the outcome is unknown.
    """

    async def dispatch(self, job: Job, tick: datetime) -> RunResult | None: ...


StartHook = Callable[[Job, datetime], None]
StopHook = Callable[[Job, RunResult], None]
ExceptionHook = Callable[[Job, datetime, BaseException], None]
StateCallback = Callable[[Job, JobState], Awaitable[None] | None]
#: (job, first, last, outcome): the ticks first..last were due while nothing ran them;
#: outcome "on_time" (last runs now, in grace), "run_once" (last runs late), "skip" (none runs)
MissedHook = Callable[[Job, datetime, datetime, str], None]
#: (job, tick, reason): a due tick that is not run ("overlap")
SkippedHook = Callable[[Job, datetime, str], None]
Hook = TypeVar("Hook", bound=Callable[..., None])


def add_hook(existing: Hook | None, added: Hook) -> Hook:
    """A hook that calls `added`, then the `existing` one: metrics, a run history or a job
    store add to a hook the application (or another of them) set, never take it over."""
    if existing is None:
        return added

    def both(*args: Any) -> None:
        added(*args)
        existing(*args)

    return cast(Hook, both)


# -- the engine -----------------------------------------------------------------------------


class Scheduler:
    """Cron scheduler with second resolution on asyncio.

    ``leading``: whether cluster-strategy jobs tick from the start. A clustered node
    leaves it False and lets its singleton call :meth:`start_leading`; a standalone
    program passes True.
    """

    def __init__(
        self,
        *,
        tz: str | ZoneInfo = "UTC",
        node: str | None = None,
        leading: bool = False,
        dispatcher: Dispatcher | None = None,
        state_changed: StateCallback | None = None,
        on_job_start: StartHook | None = None,
        on_job_stop: StopHook | None = None,
        on_job_exception: ExceptionHook | None = None,
        misfire_grace: float = 1.0,
        debug: bool = False,
    ) -> None:
        # UTC is resolved on first use: a node without jobs need not import zoneinfo.
        self._tz = None if tz == "UTC" else resolve_zone(tz)
        self.node = node or socket.gethostname()
        self.dispatcher = dispatcher
        self.state_changed = state_changed
        self.on_job_start = on_job_start
        self.on_job_stop = on_job_stop
        self.on_job_exception = on_job_exception
        self.on_tick_missed: MissedHook | None = None  # for shoal.metrics
        self.on_tick_skipped: SkippedHook | None = None
        self.on_job_deleted: Callable[[Job], None] | None = None  # metrics drop its series
        if misfire_grace < 0:
            raise ValueError(f"misfire_grace must be >= 0 seconds, got {misfire_grace!r}")
        self.misfire_grace = misfire_grace
        self._debug = False
        self.debug = debug
        self._leading = leading
        self._running = False
        self._jobs: dict[str, Job] = {}
        self._states: dict[str, JobState] = {}
        self._tickers: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, set[asyncio.Task[RunResult | None]]] = {}
        # Sync jobs' threads, apart from the loop's default executor (`shoal.loop.in_thread`).
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    # -- switches -----------------------------------------------------------------------------

    @property
    def tz(self) -> ZoneInfo:
        """The zone of jobs added without one."""
        if self._tz is None:
            self._tz = resolve_zone("UTC")
        return self._tz

    @property
    def debug(self) -> bool:
        """When True, every tick decision is logged at DEBUG (and the logger is opened to it)."""
        return self._debug

    @debug.setter
    def debug(self, on: bool) -> None:
        self._debug = on
        if on and not log.isEnabledFor(logging.DEBUG):
            log.setLevel(logging.DEBUG)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def leading(self) -> bool:
        return self._leading

    # -- job API ------------------------------------------------------------------------------

    def job(
        self,
        schedule: str | CronSchedule,
        *,
        name: str | None = None,
        tz: str | ZoneInfo | None = None,
        overlap: bool = False,
        timeout: float | None = None,
        misfire: Misfire = "skip",
        run_strategy: RunStrategy = "cluster",
        active: bool = True,
        day_match: DayMatch | None = None,
        max_attempts: int = 1,
        backoff: float = 1.0,
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`add_job`; returns the function unchanged."""
        if not isinstance(schedule, str | CronSchedule):  # `@node.job` without a schedule
            raise InvalidJob(
                f"job(schedule) takes a cron expression, not {schedule!r}: "
                "write @node.job('*/5 * * * * *')"
            )

        def register(fn: F) -> F:
            self.add_job(
                schedule,
                fn,
                name=name,
                tz=tz,
                overlap=overlap,
                timeout=timeout,
                misfire=misfire,
                run_strategy=run_strategy,
                active=active,
                day_match=day_match,
                max_attempts=max_attempts,
                backoff=backoff,
            )
            return fn

        return register

    def add_job(
        self,
        schedule: str | CronSchedule,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        tz: str | ZoneInfo | None = None,
        overlap: bool = False,
        timeout: float | None = None,
        misfire: Misfire = "skip",
        run_strategy: RunStrategy = "cluster",
        active: bool = True,
        day_match: DayMatch | None = None,
        max_attempts: int = 1,
        backoff: float = 1.0,
    ) -> Job:
        """Define a job; it starts ticking at once if the scheduler runs (and, for cluster jobs,
        leads). ``day_match="and"``: Quantum's day rule (see shoal.cron). Raises CronError for
        a bad schedule or zone, InvalidJob or JobExists."""
        if not callable(fn):
            raise InvalidJob(f"job function must be callable, got {fn!r}")
        job_name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(job_name, str) or not job_name:
            raise InvalidJob(f"job name must be a non-empty string, got {job_name!r}")
        if job_name in self._jobs:
            raise JobExists(job_name)
        if misfire not in get_args(Misfire):
            raise InvalidJob(
                f"job {job_name!r}: misfire must be 'skip' or 'run_once', got {misfire!r}"
            )
        if run_strategy not in get_args(RunStrategy):
            raise InvalidJob(
                f"job {job_name!r}: run_strategy must be one of "
                f"{', '.join(get_args(RunStrategy))}, got {run_strategy!r}"
            )
        for option, flag in (("overlap", overlap), ("active", active)):
            if not isinstance(flag, bool):  # overlap="no" is truthy: the opposite of what was meant
                raise InvalidJob(f"job {job_name!r}: {option} must be True or False, got {flag!r}")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise InvalidJob(f"job {job_name!r}: timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool):
            raise InvalidJob(f"job {job_name!r}: max_attempts must be an int, got {max_attempts!r}")
        try:
            retry = Retry(max_attempts, backoff) if max_attempts != 1 else None
        except (TypeError, ValueError) as exc:
            raise InvalidJob(f"job {job_name!r}: {exc} (max_attempts, backoff)") from None
        if isinstance(schedule, CronSchedule):
            if tz is not None or day_match is not None:
                raise InvalidJob(
                    f"job {job_name!r}: pass tz and day_match to CronSchedule.parse, not both"
                )
            parsed = schedule
        else:
            parsed = CronSchedule.parse(
                schedule, tz if tz is not None else self.tz, day_match=day_match or "crontab"
            )
        job = Job(
            name=job_name,
            schedule=parsed,
            fn=fn,
            overlap=overlap,
            timeout=timeout,
            misfire=misfire,
            run_strategy=run_strategy,
            active=active,
            retry=retry,
            _is_async=_is_async(fn),
            _wants_context=_wants_context(job_name, fn),
        )
        self._jobs[job_name] = job
        self._states.setdefault(job_name, JobState())
        self._inflight.setdefault(job_name, set())
        self._debug_log(
            "job %r added: %s (%s), strategy=%s", job_name, parsed, parsed.tz.key, run_strategy
        )
        self._sync_ticker(job)
        return job

    def delete_job(self, name: str) -> Job:
        """Remove a job; a run in flight finishes (stop() still drains it)."""
        job = self.find_job(name)
        self._stop_ticker(name)
        del self._jobs[name]
        self._states.pop(name, None)
        self._forget_runs(name)
        self._call_hook(self.on_job_deleted, job)
        self._debug_log("job %r deleted", name)
        return job

    def activate_job(self, name: str) -> Job:
        """Resume ticking from now (missed ticks while inactive are not caught up)."""
        job = self.find_job(name)
        if not job.active:
            job.active = True
            self._sync_ticker(job)
        return job

    def deactivate_job(self, name: str) -> Job:
        """Stop ticking; a run in flight finishes."""
        job = self.find_job(name)
        job.active = False
        self._stop_ticker(name)
        return job

    def find_job(self, name: str) -> Job:
        try:
            return self._jobs[name]
        except KeyError:
            raise JobNotFound(name) from None

    def list_jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.name)

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(self.list_jobs())

    def job_state(self, name: str) -> JobState:
        """A copy of the job's current state."""
        self.find_job(name)
        return self._states[name].copy()

    async def run_now(self, name: str) -> RunResult:
        """Run a job once now, through the dispatcher, and wait for its result.

        Does not move the schedule (``last_tick``). Raises JobNotFound, JobRunning (overlap=False
        and a run is in flight) or JobNotRun (the dispatcher did not run it). A job that
        fails still returns its RunResult (status "error"/"timeout").
        """
        job = self.find_job(name)
        task = self._launch(job, datetime.now(UTC), manual=True)
        if task is None:
            raise JobRunning(name)
        result = await task
        if result is None:
            raise JobNotRun(f"job {name!r} was not run by the dispatcher")
        return result

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ticking (needs a running event loop). ``@reboot`` jobs fire now."""
        if self._running:
            return
        self._running = True
        self._debug_log("scheduler starting on %s (leading=%s)", self.node, self._leading)
        for job in self.list_jobs():
            cursor = self._states[job.name].last_tick if job.is_cluster else None
            self._sync_ticker(job, cursor)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop every ticker, let runs in flight finish for up to ``drain_timeout``, cancel
        the rest."""
        self._running = False
        await self._drain(list(self._inflight), drain_timeout)
        if self._threads is not None:  # a sync run still going ends on its own
            self._threads.shutdown(wait=False)
            self._threads = None

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- cluster seam -------------------------------------------------------------------------

    def start_leading(self, state: Mapping[str, JobState] | None = None) -> None:
        """Become the node that ticks cluster jobs, resuming from the shared ``state``.

        For each cluster job the ticker resumes after ``last_tick``: a tick at or before it
        is never run again; ticks missed since then follow the job's misfire policy (run the
        newest once for ``run_once``, drop them for ``skip``; a tick less than
        ``misfire_grace`` late still runs). Without a ``last_tick`` it starts from now.
        A job whose state says a run is in flight elsewhere (``running_since``) is treated as
        running for overlap=False until :meth:`update_state` says otherwise.
        Raises ValueError, adopting nothing, if a state holds a naive datetime.
        """
        for incoming in (state or {}).values():
            incoming.check()
        for name, incoming in (state or {}).items():
            if name in self._jobs:
                self._merge_state(name, incoming)
        if self._leading:
            return
        self._leading = True
        self._debug_log("leading: cluster jobs tick here now")
        for job in self.list_jobs():
            if job.is_cluster:
                self._sync_ticker(job, cursor=self._states[job.name].last_tick)

    async def stop_leading(self, drain_timeout: float = 5.0) -> dict[str, JobState]:
        """Stop ticking cluster jobs; runs in flight get ``drain_timeout`` seconds to finish,
        then are cancelled. Returns the cluster jobs' final states for handing over."""
        self._leading = False
        names = [job.name for job in self.list_jobs() if job.is_cluster]
        await self._drain(names, drain_timeout)
        return {name: self._states[name].copy() for name in names}

    def update_state(self, name: str, state: JobState) -> None:
        """Adopt a replicated state for a job (from the cluster layer).

        An update older than the local state (earlier ``last_tick``, or as late but with fewer
        runs, or running where the local one finished) is ignored, so ``last_tick`` never moves
        backwards. Does not fire ``state_changed``. Raises ValueError for a naive datetime.
        """
        self.find_job(name)
        state.check()
        self._merge_state(name, state)

    def states(self) -> dict[str, JobState]:
        """Copies of every job's state, by job name."""
        return {name: state.copy() for name, state in self._states.items()}

    def jobs_snapshot(self) -> list[dict[str, Any]]:
        """JSON-ready rows for ``/cluster``: what each job is and what it last did."""
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for job in self.list_jobs():
            state = self._states[job.name]
            next_run: datetime | None = None
            if job.active and not job.schedule.is_reboot:
                after = max(now, state.last_tick) if state.last_tick else now
                next_run = job.schedule.next_after(after)
            rows.append(
                {
                    "name": job.name,
                    "schedule": str(job.schedule),
                    "tz": job.schedule.tz.key,
                    "active": job.active,
                    "run_strategy": job.run_strategy,
                    "overlap": job.overlap,
                    "misfire": job.misfire,
                    "timeout": job.timeout,
                    "max_attempts": job.retry.max_attempts if job.retry else 1,
                    "last_run": _iso(state.last_run_at),
                    "last_tick": _iso(state.last_tick),
                    "last_completed": _iso(state.last_completed),
                    "last_status": state.last_status,
                    "last_error": state.last_error,
                    "next_run": _iso(next_run),
                    "ran_on": state.ran_on,
                    "running": self._busy(job),
                    "runs": state.runs,
                    "failures": state.failures,
                }
            )
        return rows

    # -- running a job here -------------------------------------------------------------------

    async def run_local(self, name: str, tick: datetime) -> RunResult:
        """Run the job function on this node now: timeout, hooks, error logging.

        The default dispatch; a cluster dispatcher calls it on the node it chose. Errors and
        timeouts are returned as the result's status, never raised; cancellation propagates.
        """
        return await self._run(self.find_job(name), tick)

    async def _run(self, job: Job, tick: datetime) -> RunResult:
        name = job.name
        started = datetime.now(UTC)
        self._debug_log(
            "job %r tick %s starting, %.1f ms late",
            name,
            tick.isoformat(),
            (started - tick).total_seconds() * 1000,
        )
        attempts = retries.start_run()  # this run's own counter (its task's context)
        self._call_hook(self.on_job_start, job, tick)
        status: RunStatus = "ok"
        error: str | None = None
        deadline = asyncio.timeout(job.timeout)
        try:
            async with deadline:
                await self._call_job(job, tick)
        except asyncio.CancelledError:
            log.warning("job %r (tick %s) cancelled", name, tick.isoformat())
            cancelled = self._result(job, tick, started, "cancelled", "cancelled", attempts[0])
            self._call_hook(self.on_job_stop, job, cancelled)
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                status, error = "timeout", f"timed out after {job.timeout} s"
                log.error(
                    "job %r (tick %s) timed out after %s s and was cancelled%s",
                    name,
                    tick.isoformat(),
                    job.timeout,
                    "" if job._is_async else " (its thread runs on; it cannot be stopped)",
                )
            else:
                status = "error"
                error = "".join(traceback.format_exception_only(exc)).strip()
                log.error("job %r (tick %s) raised", name, tick.isoformat(), exc_info=exc)
            self._call_hook(self.on_job_exception, job, tick, exc)
        result = self._result(job, tick, started, status, error, attempts[0])
        self._debug_log(
            "job %r tick %s finished: %s in %.3f s", name, tick.isoformat(), status, result.duration
        )
        self._call_hook(self.on_job_stop, job, result)
        return result

    async def _call_job(self, job: Job, tick: datetime) -> None:
        """One attempt, or (with ``job.retry``) attempts until one succeeds or it gives up;
        all within this one run of the tick."""
        if job.retry is None:
            retries.count_attempt(1)
            await self._call_once(job, tick)
        else:
            await retries.call_async(job.retry, job.name, lambda: self._call_once(job, tick))

    async def _call_once(self, job: Job, tick: datetime) -> None:
        args: tuple[Any, ...] = (
            (RunContext(job.name, tick, self.node),) if job._wants_context else ()
        )
        if job._is_async:
            await job.fn(*args)
            return
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="shoal-job")
        outcome = await shoal.loop.in_thread(self._threads, job.fn, *args)
        if inspect.isawaitable(outcome):
            await outcome

    def _result(
        self,
        job: Job,
        tick: datetime,
        started: datetime,
        status: RunStatus,
        error: str | None,
        attempts: int,
    ) -> RunResult:
        finished = datetime.now(UTC)
        return RunResult(
            job.name, tick, self.node, started, finished, status, error, max(1, attempts)
        )

    # -- tick machinery -----------------------------------------------------------------------

    def _should_tick(self, job: Job) -> bool:
        return self._running and job.active and (self._leading or not job.is_cluster)

    def _sync_ticker(self, job: Job, cursor: datetime | None = None) -> None:
        """Start the job's ticker if it should tick and has none."""
        if not self._should_tick(job) or job.name in self._tickers:
            return
        task = asyncio.get_running_loop().create_task(
            self._ticker(job, cursor), name=f"shoal.scheduler.ticker:{job.name}"
        )
        self._tickers[job.name] = task
        task.add_done_callback(lambda t: self._ticker_done(job.name, t))

    def _ticker_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tickers.get(name) is task:
            del self._tickers[name]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "ticker of job %r crashed; the job no longer ticks", name, exc_info=task.exception()
            )

    def _stop_ticker(self, name: str) -> asyncio.Task[None] | None:
        task = self._tickers.pop(name, None)
        if task is not None:
            task.cancel()
        return task

    async def _ticker(self, job: Job, cursor: datetime | None) -> None:
        """Sleep to each due tick and launch it; apply the misfire policy after a gap."""
        schedule = job.schedule
        state = self._states[job.name]
        if schedule.is_reboot:
            if state.last_tick is None:
                self._launch(job, datetime.now(UTC))
            return
        if cursor is None:
            cursor = datetime.now(UTC)
        if state.last_tick is not None and state.last_tick > cursor:
            cursor = state.last_tick  # another node's clock may run a little ahead
        while True:
            due = schedule.next_after(cursor)
            if due is None:
                log.info("job %r: schedule %s has no further fire times", job.name, schedule)
                return
            if due.timestamp() > time.time():
                await _sleep_until(due.timestamp())
            now = datetime.now(UTC)
            if due.timestamp() > now.timestamp() - self.misfire_grace:
                self._launch(job, due)
                cursor = due
                continue
            latest = schedule.latest_in(cursor, now) or due
            if latest.timestamp() > now.timestamp() - self.misfire_grace:
                self._call_hook(self.on_tick_missed, job, due, latest, "on_time")
                log.warning(
                    "job %r: missed ticks from %s to before %s skipped",
                    job.name,
                    due.isoformat(),
                    latest.isoformat(),
                )
                self._launch(job, latest)
            elif job.misfire == "run_once":
                self._call_hook(self.on_tick_missed, job, due, latest, "run_once")
                log.warning(
                    "job %r: missed ticks %s..%s; running once to catch up",
                    job.name,
                    due.isoformat(),
                    latest.isoformat(),
                )
                self._launch(job, latest)
            else:
                self._call_hook(self.on_tick_missed, job, due, latest, "skip")
                log.warning(
                    "job %r: missed ticks %s..%s skipped (misfire=skip)",
                    job.name,
                    due.isoformat(),
                    latest.isoformat(),
                )
            cursor = latest

    def _busy(self, job: Job) -> bool:
        """A run is in flight here, or the shared state says one is in flight elsewhere."""
        return (
            bool(self._inflight.get(job.name)) or self._states[job.name].running_since is not None
        )

    def _launch(
        self, job: Job, tick: datetime, manual: bool = False
    ) -> asyncio.Task[RunResult | None] | None:
        """Claim a tick and start its run task; None if overlap=False forbids it.

        Synchronous, so the overlap check and the claim cannot interleave with another launch.
        """
        state = self._states[job.name]
        if not manual and state.last_tick is not None and tick <= state.last_tick:
            self._debug_log(
                "job %r: tick %s already started (last_tick %s); not again",
                job.name,
                tick.isoformat(),
                state.last_tick.isoformat(),
            )
            return None
        if not job.overlap and self._busy(job):
            if not manual:
                self._call_hook(self.on_tick_skipped, job, tick, "overlap")
            log.warning(
                "job %r: tick %s skipped, previous run still running (overlap=False)",
                job.name,
                tick.isoformat(),
            )
            return None
        if not manual:
            state.last_tick = tick
        state.running_since = datetime.now(UTC)
        state.running_tick = tick
        state.running_on = self.node
        task = asyncio.get_running_loop().create_task(
            self._fire(job, tick), name=f"shoal.scheduler.run:{job.name}"
        )
        inflight = self._inflight[job.name]
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        task.add_done_callback(lambda _task: self._forget_runs(job.name))
        return task

    def _forget_runs(self, name: str) -> None:
        """Drop a deleted job's run set once empty: run-time jobs with ever-new names would
        otherwise leave one each, for good. Kept while a run of it may still be drained."""
        if name not in self._jobs and not self._inflight.get(name):
            self._inflight.pop(name, None)

    async def _fire(self, job: Job, tick: datetime) -> RunResult | None:
        """Report the start, dispatch, record the outcome, report it."""
        logs.bind(job=job.name, tick=tick.isoformat())  # this run's task only
        state = self._states[job.name]
        try:
            await self._emit(job, state)
        except asyncio.CancelledError:
            # Cancelled before it ran (a drain while the start was being saved): its
            # running marker must not outlive it, or every node keeps skipping the job
            # (overlap=False) on a run that never was, re-sent each time peers reconnect.
            self._clear_running(job, state)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._emit(job, state))
            raise
        except Exception:
            log.exception(
                "job %r: state_changed failed for tick %s; not running it",
                job.name,
                tick.isoformat(),
            )
            self._clear_running(job, state)
            return None
        result: RunResult | None = None
        try:
            if self.dispatcher is None:
                result = await self._run(job, tick)
            else:
                result = await self.dispatcher.dispatch(job, tick)
        except asyncio.CancelledError:
            self._clear_running(job, state)
            state.last_status = "cancelled"
            with contextlib.suppress(Exception):
                await asyncio.shield(self._emit(job, state))
            raise
        except Exception:
            log.exception("job %r: dispatcher failed for tick %s", job.name, tick.isoformat())
            state.last_status, state.last_error = "error", "dispatcher failed"
        self._clear_running(job, state)
        if tick == state.last_tick:
            state.last_completed = tick
        if result is not None:
            state.ran_on = result.node
            state.last_run_at = result.started_at
            state.last_status = result.status
            state.last_error = result.error
            state.last_duration = result.duration
            state.runs += 1
            state.failures += result.status != "ok"
        try:
            await self._emit(job, state)
        except Exception:
            log.exception("job %r: state_changed failed after tick %s", job.name, tick.isoformat())
        return result

    def _clear_running(self, job: Job, state: JobState) -> None:
        if len(self._inflight.get(job.name, ())) <= 1:
            state.running_since = state.running_tick = None
            state.running_on = None

    async def _emit(self, job: Job, state: JobState) -> None:
        if self.state_changed is None:
            return
        outcome = self.state_changed(job, state.copy())
        if inspect.isawaitable(outcome):
            await outcome

    async def _drain(self, names: list[str], drain_timeout: float) -> None:
        tickers = [t for name in names if (t := self._stop_ticker(name)) is not None]
        await asyncio.gather(*tickers, return_exceptions=True)
        runs = [task for name in names for task in self._inflight.get(name, ())]
        if not runs:
            return
        _, pending = await asyncio.wait(runs, timeout=drain_timeout)
        for task in pending:
            log.warning(
                "%s still running after the %.1f s drain; cancelling it",
                task.get_name(),
                drain_timeout,
            )
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _merge_state(self, name: str, incoming: JobState) -> None:
        """Adopt ``incoming`` unless it is older than what this node knows.

        Newer means: a later ``last_tick``, else more runs, else finished rather than running.
        Runs in flight here keep their running fields; a running marker naming this node
        while nothing is in flight here is a stale echo of an earlier run and is dropped.
        """
        current = self._states.get(name, JobState())
        if recency(incoming) < recency(current):
            self._debug_log("job %r: ignoring a stale state update", name)
            return
        merged = incoming.copy()
        if self._inflight.get(name):
            merged.running_since = current.running_since
            merged.running_tick = current.running_tick
            merged.running_on = current.running_on
        elif merged.running_on == self.node:
            merged.running_since = merged.running_tick = merged.running_on = None
        if name not in self._states:
            self._states[name] = merged
            return
        # In place: a run in flight holds this object and clears its running fields
        # when it ends; a replaced object would keep them, and the job would look
        # busy for ever (overlap=False then skips every later tick).
        for f in fields(JobState):
            setattr(self._states[name], f.name, getattr(merged, f.name))

    # -- helpers ------------------------------------------------------------------------------

    def _call_hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("scheduler hook %r failed", hook)

    def _debug_log(self, msg: str, *args: Any) -> None:
        if self._debug:
            log.debug(msg, *args)


async def _sleep_until(deadline: float) -> None:
    """Sleep until the wall clock reads ``deadline`` (epoch seconds).

    The remaining wall time is mapped onto the loop's monotonic clock. The selector rounds
    its timeout up to whole milliseconds and the two clocks drift apart slightly, so the
    timer aims ``_SPIN`` early and the last stretch yields to the loop (``sleep(0)``) until
    the wall clock is there: lateness stays well under a millisecond on an idle machine.
    """
    loop = asyncio.get_running_loop()
    while (remaining := deadline - time.time()) > _SPIN:
        woken: asyncio.Future[None] = loop.create_future()
        delay = min(remaining - _SPIN, _MAX_SLEEP)
        timer = loop.call_at(loop.time() + delay, _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
    while time.time() < deadline:  # noqa: ASYNC110 - a deliberate sub-ms final approach
        await asyncio.sleep(0)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _is_async(fn: Callable[..., Any]) -> bool:
    # Also callable objects whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _wants_context(name: str, fn: Callable[..., Any]) -> bool:
    """A job function takes no argument, or one: the RunContext."""
    try:
        # The function itself, not what functools.wraps says it wraps (a decorator may
        # supply the argument), unless it passes on whatever it gets (*args).
        params = inspect.signature(fn, follow_wrapped=False).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 1 or any(p.default is p.empty and p.kind == p.KEYWORD_ONLY for p in params):
        raise InvalidJob(f"job {name!r}: the function must take no argument or one (RunContext)")
    return len(required) == 1


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
