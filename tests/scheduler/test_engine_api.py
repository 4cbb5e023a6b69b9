"""The Scheduler's API surface without waiting for ticks: options, snapshots, run_local."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from shoal.scheduler import (
    Job,
    JobNotFound,
    JobNotRun,
    JobRunning,
    JobState,
    RunContext,
    RunResult,
    Scheduler,
)


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
    with pytest.raises(JobNotRun):
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
    rows = {row["name"]: row for row in scheduler.jobs_snapshot()}
    assert rows["boot"]["next_run"] is None and rows["paused"]["next_run"] is None
    assert rows["paused"]["active"] is False and rows["paused"]["overlap"] is False
    assert rows["ahead"]["overlap"] is True and rows["ahead"]["max_attempts"] == 1
    assert datetime.fromisoformat(rows["ahead"]["next_run"]) == ahead + timedelta(hours=1)
    assert rows["ahead"]["last_tick"] == ahead.isoformat()
