"""The Scheduler engine: ticks, failures, timeouts, overlap, misfire, leadership and the Job API.

Waiting is always on an event or queue with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pytest

from shoal.cron import CronError, CronSchedule
from shoal.scheduler import (
    InvalidJob,
    Job,
    JobExists,
    JobNotFound,
    JobNotRun,
    JobRunning,
    JobState,
    RunContext,
    RunResult,
    Scheduler,
    SchedulerError,
)
from tests.support.procs import async_wait_until

DEADLINE = 5.0  # seconds; generous upper bound for anything that should happen within ~2 ticks


class LogWatch(logging.Handler):
    """Collects shoal.scheduler records and lets a test wait for one that contains a text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def find(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]

    async def wait_for(self, text: str, timeout: float = DEADLINE) -> logging.LogRecord:
        async with asyncio.timeout(timeout):
            while not (found := self.find(text)):
                self._changed.clear()
                await self._changed.wait()
        return found[0]


@pytest.fixture
async def logs() -> AsyncIterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("shoal.scheduler")
    logger.addHandler(watch)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old)


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    s = Scheduler(node="node-a@127.0.0.2")
    yield s
    await s.stop(drain_timeout=0.5)


async def next_item(queue: asyncio.Queue[datetime], timeout: float = DEADLINE) -> datetime:
    return await asyncio.wait_for(queue.get(), timeout)


def recorder(queue: asyncio.Queue[datetime]) -> Callable[[RunContext], Any]:
    async def job(ctx: RunContext) -> None:
        queue.put_nowait(ctx.tick)

    return job


# -- running jobs ---------------------------------------------------------------------------


async def test_a_failing_job_is_logged_with_traceback_and_the_next_tick_runs(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    calls: list[datetime] = []

    async def flaky(ctx: RunContext) -> None:
        calls.append(ctx.tick)
        ticks.put_nowait(ctx.tick)
        if len(calls) == 1:
            raise RuntimeError("boom")

    results: asyncio.Queue[RunResult] = asyncio.Queue()
    scheduler.on_job_stop = lambda job, result: results.put_nowait(result)
    scheduler.add_job("* * * * * *", flaky, run_strategy="local")
    await scheduler.start()
    first = await asyncio.wait_for(results.get(), DEADLINE)
    second = await asyncio.wait_for(results.get(), DEADLINE)
    assert (first.status, second.status) == ("error", "ok")
    assert second.tick - first.tick == timedelta(seconds=1)
    record = await logs.wait_for("raised")
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])
    assert scheduler.job_state("flaky").failures == 1
    # Ticks are on time (bench_lateness.py measures this properly over 30 ticks).
    assert all(0 <= r.lateness < 0.05 for r in (first, second)), (first, second)


async def test_hooks_see_start_stop_and_exception(scheduler: Scheduler) -> None:
    seen: list[tuple[str, object]] = []
    scheduler.on_job_start = lambda job, tick: seen.append(("start", job.name))
    scheduler.on_job_stop = lambda job, result: seen.append(("stop", result.status))
    scheduler.on_job_exception = lambda job, tick, exc: seen.append(("exception", repr(exc)))

    def broken() -> None:
        raise ValueError("bad input")

    scheduler.add_job("@daily", broken)
    result = await scheduler.run_now("broken")
    assert result.status == "error" and result.error == "ValueError: bad input"
    assert seen == [
        ("start", "broken"),
        ("exception", "ValueError('bad input')"),
        ("stop", "error"),
    ]


async def test_a_failing_hook_does_not_stop_the_job(scheduler: Scheduler, logs: LogWatch) -> None:
    def bad_hook(job: Job, tick: datetime) -> None:
        raise RuntimeError("hook bug")

    scheduler.on_job_start = bad_hook
    scheduler.add_job("@daily", lambda: None, name="fine")
    assert (await scheduler.run_now("fine")).status == "ok"
    assert logs.find("hook")


async def test_timeout_cancels_the_job(scheduler: Scheduler) -> None:
    cancelled = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scheduler.add_job("@daily", stuck, timeout=0.1)
    result = await scheduler.run_now("stuck")
    assert result.status == "timeout" and cancelled.is_set()
    # uvloop's timers have millisecond resolution: a 0.1 s timeout may fire a few µs early.
    assert 0.099 <= result.duration < 1.0


async def test_a_job_raising_timeout_error_itself_is_an_error_not_a_timeout(
    scheduler: Scheduler,
) -> None:
    async def own_timeout() -> None:
        raise TimeoutError("upstream slow")

    scheduler.add_job("@daily", own_timeout, timeout=5)
    assert (await scheduler.run_now("own_timeout")).status == "error"


async def test_sync_jobs_run_in_a_thread(scheduler: Scheduler) -> None:
    threads: list[int] = []
    scheduler.add_job("@daily", lambda: threads.append(threading.get_ident()), name="sync")
    await scheduler.run_now("sync")
    assert threads and threads[0] != threading.get_ident()


async def test_overlap_false_skips_a_tick_while_running(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    release, finished = asyncio.Event(), asyncio.Event()
    started: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.on_job_stop = lambda job, result: finished.set()

    async def slow(ctx: RunContext) -> None:
        started.put_nowait(ctx.tick)
        await release.wait()

    scheduler.add_job("* * * * * *", slow, run_strategy="local")
    await scheduler.start()
    first = await next_item(started)
    await logs.wait_for("skipped, previous run still running")
    with pytest.raises(JobRunning):
        await scheduler.run_now("slow")
    assert started.empty()
    release.set()
    await asyncio.wait_for(finished.wait(), DEADLINE)
    assert scheduler.job_state("slow").last_completed == first
    assert (await scheduler.run_now("slow")).status == "ok"  # free again once it ended


async def test_overlap_true_allows_concurrent_runs(scheduler: Scheduler) -> None:
    both = asyncio.Barrier(3)

    async def meet() -> None:
        async with asyncio.timeout(DEADLINE):
            await both.wait()

    scheduler.add_job("@daily", meet, overlap=True)
    first = asyncio.create_task(scheduler.run_now("meet"))
    second = asyncio.create_task(scheduler.run_now("meet"))
    async with asyncio.timeout(DEADLINE):
        await both.wait()
    assert (await first).status == (await second).status == "ok"


# -- the cluster seam -----------------------------------------------------------------------


def second_from_now(offset: int) -> tuple[str, datetime]:
    """A schedule firing once a minute, at a second ``offset`` seconds from now."""
    now = datetime.now(UTC)
    target = now.replace(microsecond=0) + timedelta(seconds=offset)
    return f"{target.second} * * * * *", target


async def test_cluster_jobs_tick_only_while_leading(scheduler: Scheduler) -> None:
    cluster_ticks: asyncio.Queue[datetime] = asyncio.Queue()
    local_ticks: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job("* * * * * *", recorder(cluster_ticks), name="once-per-cluster")
    scheduler.add_job("* * * * * *", recorder(local_ticks), name="here", run_strategy="local")
    await scheduler.start()
    await next_item(local_ticks)
    # Both would be due at the same instant; a launched tick is recorded synchronously.
    assert scheduler.job_state("once-per-cluster").last_tick is None
    assert cluster_ticks.empty()
    scheduler.start_leading({})
    first = await next_item(cluster_ticks)
    states = await scheduler.stop_leading(drain_timeout=1)
    assert set(states) == {"once-per-cluster"}
    assert states["once-per-cluster"].last_tick is not None
    assert states["once-per-cluster"].last_tick >= first


async def test_a_new_leader_never_reruns_a_started_tick(scheduler: Scheduler) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job("* * * * * *", recorder(ticks), name="tick", misfire="run_once")
    await scheduler.start()
    # The old leader already started the coming tick (its clock runs a little ahead).
    started_elsewhere = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    scheduler.start_leading({"tick": JobState(last_tick=started_elsewhere, ran_on="node-b")})
    first = await next_item(ticks)
    assert first == started_elsewhere + timedelta(seconds=1)
    assert scheduler.job_state("tick").ran_on == "node-a@127.0.0.2"


async def test_run_once_catches_up_once_after_a_leadership_gap(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    expr, target = second_from_now(30)  # next fire in ~30 s; the newest missed one ~30 s ago
    newest_missed = target - timedelta(minutes=1)
    scheduler.add_job(expr, recorder(ticks), name="catch-up", misfire="run_once")
    await scheduler.start()
    last_tick = newest_missed - timedelta(minutes=3)  # so four ticks were missed
    scheduler.start_leading({"catch-up": JobState(last_tick=last_tick, last_completed=last_tick)})
    assert await next_item(ticks) == newest_missed
    await logs.wait_for("running once to catch up")
    state = scheduler.job_state("catch-up")
    assert state.last_tick == newest_missed
    assert ticks.empty()


async def test_skip_drops_missed_ticks_after_a_leadership_gap(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    expr, target = second_from_now(30)
    newest_missed = target - timedelta(minutes=1)
    started: list[datetime] = []
    scheduler.on_job_start = lambda job, tick: started.append(tick)
    scheduler.add_job(expr, recorder(ticks), name="skipper")  # misfire="skip" by default
    await scheduler.start()
    last_tick = newest_missed - timedelta(minutes=3)
    scheduler.start_leading({"skipper": JobState(last_tick=last_tick)})
    await logs.wait_for("skipped (misfire=skip)")
    # A launch claims the tick synchronously, in the same step as the log line.
    assert scheduler.job_state("skipper").last_tick == last_tick
    # Give a launched run task every chance to run: a launch would show up here.
    for _ in range(20):
        await asyncio.sleep(0)
    assert started == [] and ticks.empty()
    assert scheduler.jobs_snapshot()[0]["next_run"] == target.isoformat()


async def test_state_changed_reports_start_and_completion(scheduler: Scheduler) -> None:
    reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def replicate(job: Job, state: JobState) -> None:
        wire = msgpack.unpackb(msgpack.packb(state.to_wire()))  # what goes over the mesh
        assert JobState.from_wire(wire) == state
        reports.put_nowait(wire)

    scheduler.state_changed = replicate
    scheduler.add_job("* * * * * *", lambda: None, name="replicated")
    await scheduler.start()
    scheduler.start_leading()
    started = await asyncio.wait_for(reports.get(), DEADLINE)
    done = await asyncio.wait_for(reports.get(), DEADLINE)
    assert started["running_since"] is not None and started["last_tick"] is not None
    assert started["last_completed"] is None
    assert done["running_since"] is None and done["last_completed"] == started["last_tick"]
    assert done["ran_on"] == "node-a@127.0.0.2" and done["last_status"] == "ok"


async def test_a_failing_state_report_prevents_the_run(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    ran: list[datetime] = []

    def cannot_replicate(job: Job, state: JobState) -> None:
        raise ConnectionError("no quorum")

    scheduler.state_changed = cannot_replicate
    scheduler.add_job("@daily", lambda: ran.append(datetime.now(UTC)), name="careful")
    with pytest.raises(JobNotRun):
        await scheduler.run_now("careful")
    assert not ran and logs.find("not running it")


async def test_stop_leading_cancels_runs_at_the_drain_bound(scheduler: Scheduler) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scheduler.add_job("* * * * * *", forever)
    await scheduler.start()
    scheduler.start_leading()
    await asyncio.wait_for(started.wait(), DEADLINE)
    states = await asyncio.wait_for(scheduler.stop_leading(drain_timeout=0.2), DEADLINE)
    assert cancelled.is_set()
    assert states["forever"].last_status == "cancelled"
    assert states["forever"].running_since is None


async def test_a_run_cancelled_while_its_start_is_saved_leaves_no_running_marker(
    scheduler: Scheduler,
) -> None:
    """A holder cut off from its store hangs in saving a tick's start; its drain cancels the
    run. Its state must not keep saying "running": peers adopt that state when they
    reconnect and would skip the job (overlap=False) for good. Seen in a full run."""
    saving, reported = asyncio.Event(), asyncio.Queue[JobState]()
    ran: list[datetime] = []

    async def hangs_on_the_first_save(_job: Job, state: JobState) -> None:
        reported.put_nowait(state)
        if not saving.is_set():
            saving.set()
            await asyncio.Event().wait()  # the store does not answer

    scheduler.state_changed = hangs_on_the_first_save
    scheduler.add_job("* * * * * *", lambda: ran.append(datetime.now(UTC)), name="cut")
    await scheduler.start()
    scheduler.start_leading()
    await asyncio.wait_for(saving.wait(), DEADLINE)
    states = await asyncio.wait_for(scheduler.stop_leading(drain_timeout=0.2), DEADLINE)
    assert not ran
    assert (states["cut"].running_on, states["cut"].running_since) == (None, None)
    assert scheduler.job_state("cut").running_on is None
    started = await asyncio.wait_for(reported.get(), DEADLINE)
    cleared = await asyncio.wait_for(reported.get(), DEADLINE)  # told to the peers too
    assert started.running_on is not None and cleared.running_on is None
    assert cleared.last_tick == started.last_tick  # the tick still counts as started


async def test_stop_leading_lets_short_runs_finish(scheduler: Scheduler) -> None:
    started = asyncio.Event()

    async def short() -> None:
        started.set()
        await asyncio.sleep(0.1)  # the job's own work, not a test wait

    scheduler.add_job("* * * * * *", short)
    await scheduler.start()
    scheduler.start_leading()
    await asyncio.wait_for(started.wait(), DEADLINE)
    states = await scheduler.stop_leading(drain_timeout=DEADLINE)
    assert states["short"].last_status == "ok"
    assert states["short"].last_completed == states["short"].last_tick


async def test_overlap_false_holds_across_a_handover(scheduler: Scheduler, logs: LogWatch) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job("* * * * * *", recorder(ticks), name="single")
    await scheduler.start()
    now = datetime.now(UTC)
    running_elsewhere = JobState(
        last_tick=now.replace(microsecond=0),
        running_since=now,
        running_tick=now.replace(microsecond=0),
        ran_on="node-b",
    )
    scheduler.start_leading({"single": running_elsewhere})
    await logs.wait_for("skipped, previous run still running")
    assert ticks.empty()
    finished = running_elsewhere.copy()
    finished.running_since = finished.running_tick = None
    scheduler.update_state("single", finished)  # the old holder reports completion
    await next_item(ticks)


async def test_a_state_with_a_naive_datetime_is_refused_and_the_job_keeps_ticking(
    scheduler: Scheduler,
) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job("* * * * * *", recorder(ticks), name="naive")
    await scheduler.start()
    naive = JobState(last_tick=datetime.now(UTC).replace(tzinfo=None))
    with pytest.raises(ValueError, match=r"JobState\.last_tick must be a timezone-aware datetime"):
        scheduler.start_leading({"naive": JobState(), "other": naive})
    assert scheduler.job_state("naive") == JobState()  # nothing adopted
    scheduler.start_leading()
    await next_item(ticks)
    with pytest.raises(ValueError, match=r"JobState\.running_since must be a timezone-aware"):
        scheduler.update_state("naive", JobState(running_since=naive.last_tick))
    await next_item(ticks)  # the ticker lives on


async def test_a_last_tick_at_the_end_of_time_stops_the_job_without_crashing_its_ticker(
    scheduler: Scheduler, logs: LogWatch
) -> None:
    scheduler.add_job("* * * * * *", lambda: None, name="far")
    await scheduler.start()
    end_of_time = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # e.g. a corrupt stored state
    scheduler.start_leading({"far": JobState(last_tick=end_of_time)})
    await logs.wait_for("job 'far': schedule * * * * * * has no further fire times")
    assert not logs.find("crashed")


async def test_the_dispatcher_decides_where_a_tick_runs(scheduler: Scheduler) -> None:
    calls: asyncio.Queue[tuple[str, datetime]] = asyncio.Queue()

    class ElsewhereDispatcher:
        async def dispatch(self, job: Job, tick: datetime) -> RunResult | None:
            calls.put_nowait((job.name, tick))
            if job.run_strategy == "random":
                return None  # another node was picked; its outcome is not reported here
            return RunResult(job.name, tick, "node-c", tick, tick, "ok")

    ran: list[str] = []
    scheduler.dispatcher = ElsewhereDispatcher()
    scheduler.add_job("* * * * * *", lambda: ran.append("x"), name="rand", run_strategy="random")
    scheduler.add_job("@daily", lambda: ran.append("y"), name="remote")
    await scheduler.start()
    name, tick = await asyncio.wait_for(calls.get(), DEADLINE)
    assert name == "rand" and not ran
    assert scheduler.job_state("rand").last_tick == tick
    result = await scheduler.run_now("remote")
    assert result.node == "node-c" and scheduler.job_state("remote").ran_on == "node-c"


async def test_reboot_fires_once_at_start(scheduler: Scheduler) -> None:
    booted: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job("@reboot", recorder(booted), name="boot", run_strategy="local")
    scheduler.add_job("@reboot", recorder(booted), name="cluster-boot")
    scheduler.add_job("@reboot", recorder(booted), name="cluster-booted-before")
    await scheduler.start()
    await next_item(booted)
    scheduler.start_leading({"cluster-booted-before": JobState(last_tick=datetime.now(UTC))})
    await next_item(booted)
    await scheduler.stop()
    states = scheduler.states()
    assert states["boot"].runs == states["cluster-boot"].runs == 1
    assert states["cluster-booted-before"].runs == 0


# -- Job API --------------------------------------------------------------------------------


async def test_job_api_round_trip(scheduler: Scheduler) -> None:
    @scheduler.job(
        "*/5 * * * * *",
        name="hello",
        tz="Europe/Berlin",
        timeout=3,
        misfire="run_once",
        run_strategy="all",
    )
    async def hello() -> None:
        pass

    job = scheduler.find_job("hello")
    assert (job.name, str(job.schedule), job.schedule.tz.key) == (
        "hello",
        "*/5 * * * * *",
        "Europe/Berlin",
    )
    assert (job.timeout, job.misfire, job.run_strategy, job.overlap) == (
        3,
        "run_once",
        "all",
        False,
    )
    added = scheduler.add_job(CronSchedule.parse("@hourly", "Asia/Tokyo"), hello, name="again")
    assert [j.name for j in scheduler.list_jobs()] == ["again", "hello"]
    assert "again" in scheduler
    assert scheduler.deactivate_job("again") is added and not added.active
    assert scheduler.activate_job("again").active
    assert scheduler.delete_job("again") is added
    assert "again" not in scheduler
    with pytest.raises(JobExists):
        scheduler.add_job("@daily", hello)  # the name defaults to the function's


async def test_job_api_errors(scheduler: Scheduler) -> None:
    scheduler.add_job("@daily", lambda: None, name="one")
    with pytest.raises(JobExists, match="'one' already exists"):
        scheduler.add_job("@hourly", lambda: None, name="one")
    for call in (
        scheduler.find_job,
        scheduler.delete_job,
        scheduler.activate_job,
        scheduler.deactivate_job,
        scheduler.job_state,
    ):
        with pytest.raises(JobNotFound, match="no job named 'missing'"):
            call("missing")
    with pytest.raises(JobNotFound):
        await scheduler.run_now("missing")
    with pytest.raises(JobNotFound):
        scheduler.update_state("missing", JobState())
    assert issubclass(JobNotFound, SchedulerError) and issubclass(JobExists, SchedulerError)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"misfire": "later"}, "misfire must be"),
        ({"run_strategy": "everywhere"}, "run_strategy must be"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"name": ""}, "non-empty"),
        # Accepted before: "no" is truthy (overlap on), 2.5 attempts ran 3, NaN never waits.
        ({"overlap": "no"}, "overlap must be True or False, got 'no'"),
        ({"active": "yes"}, "active must be True or False"),
        ({"timeout": "5"}, "timeout must be > 0 seconds, got '5'"),
        ({"max_attempts": 2.5}, "max_attempts must be an int, got 2.5"),
        ({"max_attempts": 3, "backoff": float("nan")}, "backoff and max_backoff must be >= 0"),
    ],
)
def test_bad_job_arguments_fail_at_definition(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidJob, match=problem):
        Scheduler().add_job("@daily", lambda: None, **kwargs)


def test_bad_schedules_and_zones_fail_at_definition() -> None:
    s = Scheduler()
    with pytest.raises(CronError, match="out of range"):
        s.add_job("61 * * * *", lambda: None, name="a")
    with pytest.raises(CronError, match="unknown time zone 'Nowhere/City'"):
        s.add_job("* * * * *", lambda: None, name="b", tz="Nowhere/City")
    with pytest.raises(CronError, match="unknown time zone"):
        Scheduler(tz="Nowhere/City")
    with pytest.raises(InvalidJob, match="no argument or one"):
        s.add_job("@daily", lambda a, b: None, name="c")
    with pytest.raises(InvalidJob, match="callable"):
        s.add_job("@daily", "not a function", name="d")  # type: ignore[arg-type]
    assert s.list_jobs() == []


def test_day_match_is_a_per_job_option() -> None:
    s = Scheduler()
    crontab = s.add_job("0 0 15 * MON", lambda: None, name="either")
    quantum = s.add_job("0 0 15 * MON", lambda: None, name="both", day_match="and")
    assert crontab.schedule.day_match == "crontab" and quantum.schedule.day_match == "and"
    start = datetime(2024, 1, 2, tzinfo=UTC)
    assert crontab.schedule.next_after(start) == datetime(2024, 1, 8, tzinfo=UTC)
    assert quantum.schedule.next_after(start) == datetime(2024, 1, 15, tzinfo=UTC)
    with pytest.raises(InvalidJob, match="not both"):
        s.add_job(crontab.schedule, lambda: None, name="c", day_match="and")


async def test_deactivated_jobs_do_not_tick(scheduler: Scheduler) -> None:
    ticks: asyncio.Queue[datetime] = asyncio.Queue()
    other: asyncio.Queue[datetime] = asyncio.Queue()
    scheduler.add_job(
        "* * * * * *", recorder(ticks), name="paused", run_strategy="local", active=False
    )
    scheduler.add_job("* * * * * *", recorder(other), name="witness", run_strategy="local")
    await scheduler.start()
    await next_item(other)
    assert scheduler.job_state("paused").last_tick is None and ticks.empty()
    scheduler.activate_job("paused")
    await next_item(ticks)


async def test_jobs_snapshot_is_json_ready(scheduler: Scheduler) -> None:
    scheduler.add_job("0 0 9 * * MON-FRI", lambda: None, name="report", tz="Europe/Berlin")
    await scheduler.run_now("report")
    (row,) = scheduler.jobs_snapshot()
    json.dumps(row)
    assert row["name"] == "report" and row["schedule"] == "0 0 9 * * MON-FRI"
    assert row["tz"] == "Europe/Berlin" and row["run_strategy"] == "cluster"
    assert row["active"] is True and row["running"] is False
    assert row["ran_on"] == "node-a@127.0.0.2" and row["last_run"] is not None
    assert row["last_tick"] is None  # run_now does not move the schedule
    next_run = datetime.fromisoformat(row["next_run"])
    assert (
        next_run > datetime.now(UTC)
        and next_run.astimezone(scheduler.find_job("report").schedule.tz).hour == 9
    )


def test_wire_formats_round_trip_and_reject_garbage() -> None:
    now = datetime.now(UTC)
    state = JobState(
        last_tick=now.replace(microsecond=0),
        last_completed=now,
        ran_on="n@h",
        last_error="ValueError: x",
        last_duration=0.25,
        runs=3,
        failures=1,
    )
    assert JobState.from_wire(msgpack.unpackb(msgpack.packb(state.to_wire()))) == state
    assert JobState.from_wire({}) == JobState()
    assert JobState.from_wire({**state.to_wire(), "future_field": 1}) == state
    for bad in ({"last_tick": 12}, {"runs": "3"}, {"last_tick": "2024-01-01T00:00:00"}):
        with pytest.raises(ValueError, match="bad JobState"):
            JobState.from_wire(bad)
    result = RunResult("j", now, "n@h", now, now + timedelta(seconds=1), "error", "boom")
    assert RunResult.from_wire(msgpack.unpackb(msgpack.packb(result.to_wire()))) == result
    with pytest.raises(ValueError, match="bad RunResult"):
        RunResult.from_wire({**result.to_wire(), "status": "exploded"})


async def test_debug_switch_logs_tick_decisions(logs: LogWatch) -> None:
    quiet = Scheduler(node="n")
    quiet.add_job("@daily", lambda: None, name="q")
    await quiet.run_now("q")
    assert not logs.find("starting")
    loud = Scheduler(node="n", debug=True)
    loud.add_job("@daily", lambda: None, name="l")
    await loud.run_now("l")
    assert logs.find("job 'l' tick") and loud.debug


def test_stale_state_updates_are_ignored() -> None:
    s = Scheduler(node="me")
    s.add_job("@daily", lambda: None, name="j")
    t = datetime(2024, 1, 1, tzinfo=UTC)
    s.update_state("j", JobState(last_tick=t + timedelta(seconds=2), runs=5, ran_on="b"))
    s.update_state("j", JobState(last_tick=t, runs=9, ran_on="old"))  # older tick: ignored
    assert s.job_state("j").ran_on == "b"
    # Our own earlier "running" report echoed back, while nothing runs here: not running.
    echo = JobState(
        last_tick=t + timedelta(seconds=3),
        runs=5,
        running_since=t,
        running_tick=t + timedelta(seconds=3),
        running_on="me",
    )
    s.update_state("j", echo)
    state = s.job_state("j")
    assert state.last_tick == t + timedelta(seconds=3) and state.running_since is None
    assert s.jobs_snapshot()[0]["running"] is False


async def test_a_replicated_state_keeps_the_running_fields_of_a_run_in_flight_here(
    scheduler: Scheduler,
) -> None:
    """An update from the cluster (an echo, or another node's view) must not wipe the fact
    that a run is in flight here; a marker naming this node while nothing runs here is
    stale and dropped; an older update is ignored."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(ctx: RunContext) -> None:
        started.set()
        await release.wait()

    scheduler.add_job("@daily", slow, name="slow")
    tick = datetime(2030, 1, 1, tzinfo=UTC)
    scheduler.update_state("slow", JobState(last_tick=tick))
    run = asyncio.create_task(scheduler.run_now("slow"))
    await asyncio.wait_for(started.wait(), DEADLINE)
    mine = scheduler.job_state("slow")
    assert mine.running_on == "node-a@127.0.0.2" and mine.running_since is not None
    scheduler.update_state("slow", JobState(last_tick=tick + timedelta(days=1)))
    now = scheduler.job_state("slow")
    assert now.last_tick == tick + timedelta(days=1)
    assert (now.running_on, now.running_since, now.running_tick) == (
        mine.running_on,
        mine.running_since,
        mine.running_tick,
    )
    scheduler.update_state("slow", JobState(last_tick=tick))  # older: ignored
    assert scheduler.job_state("slow").last_tick == tick + timedelta(days=1)
    release.set()
    await asyncio.wait_for(run, DEADLINE)
    echo = JobState(last_tick=tick + timedelta(days=2), running_on="node-a@127.0.0.2")
    echo.running_since = echo.running_tick = tick + timedelta(days=2)
    scheduler.update_state("slow", echo)  # names this node, nothing in flight: stale
    after = scheduler.job_state("slow")
    assert (after.running_on, after.running_since, after.running_tick) == (None, None, None)
    assert after.last_tick == tick + timedelta(days=2)


async def test_an_echo_of_the_running_state_during_a_run_does_not_leave_the_job_busy(
    scheduler: Scheduler,
) -> None:
    """A peer that joins mid-run sends this node's own in-flight state back (same tick, same
    runs). Adopting it must not keep the job marked running after the run ends: with
    overlap=False that would skip every later tick (seen on real nodes)."""
    release = asyncio.Event()
    starts: list[int] = []

    async def slow() -> None:
        starts.append(1)
        await release.wait()

    reports: asyncio.Queue[JobState] = asyncio.Queue()

    def replicate(job: Job, state: JobState) -> None:
        reports.put_nowait(state)

    scheduler.state_changed = replicate
    scheduler.add_job("* * * * * *", slow, name="echoed", overlap=False)
    await scheduler.start()
    scheduler.start_leading()
    running = await asyncio.wait_for(reports.get(), DEADLINE)
    assert running.running_since is not None
    scheduler.update_state("echoed", running.copy())  # the echo, while the run is in flight
    release.set()
    done = await asyncio.wait_for(reports.get(), DEADLINE)
    assert done.running_since is None
    assert scheduler.states()["echoed"].running_since is None
    await async_wait_until(lambda: len(starts) >= 2, 3.0)  # the next tick runs
