"""The Postgres job store against a real Postgres: states outlive a full restart, history
is kept, and a stale state never moves a job's last tick backwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from shoal.config import ConfigError, Settings
from shoal.history import RunHistory
from shoal.jobdefs import JobDef
from shoal.jobstore import DurableJobs, PostgresJobStore
from shoal.node import Node
from shoal.pg import LazyPool
from shoal.retries import retrying
from shoal.scheduler import JobState, RunContext, Scheduler
from tests.support.postgres import PostgresServer, running_postgres, unavailable_reason
from tests.support.procs import async_wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


async def test_states_never_move_backwards_and_history_is_newest_first(
    pg: PostgresServer,
) -> None:
    store = PostgresJobStore(pg.dsn)
    try:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        await store.save_state("s", JobState(last_tick=t0 + timedelta(seconds=10), runs=3))
        await store.save_state("s", JobState(last_tick=t0, runs=1))  # stale: ignored
        await store.save_state("s", JobState(runs=0))  # a fresh node's empty state: ignored
        loaded = (await store.load_states())["s"]
        assert loaded.last_tick == t0 + timedelta(seconds=10) and loaded.runs == 3

        scheduler = Scheduler(node="a@127.0.0.2", leading=True)
        durable = DurableJobs(scheduler, store)
        calls = 0

        @scheduler.job("@daily", name="h")
        @retrying(max_attempts=2, backoff=0.0)
        async def flaky() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("first attempt fails")

        await scheduler.start()
        try:
            first = await scheduler.run_now("h")
            second = await scheduler.run_now("h")
        finally:
            await scheduler.stop(drain_timeout=0.5)
        await durable.flush()
        runs = await store.history("h", 10)
        assert [r.started_at for r in runs] == [second.started_at, first.started_at]
        assert [(r.status, r.attempts, r.node) for r in runs] == [
            ("ok", 1, "a@127.0.0.2"),
            ("ok", 2, "a@127.0.0.2"),
        ]
    finally:
        await store.close()


async def test_a_full_restart_runs_the_newest_missed_tick_exactly_once(
    pg: PostgresServer,
) -> None:
    """Node a runs ticks and stops; nothing runs for a few ticks; node b (a new process in
    production: a fresh scheduler and connection here) loads the stored state, leads, and
    with run_once catches up once, never repeating a tick a already ran."""
    ran: list[tuple[str, datetime]] = []

    def make(node: str) -> tuple[Scheduler, DurableJobs, PostgresJobStore]:
        scheduler = Scheduler(node=node)
        store = PostgresJobStore(pg.dsn)

        def job(ctx: RunContext) -> None:
            ran.append((ctx.node, ctx.tick))

        scheduler.add_job("* * * * * *", job, name="every-second", misfire="run_once")
        return scheduler, DurableJobs(scheduler, store), store

    a, durable_a, store_a = make("a@127.0.0.2")
    assert await durable_a.load() == 0
    await a.start()
    a.start_leading(a.states())
    await async_wait_until(lambda: len(ran) >= 2, 5.0)
    await a.stop(drain_timeout=1.0)
    await durable_a.flush()
    await store_a.close()
    last = a.job_state("every-second").last_tick
    assert last is not None

    # The whole cluster is down across several ticks.
    down_until = time.time() + 3.2
    await async_wait_until(lambda: time.time() >= down_until, 5.0, interval=0.1)

    b, durable_b, store_b = make("b@127.0.0.3")
    try:
        assert await durable_b.load() == 1
        assert b.job_state("every-second").last_tick == last
        await b.start()
        led_at = datetime.now(UTC)
        b.start_leading(b.states())
        await async_wait_until(lambda: sum(1 for n, _ in ran if n.startswith("b@")) >= 2, 5.0)
        await b.stop(drain_timeout=1.0)
        await durable_b.flush()
        b_ticks = sorted(t for n, t in ran if n.startswith("b@"))
        catch_up = b_ticks[0]
        # the newest tick missed while down, once; nothing at or before a's last tick
        assert last + timedelta(seconds=2) <= catch_up <= led_at
        assert all(t > last for t in b_ticks)
        ticks = [t for _, t in ran]
        assert len(ticks) == len(set(ticks)), ran
        stored = [r.tick for r in await store_b.history("every-second", 100)]
        assert sorted(stored) == sorted(ticks)
        # the older missed ticks were skipped, not run late
        assert not [t for t in ticks if last < t < catch_up]
    finally:
        await store_b.close()


async def test_a_store_that_cannot_save_prevents_the_run(pg: PostgresServer) -> None:
    """A tick that could be forgotten is not run: saving is part of announcing it."""
    scheduler = Scheduler(node="a@127.0.0.2", leading=True)
    store = PostgresJobStore("postgresql://nobody@127.0.0.1:1/none")  # nothing listens
    DurableJobs(scheduler, store)
    ran = asyncio.Event()
    scheduler.add_job("@daily", ran.set, name="d")
    await scheduler.start()
    try:
        with pytest.raises(Exception, match="not run"):
            await scheduler.run_now("d")
    finally:
        await scheduler.stop(drain_timeout=0.5)
    assert not ran.is_set()


async def test_definitions_are_stored_newest_version_first(pg: PostgresServer) -> None:
    store = PostgresJobStore(pg.dsn)
    try:
        newer = JobDef("d", 5, "b@h", schedule="@daily", task="t", options={"max_attempts": 2})
        await store.save_definition("d", 5, "b@h", newer.to_wire())
        older = JobDef("d", 4, "c@h", schedule="@hourly", task="t")
        await store.save_definition("d", 4, "c@h", older.to_wire())  # heard late: ignored
        tie = JobDef("d", 5, "a@h", deleted=True)  # same version, lower origin: ignored
        await store.save_definition("d", 5, "a@h", tie.to_wire())
        (stored,) = [JobDef.from_wire(w) for w in await store.load_definitions()]
        assert stored == newer
    finally:
        await store.close()


async def test_a_node_that_cannot_load_the_store_serves_but_does_not_lead_jobs() -> None:
    """Without the stored state a node could repeat a tick: it starts, holds the scheduler
    singleton, keeps retrying the store, and runs no cluster job meanwhile."""
    settings = Settings(
        cookie="test-cookie-jobstore-a7b6c5d4e3f21098",
        host="127.0.67.2",  # this module's own loopback alias
        port=4370,
        topology="static",
        lease_dsn="postgresql://nobody@127.0.0.1:1/none",  # nothing listens
    )
    node = Node(settings)
    ran: list[datetime] = []
    node.scheduler.add_job("* * * * * *", lambda ctx: ran.append(ctx.tick), name="tick")
    await node.start()
    try:
        await node.wait_ready(5)
        await async_wait_until(lambda: node.jobs.leader == node.name, 5.0)
        with pytest.raises(TimeoutError):
            await node.jobs.wait_loaded(2.5)
        assert ran == [] and not node.scheduler.leading  # holds the singleton, ticks nothing
        assert [row["name"] for row in node.status()["jobs"]] == ["tick"]
    finally:
        await node.stop()


def test_the_job_store_has_one_setting_and_its_old_name_is_an_alias() -> None:
    base = {"RELEASE_COOKIE": "test-cookie-jobstore-a7b6c5d4e3f21098", "NODE_HOST": "127.0.0.1"}
    dsn = "postgresql://shoal@db.internal/shoal"
    assert Settings.from_env({**base, "SHOAL_LEASE_DSN": dsn}).lease_dsn == dsn
    assert Settings.from_env({**base, "SHOAL_JOB_STORE_DSN": dsn}).lease_dsn == dsn
    both = {**base, "SHOAL_LEASE_DSN": dsn, "SHOAL_JOB_STORE_DSN": dsn}
    assert Settings.from_env(both).lease_dsn == dsn
    with pytest.raises(ConfigError, match="alias"):
        Settings.from_env({**both, "SHOAL_JOB_STORE_DSN": dsn + "2"})
    assert Settings.from_env(base).lease_dsn is None


async def test_a_new_node_loads_the_recent_runs_of_every_job(pg: PostgresServer) -> None:
    """Runs of a job that keeps no shared state (run_strategy="local") come back too."""

    def node(name: str) -> tuple[Scheduler, RunHistory, DurableJobs, PostgresJobStore]:
        scheduler = Scheduler(node=name, leading=True)
        scheduler.add_job("@daily", lambda: None, name="here", run_strategy="local")
        history = RunHistory(scheduler)
        store = PostgresJobStore(pg.dsn)
        return scheduler, history, DurableJobs(scheduler, store, history, True), store

    a, _, durable_a, store_a = node("a@h")
    await a.start()
    try:
        ran = [await a.run_now("here") for _ in range(2)]
    finally:
        await a.stop(drain_timeout=0.5)
        await durable_a.flush()
        await store_a.close()
    _, history_b, durable_b, store_b = node("b@h")
    try:
        assert await durable_b.load() == 0  # no state: a local job's is not stored
        runs = history_b.runs("here")
        assert [r.started_at for r in runs] == [r.started_at for r in reversed(ran)]
        assert {r.node for r in runs} == {"a@h"}
    finally:
        await store_b.close()


async def test_first_users_racing_for_the_pool_share_one(pg: PostgresServer) -> None:
    """The lease and the store both open their pool on first use, possibly at once."""
    pool = LazyPool(pg.dsn, "SELECT 1", "the test")
    try:
        first, second = await asyncio.gather(pool.get(), pool.get())
        assert first is second
    finally:
        await pool.close()
