"""What the engine tells its user, each found missing by a mutation run (scripts/mutation).

Hooks and log lines are how an operator learns that a tick was missed or a job failed or
hung: each test here checks one of them says what happened, and only that. Waiting is on
conditions with deadlines, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from shoal.cron import CronSchedule
from shoal.scheduler import InvalidJob, JobState, Misfire, RunContext, Scheduler
from tests.support.procs import async_wait_until

DEADLINE = 5.0  # seconds; generous for anything due within ~2 ticks


def messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


async def test_ticks_run_on_time_are_not_reported_as_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On-time ticks never reach the misfire path: no on_tick_missed call, no warning.

    A wide grace keeps a tick made late by a loaded machine within it, so any report
    here is a false alarm.
    """
    caplog.set_level(logging.WARNING, logger="shoal.scheduler")
    scheduler = Scheduler(node="node-a@127.0.0.2", misfire_grace=30.0)
    missed: list[tuple[datetime, datetime, str]] = []
    scheduler.on_tick_missed = lambda job, first, last, outcome: missed.append(
        (first, last, outcome)
    )
    ran: list[datetime] = []
    scheduler.add_job("* * * * * *", lambda ctx: ran.append(ctx.tick), name="tick", overlap=True)
    await scheduler.start()
    try:
        scheduler.start_leading({})
        await async_wait_until(lambda: len(ran) >= 2, DEADLINE, message="two ticks")
    finally:
        await scheduler.stop(drain_timeout=0.5)
    assert ran[1] - ran[0] == timedelta(seconds=1)
    assert missed == []
    assert not [m for m in messages(caplog, "shoal.scheduler", logging.WARNING) if "missed" in m]


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
async def test_the_missed_hook_names_the_policy_applied_after_a_gap(misfire: Misfire) -> None:
    """After a leader gap beyond the grace, on_tick_missed gets the missed range and the
    job's policy: "run_once" (the newest runs late) or "skip" (none runs)."""
    scheduler = Scheduler(node="node-a@127.0.0.2")
    missed: list[tuple[str, datetime, datetime, str]] = []
    scheduler.on_tick_missed = lambda job, first, last, outcome: missed.append(
        (job.name, first, last, outcome)
    )
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    scheduler.add_job(f"{newest.second} * * * * *", lambda: None, name="gap", misfire=misfire)
    await scheduler.start()
    try:
        scheduler.start_leading({"gap": JobState(last_tick=newest - timedelta(minutes=4))})
        await async_wait_until(lambda: missed, DEADLINE, message="the missed report")
    finally:
        await scheduler.stop(drain_timeout=0.5)
    assert missed == [("gap", newest - timedelta(minutes=3), newest, misfire)]


async def test_a_retried_attempt_is_logged_under_the_jobs_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.retries")
    scheduler = Scheduler(node="node-a@127.0.0.2")
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("refused")

    scheduler.add_job("@daily", flaky, name="sync-invoices", max_attempts=2, backoff=0)
    result = await scheduler.run_now("sync-invoices")
    assert (result.status, result.attempts) == ("ok", 2)
    [warning] = messages(caplog, "shoal.retries", logging.WARNING)
    assert warning.startswith("sync-invoices: attempt 1 of 2 failed (ConnectionError)"), warning


async def test_an_async_callable_object_runs_on_the_loop_not_in_a_worker_thread() -> None:
    """A job object with ``async def __call__`` is a coroutine job: it runs while every
    worker thread is taken by blocking sync jobs."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    scheduler = Scheduler(node="node-a@127.0.0.2")
    release, blocking = threading.Event(), threading.Event()

    def blocker() -> None:  # holds the only worker thread
        blocking.set()
        release.wait(DEADLINE * 2)

    class Poll:
        async def __call__(self, ctx: RunContext) -> None:
            assert threading.current_thread() is threading.main_thread()

    scheduler.add_job("@daily", blocker)
    scheduler.add_job("@daily", Poll(), name="poll")
    held = asyncio.create_task(scheduler.run_now("blocker"))
    try:
        await async_wait_until(blocking.is_set, DEADLINE, message="the thread is taken")
        result = await asyncio.wait_for(scheduler.run_now("poll"), DEADLINE)
        assert result.status == "ok", result.error
    finally:
        release.set()
        await asyncio.wait_for(held, DEADLINE)
        await scheduler.stop(drain_timeout=0.5)
        executor.shutdown(wait=True)


async def test_a_crashed_ticker_is_logged_with_its_job_and_cause(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticker that fails (here its schedule's arithmetic: no known input does that now)
    stops the job's ticks; the operator must be told which job and why."""

    def broken(self: CronSchedule, dt: datetime) -> datetime | None:
        raise ArithmeticError("a bug in the schedule's arithmetic")

    caplog.set_level(logging.ERROR, logger="shoal.scheduler")
    scheduler = Scheduler(node="solo", leading=True)
    scheduler.add_job("* * * * * *", lambda: None, name="nightly")
    monkeypatch.setattr(CronSchedule, "next_after", broken)
    await scheduler.start()
    try:

        def crash_reports() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.name == "shoal.scheduler"
                and "ticker of job 'nightly' crashed" in r.getMessage()
            ]

        [record] = await async_wait_until(crash_reports, DEADLINE, message="the crash report")
    finally:
        await scheduler.stop(drain_timeout=0.5)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], ArithmeticError)


def test_a_bad_run_strategy_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(InvalidJob) as refused:
        Scheduler().add_job("@daily", lambda: None, name="j", run_strategy="everywhere")  # type: ignore[arg-type]
    assert str(refused.value) == (
        "job 'j': run_strategy must be one of cluster, all, random, local, got 'everywhere'"
    )


async def test_a_run_cancelled_at_the_drain_is_logged_under_its_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.scheduler")
    scheduler = Scheduler(node="node-a@127.0.0.2")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    scheduler.add_job("@daily", forever, name="hung-export")
    await scheduler.start()
    run = asyncio.create_task(scheduler.run_now("hung-export"))
    await asyncio.wait_for(started.wait(), DEADLINE)
    await asyncio.wait_for(scheduler.stop(drain_timeout=0.1), DEADLINE)
    assert run.cancelled()
    drained = [m for m in messages(caplog, "shoal.scheduler", logging.WARNING) if "drain" in m]
    assert drained == [
        "shoal.scheduler.run:hung-export still running after the 0.1 s drain; cancelling it"
    ]
