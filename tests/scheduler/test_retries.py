"""Retries keep their tick: attempts happen inside one run, recorded in the run history."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from shoal.history import RunHistory
from shoal.retries import Retry, attempts, retrying
from shoal.scheduler import RunContext, Scheduler

FAST = Retry(max_attempts=3, backoff=0.01, jitter=0)


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    s = Scheduler(node="node-a@127.0.0.2", leading=True)
    yield s
    await s.stop(drain_timeout=0.5)


async def test_a_job_that_fails_twice_succeeds_in_one_run_of_its_tick(
    scheduler: Scheduler,
) -> None:
    history = RunHistory(scheduler)
    seen: list[tuple[datetime, int]] = []
    done = asyncio.Event()

    @scheduler.job("* * * * * *", name="flaky")
    @retrying(FAST)
    async def flaky(ctx: RunContext) -> None:
        seen.append((ctx.tick, attempts()))
        if len(seen) % 3:
            raise RuntimeError(f"attempt {attempts()} failed")
        done.set()

    await scheduler.start()
    await asyncio.wait_for(done.wait(), 5.0)
    await scheduler.stop(drain_timeout=1.0)
    first = seen[:3]
    assert [a for _, a in first] == [1, 2, 3]
    assert len({tick for tick, _ in first}) == 1  # every attempt is the same tick
    (record, *_) = [r for r in history.runs("flaky") if r.tick == first[0][0]]
    assert record.status == "ok" and record.attempts == 3
    state = scheduler.job_state("flaky")
    assert state.runs == len(history.runs("flaky"))  # one run per tick, retries or not
    assert state.failures == 0


async def test_a_job_that_keeps_failing_ends_as_one_failed_run(scheduler: Scheduler) -> None:
    history = RunHistory(scheduler, limit=2)
    threads: set[str] = set()

    @scheduler.job("@daily", name="broken")
    @retrying(max_attempts=3, backoff=0.01, jitter=0)
    def broken() -> None:  # a sync job: attempts run in a worker thread
        threads.add(threading.current_thread().name)
        raise ValueError(f"boom {attempts()}")

    await scheduler.start()
    result = await scheduler.run_now("broken")
    assert result.status == "error" and result.error == "ValueError: boom 3"
    assert threading.main_thread().name not in threads
    runs = history.runs("broken")
    assert [(r.status, r.attempts) for r in runs] == [("error", 3)]
    assert runs[0].to_wire()["attempts"] == 3
    for _ in range(2):
        await scheduler.run_now("broken")
    assert len(history.runs("broken")) == 2  # bounded


def test_backoff_grows_to_its_bound_and_bad_policies_fail() -> None:
    policy = Retry(max_attempts=5, backoff=1.0, factor=2.0, max_backoff=3.0, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    jittered = Retry(backoff=10.0, jitter=0.1)
    assert all(9.0 <= jittered.delay(1) <= 11.0 for _ in range(50))
    for bad in ({"max_attempts": 0}, {"factor": 0.5}, {"jitter": 1.0}, {"backoff": -1}):
        with pytest.raises(ValueError):
            Retry(**bad)  # type: ignore[arg-type]


async def test_max_attempts_as_a_job_option_retries_within_the_ticks_one_run(
    scheduler: Scheduler,
) -> None:
    """A failing job with max_attempts=3: every attempt sees the same tick, the tick counts
    as one run in the shared state and the history, and the next tick is a new run."""
    history = RunHistory(scheduler)
    seen: list[tuple[datetime, int]] = []
    launched: list[datetime] = []
    scheduler.on_job_start = lambda job, tick: launched.append(tick)
    two_ticks = asyncio.Event()

    @scheduler.job("* * * * * *", name="flaky", max_attempts=3, backoff=0.01)
    async def flaky(ctx: RunContext) -> None:
        seen.append((ctx.tick, attempts()))
        if len({tick for tick, _ in seen}) >= 2 and attempts() == 3:
            two_ticks.set()
        if attempts() < 3:
            raise RuntimeError(f"attempt {attempts()} failed")

    await scheduler.start()
    await asyncio.wait_for(two_ticks.wait(), 5.0)
    await scheduler.stop(drain_timeout=1.0)
    first, second = sorted({tick for tick, _ in seen})[:2]
    assert [a for t, a in seen if t == first] == [1, 2, 3]
    assert launched.count(first) == 1  # the retries are not new runs of the tick
    records = [r for r in history.runs("flaky") if r.tick in (first, second)]
    assert sorted((r.tick, r.status, r.attempts) for r in records) == [
        (first, "ok", 3),
        (second, "ok", 3),
    ]
    state = scheduler.job_state("flaky")
    assert state.runs == len(history.runs("flaky")) and state.failures == 0
    assert scheduler.jobs_snapshot()[0]["max_attempts"] == 3


async def test_a_job_that_fails_every_attempt_is_one_failed_run(scheduler: Scheduler) -> None:
    calls: list[int] = []

    def always_fails() -> None:  # sync: each attempt in a worker thread
        calls.append(attempts())
        raise ValueError(f"boom {attempts()}")

    scheduler.add_job("@daily", always_fails, name="broken", max_attempts=2, backoff=0.01)
    await scheduler.start()
    result = await scheduler.run_now("broken")
    assert calls == [1, 2]
    assert (result.status, result.error, result.attempts) == ("error", "ValueError: boom 2", 2)
    state = scheduler.job_state("broken")
    assert (state.runs, state.failures) == (1, 1)
    with pytest.raises(ValueError, match="max_attempts"):
        scheduler.add_job("@daily", always_fails, name="bad", max_attempts=0)
