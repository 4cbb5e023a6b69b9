"""The Scheduler's API surface without waiting for ticks: options, snapshots, run_local."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shoal.scheduler import (
    InvalidJob,
    Job,
    JobNotFound,
    JobNotRun,
    JobRunning,
    JobState,
    RunContext,
    RunResult,
    Scheduler,
)
from tests.support.procs import async_wait_until


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    s = Scheduler(node="node-a@127.0.0.2")
    yield s
    await s.stop(drain_timeout=0.5)


def test_the_decorator_passes_every_option_and_has_add_jobs_defaults() -> None:
    s = Scheduler()

    @s.job(
        "0 0 15 * MON",
        name="all-options",
        overlap=True,
        active=False,
        day_match="and",
        max_attempts=3,
        backoff=0.5,
    )
    def everything() -> None:
        pass

    job = s.find_job("all-options")
    assert job.overlap and not job.active and job.schedule.day_match == "and"
    assert job.retry is not None and (job.retry.max_attempts, job.retry.backoff) == (3, 0.5)

    @s.job("@daily")
    def plain() -> None:
        pass

    @s.job("@daily", max_attempts=2)
    def retried() -> None:
        pass

    added = s.add_job("@daily", plain, name="added")
    decorated = s.find_job("plain")
    for field in ("overlap", "timeout", "misfire", "run_strategy", "active", "retry"):
        assert getattr(decorated, field) == getattr(added, field), field
    assert decorated.retry is None and decorated.schedule.day_match == "crontab"
    retry, added_retry = (
        s.find_job("retried").retry,
        s.add_job("@daily", retried, name="r2", max_attempts=2).retry,
    )
    assert retry is not None and added_retry is not None and retry.backoff == added_retry.backoff
    assert [job.name for job in s] == ["added", "all-options", "plain", "r2", "retried"]


async def test_run_now_names_the_job_that_is_still_running(scheduler: Scheduler) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await release.wait()

    scheduler.add_job("@daily", slow, name="slow")
    first = asyncio.create_task(scheduler.run_now("slow"))
    await asyncio.wait_for(started.wait(), 5.0)
    with pytest.raises(JobRunning, match="'slow'"):
        await scheduler.run_now("slow")
    release.set()
    assert (await asyncio.wait_for(first, 5.0)).status == "ok"


async def test_a_dispatcher_runs_the_tick_here_through_run_local(scheduler: Scheduler) -> None:
    """The documented way for a dispatcher to run a tick on this node: `run_local`."""
    seen: list[RunContext] = []
    dispatched: list[tuple[str, datetime]] = []

    class Here:
        async def dispatch(self, job: Job, tick: datetime) -> RunResult | None:
            dispatched.append((job.name, tick))
            if job.name == "nowhere":
                return None
            return await scheduler.run_local(job.name, tick)

    scheduler.dispatcher = Here()
    scheduler.add_job("@daily", seen.append, name="report")
    scheduler.add_job("@daily", seen.append, name="nowhere")
    result = await scheduler.run_now("report")
    assert result.status == "ok" and result.node == scheduler.node and result.job == "report"
    assert [ctx.job for ctx in seen] == ["report"] and seen[0].tick == result.tick
    assert dispatched == [("report", result.tick)]
    with pytest.raises(JobNotRun, match="'nowhere'"):
        await scheduler.run_now("nowhere")
    with pytest.raises(JobNotFound):
        await scheduler.run_local("missing", datetime.now(UTC))


async def test_jobs_snapshot_next_run_follows_activity_reboot_and_a_tick_ahead(
    scheduler: Scheduler,
) -> None:
    """No next run for an inactive or an @reboot job; when the last tick (another node's
    clock) is ahead of this one, the next run is the one after it, never a repeat."""
    scheduler.add_job("@reboot", lambda: None, name="boot")
    scheduler.add_job("@hourly", lambda: None, name="paused", active=False)
    scheduler.add_job("@hourly", lambda: None, name="ahead", overlap=True)
    ahead = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=3)
    scheduler.update_state("ahead", JobState(last_tick=ahead))
    completed = ahead - timedelta(hours=1)
    scheduler.update_state("boot", JobState(last_tick=completed, last_completed=completed))
    rows = {row["name"]: row for row in scheduler.jobs_snapshot()}
    assert rows["boot"]["last_completed"] == completed.isoformat()
    assert rows["boot"]["next_run"] is None and rows["paused"]["next_run"] is None
    assert rows["paused"]["active"] is False and rows["paused"]["overlap"] is False
    assert rows["ahead"]["overlap"] is True and rows["ahead"]["max_attempts"] == 1
    assert datetime.fromisoformat(rows["ahead"]["next_run"]) == ahead + timedelta(hours=1)
    assert rows["ahead"]["last_tick"] == ahead.isoformat()


async def test_overlapping_runs_keep_the_job_running_until_the_last_one_ends(
    scheduler: Scheduler,
) -> None:
    gates: list[asyncio.Event] = []

    async def held() -> None:
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()

    scheduler.add_job("@daily", held, name="both", overlap=True)
    runs = [asyncio.create_task(scheduler.run_now("both")) for _ in range(2)]
    await async_wait_until(lambda: len(gates) == 2, 5.0)
    gates[0].set()
    await asyncio.wait_for(runs[0], 5.0)
    assert scheduler.job_state("both").running_since is not None
    assert scheduler.jobs_snapshot()[0]["running"] is True
    gates[1].set()
    await asyncio.wait_for(runs[1], 5.0)
    state = scheduler.job_state("both")
    assert (state.running_since, state.running_tick, state.running_on) == (None, None, None)
    assert scheduler.jobs_snapshot()[0]["running"] is False and state.runs == 2


async def test_outcomes_are_counted_and_reported(scheduler: Scheduler) -> None:
    """What `/cluster` shows of a job: runs, failures, the last status and error; a manual
    run neither moves the schedule nor completes a tick."""
    calls: list[int] = []
    reported: list[JobState] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first call fails")

    async def report(job: Job, state: JobState) -> None:
        reported.append(state)

    scheduler.state_changed = report
    scheduler.add_job("@daily", flaky, name="flaky", timeout=30, misfire="run_once")
    failed = await scheduler.run_now("flaky")
    assert failed.status == "error" and "first call fails" in str(failed.error)
    state = scheduler.job_state("flaky")
    assert (state.runs, state.failures, state.last_status) == (1, 1, "error")
    assert state.last_error == failed.error and state.ran_on == scheduler.node
    assert scheduler.jobs_snapshot()[0]["last_error"] == failed.error
    ok = await scheduler.run_now("flaky")
    assert ok.status == "ok" and ok.error is None
    state = scheduler.job_state("flaky")
    assert (state.runs, state.failures, state.last_status, state.last_error) == (2, 1, "ok", None)
    assert state.last_tick is None and state.last_completed is None
    assert state.last_run_at == ok.started_at and state.last_duration == ok.duration
    (row,) = scheduler.jobs_snapshot()
    assert (row["runs"], row["failures"], row["last_status"]) == (2, 1, "ok")
    assert (row["timeout"], row["misfire"], row["last_completed"]) == (30, "run_once", None)
    # Each run is reported as it starts (running) and as it ends.
    assert [s.running_since is not None for s in reported] == [True, False, True, False]
    assert [s.runs for s in reported] == [0, 1, 1, 2]


async def test_a_failing_dispatcher_is_an_error_and_the_job_is_free_again(
    scheduler: Scheduler,
) -> None:
    class Broken:
        async def dispatch(self, job: Job, tick: datetime) -> RunResult | None:
            raise ConnectionError("no route")

    scheduler.dispatcher = Broken()
    scheduler.add_job("@daily", lambda: None, name="remote")
    with pytest.raises(JobNotRun):
        await scheduler.run_now("remote")
    state = scheduler.job_state("remote")
    assert (state.last_status, state.last_error) == ("error", "dispatcher failed")
    assert state.running_since is None and state.runs == 0
    with pytest.raises(JobNotRun):  # not JobRunning: nothing is left running
        await scheduler.run_now("remote")


async def test_job_functions_of_every_supported_shape(scheduler: Scheduler) -> None:
    seen: list[str] = []

    class AsyncCallable:
        async def __call__(self, ctx: RunContext) -> None:
            seen.append(f"object {ctx.job}")

    def with_default(ctx: RunContext, extra: int = 1) -> None:
        seen.append(f"default {ctx.job} {extra}")

    async def no_args() -> None:
        seen.append("none")

    def returns_awaitable() -> Any:
        async def later() -> None:
            seen.append("awaited")

        return later()

    scheduler.add_job("@daily", AsyncCallable(), name="obj")
    scheduler.add_job("@daily", with_default, name="dflt")
    scheduler.add_job("@daily", no_args, name="none")
    scheduler.add_job("@daily", returns_awaitable, name="aw")
    for name in ("obj", "dflt", "none", "aw"):
        assert (await scheduler.run_now(name)).status == "ok", name
    assert seen == ["object obj", "default dflt 1", "none", "awaited"]

    def keyword_only(*, flag: bool) -> None:
        pass

    def two(a: int, b: int) -> None:
        pass

    for bad in (keyword_only, two):
        with pytest.raises(InvalidJob, match="no argument or one"):
            scheduler.add_job("@daily", bad)


def test_a_negative_misfire_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="misfire_grace"):
        Scheduler(misfire_grace=-0.5)
    assert Scheduler(misfire_grace=0).misfire_grace == 0


async def test_a_missed_tick_still_within_the_grace_runs_whatever_the_policy() -> None:
    """A leader that took over late runs the newest missed tick if it is less than
    `misfire_grace` late, even with misfire="skip", and reports the older ones as missed."""
    scheduler = Scheduler(node="node-a@127.0.0.2", misfire_grace=60.0)
    missed: list[tuple[datetime, datetime, str]] = []
    scheduler.on_tick_missed = lambda job, first, last, outcome: missed.append(
        (first, last, outcome)
    )
    ran: list[datetime] = []
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    scheduler.add_job(
        f"{newest.second} * * * * *", lambda ctx: ran.append(ctx.tick), name="late"
    )  # misfire="skip"
    await scheduler.start()
    try:
        scheduler.start_leading({"late": JobState(last_tick=newest - timedelta(minutes=4))})
        await async_wait_until(lambda: ran == [newest], 5.0)
        assert missed == [(newest - timedelta(minutes=3), newest, "on_time")]
        assert scheduler.job_state("late").last_tick == newest
    finally:
        await scheduler.stop(drain_timeout=0.5)


async def test_a_standalone_scheduler_resumes_from_a_restored_state_at_start() -> None:
    """leading=True (a program without a cluster): start() resumes cluster jobs after the
    restored last tick, so a missed tick is caught up once (run_once)."""
    scheduler = Scheduler(node="solo", leading=True)
    ran: list[datetime] = []
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    scheduler.add_job(
        f"{newest.second} * * * * *",
        lambda ctx: ran.append(ctx.tick),
        name="nightly",
        misfire="run_once",
    )
    scheduler.update_state("nightly", JobState(last_tick=newest - timedelta(minutes=2)))
    await scheduler.start()
    try:
        await async_wait_until(lambda: ran == [newest], 5.0, message="the catch-up run")
        assert scheduler.leading and scheduler.running
    finally:
        await scheduler.stop(drain_timeout=0.5)
    assert scheduler.running is False


async def test_leading_again_adopts_the_newer_state_and_job_state_is_a_copy(
    scheduler: Scheduler,
) -> None:
    scheduler.add_job("@daily", lambda: None, name="daily")
    scheduler.add_job("@daily", lambda: None, name="here", run_strategy="local")
    await scheduler.start()
    tick = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    scheduler.start_leading({"daily": JobState(last_tick=tick - timedelta(days=1))})
    scheduler.start_leading({"daily": JobState(last_tick=tick, runs=5), "gone": JobState()})
    assert scheduler.job_state("daily").last_tick == tick and scheduler.leading
    copy = scheduler.job_state("daily")
    copy.runs = 99
    scheduler.states()["daily"].runs = 98
    assert scheduler.job_state("daily").runs == 5
    handed_over = await scheduler.stop_leading(drain_timeout=0.5)
    assert set(handed_over) == {"daily"} and handed_over["daily"].runs == 5
    assert scheduler.leading is False


async def test_a_deleted_job_added_again_starts_from_a_fresh_state(scheduler: Scheduler) -> None:
    scheduler.add_job("@daily", lambda: None, name="again")
    await scheduler.run_now("again")
    assert scheduler.job_state("again").runs == 1
    scheduler.delete_job("again")
    assert "again" not in scheduler.states()
    scheduler.add_job("@daily", lambda: None, name="again")
    assert scheduler.job_state("again").runs == 0


async def test_stop_cancels_a_run_past_the_drain_and_reports_it_cancelled() -> None:
    scheduler = Scheduler(node="node-a@127.0.0.2")
    stops: list[RunResult] = []
    scheduler.on_job_stop = lambda job, result: stops.append(result)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    scheduler.add_job("@daily", forever)
    await scheduler.start()
    run = asyncio.create_task(scheduler.run_now("forever"))
    await asyncio.wait_for(started.wait(), 5.0)
    await asyncio.wait_for(scheduler.stop(drain_timeout=0.1), 5.0)
    assert run.done() and run.cancelled()
    assert [r.status for r in stops] == ["cancelled"] and stops[0].job == "forever"
    state = scheduler.job_state("forever")
    assert state.last_status == "cancelled" and state.running_since is None


async def test_a_deleted_or_deactivated_job_stops_ticking_and_a_new_one_ticks(
    scheduler: Scheduler,
) -> None:
    """Deleting a ticking job stops its ticks, and a job added again under its name ticks
    with the new function; a deactivated job misses the ticks due meanwhile."""
    ran: list[tuple[str, datetime]] = []
    scheduler.add_job("* * * * * *", lambda ctx: ran.append(("old", ctx.tick)), name="j")
    await scheduler.start()
    scheduler.start_leading({})
    await async_wait_until(lambda: ran, 3.0, message="a tick")
    scheduler.delete_job("j")
    scheduler.add_job("* * * * * *", lambda ctx: ran.append(("new", ctx.tick)), name="j")
    await async_wait_until(lambda: ran[-1][0] == "new", 3.0, message="the new job ticks")
    assert [who for who, _ in ran].count("new") == len(ran) - 1  # the old one stopped
    scheduler.deactivate_job("j")
    assert scheduler.jobs_snapshot()[0]["active"] is False
    await async_wait_until(lambda: not scheduler.jobs_snapshot()[0]["running"], 3.0)
    paused_at, count = time.time(), len(ran)
    # Past the next due tick (a second boundary) and its grace: it was not run.
    await async_wait_until(lambda: time.time() > int(paused_at) + 1.3, 3.0)
    assert len(ran) == count
    scheduler.activate_job("j")
    await async_wait_until(lambda: len(ran) > count, 3.0, message="ticking again")
    await scheduler.stop_leading(drain_timeout=1.0)  # a cluster job: it stops ticking
    stopped_at, count = time.time(), len(ran)
    await async_wait_until(lambda: time.time() > int(stopped_at) + 1.3, 3.0)
    assert len(ran) == count


async def test_deleted_jobs_leave_nothing_behind(scheduler: Scheduler) -> None:
    # Run-time jobs with ever-new names (one per tenant, per report...) used to leave an
    # entry each in the engine for good.
    for n in range(50):
        scheduler.add_job("@daily", lambda: None, name=f"report-{n}")
        scheduler.delete_job(f"report-{n}")
    assert scheduler._inflight == {}

    release = asyncio.Event()

    async def busy() -> None:
        await release.wait()

    scheduler.add_job("@daily", busy, name="busy")
    running = asyncio.ensure_future(scheduler.run_now("busy"))
    await async_wait_until(lambda: scheduler._inflight["busy"], timeout=5)
    scheduler.delete_job("busy")
    assert scheduler._inflight["busy"]  # a run in flight: stop() still drains it
    release.set()
    assert (await running).status == "ok"
    assert scheduler._inflight == {}


async def test_a_job_made_by_a_decorator_is_called_as_its_wrapper_takes_it(
    scheduler: Scheduler,
) -> None:
    # functools.wraps makes inspect.signature report the inner function's parameters.
    def with_db(fn: Any) -> Any:  # supplies the argument: the wrapper takes none
        @functools.wraps(fn)
        async def wrapper() -> Any:
            return await fn("db")

        return wrapper

    def logged(fn: Any) -> Any:  # passes everything on: the inner function decides
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

        return wrapper

    seen: list[str] = []

    @scheduler.job("0 0 1 1 *", name="db")
    @with_db
    async def uses_db(db: str) -> None:
        seen.append(db)

    @scheduler.job("0 0 1 1 *", name="ctx")
    @logged
    async def uses_ctx(ctx: RunContext) -> None:
        seen.append(ctx.job)

    # Before, "db" was called with a RunContext its wrapper does not take: every run
    # failed with a TypeError.
    assert (await scheduler.run_now("db")).status == "ok"
    assert (await scheduler.run_now("ctx")).status == "ok"
    assert seen == ["db", "ctx"]
