"""A durable job store in Postgres: job states and run history that outlive the cluster.

Without a store, job state lives in the nodes' memory and is replicated among them, so a
restart of the *whole* cluster forgets the last tick. With one, a node loads every job's
last state when it starts, and saves each state change before the run it announces: after
a full-cluster restart the misfire policy then applies to the ticks missed while
everything was down (``run_once`` runs the newest once, ``skip`` skips them).

    store = PostgresJobStore(dsn)
    durable = DurableJobs(node.scheduler, store)
    await durable.load()        # before the node leads (e.g. right after node.start())

Saving a state is part of announcing a run, as replication is: if the database cannot
take it, the run does not happen (a tick that might be forgotten is not run). Run history
is written in the background and never holds a run up.

Status: the store, loading, saving and history are here, tested against a real Postgres;
``hi`` wires it with ``SHOAL_JOB_STORE_DSN``. A ``Node`` setting, run-time job definitions
and the history's API/CLI/dashboard views are not built yet (issue 10).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from shoal import retries
from shoal.history import RunRecord
from shoal.scheduler import Job, JobState, RunResult, Scheduler, StateCallback

__all__ = ["DurableJobs", "PostgresJobStore"]

log = logging.getLogger("shoal.jobstore")

QUERY_TIMEOUT = 2.0
MAX_PENDING_WRITES = 100  # history rows being written; beyond this, rows are dropped (logged)

SCHEMA = """
CREATE TABLE IF NOT EXISTS shoal_job_states (
    job text PRIMARY KEY,
    state jsonb NOT NULL,
    last_tick timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS shoal_job_runs (
    id bigserial PRIMARY KEY,
    job text NOT NULL,
    tick timestamptz NOT NULL,
    node text NOT NULL,
    started_at timestamptz NOT NULL,
    duration double precision NOT NULL,
    status text NOT NULL,
    error text,
    attempts integer NOT NULL
);
CREATE INDEX IF NOT EXISTS shoal_job_runs_by_job ON shoal_job_runs (job, started_at DESC);
"""

# A state never replaces one with a later last_tick: last_tick never moves backwards.
SAVE_STATE = """
INSERT INTO shoal_job_states AS s (job, state, last_tick, updated_at)
VALUES ($1, $2::jsonb, $3, now())
ON CONFLICT (job) DO UPDATE
    SET state = EXCLUDED.state, last_tick = EXCLUDED.last_tick, updated_at = now()
    WHERE s.last_tick IS NULL
       OR (EXCLUDED.last_tick IS NOT NULL AND EXCLUDED.last_tick >= s.last_tick)
"""

LOAD_STATES = "SELECT job, state::text FROM shoal_job_states"

RECORD_RUN = """
INSERT INTO shoal_job_runs (job, tick, node, started_at, duration, status, error, attempts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

HISTORY = """
SELECT job, tick, node, started_at, duration, status, error, attempts
FROM shoal_job_runs WHERE job = $1 ORDER BY started_at DESC, id DESC LIMIT $2
"""


class PostgresJobStore:
    """Job states and run history in Postgres (asyncpg; the ``shoal[lease]`` extra)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: Any = None

    async def _connected(self) -> Any:
        if self._pool is None:
            try:
                import asyncpg
            except ImportError:
                raise RuntimeError(
                    "the job store needs asyncpg: pip install 'shoal[lease]'"
                ) from None
            pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=4, timeout=QUERY_TIMEOUT
            )
            try:
                await _create_schema(pool)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    async def load_states(self) -> dict[str, JobState]:
        """Every stored job state, by job name (malformed rows are skipped, logged)."""
        rows = await (await self._connected()).fetch(LOAD_STATES, timeout=QUERY_TIMEOUT)
        states: dict[str, JobState] = {}
        for job, text in rows:
            try:
                states[job] = JobState.from_wire(json.loads(text))
            except ValueError as exc:
                log.warning("ignoring the stored state of job %r: %s", job, exc)
        return states

    async def save_state(self, job: str, state: JobState) -> None:
        await (await self._connected()).execute(
            SAVE_STATE, job, json.dumps(state.to_wire()), state.last_tick, timeout=QUERY_TIMEOUT
        )

    async def record_run(self, run: RunRecord) -> None:
        await (await self._connected()).execute(
            RECORD_RUN,
            run.job,
            run.tick,
            run.node,
            run.started_at,
            run.duration,
            run.status,
            run.error,
            run.attempts,
            timeout=QUERY_TIMEOUT,
        )

    async def history(self, job: str, limit: int = 50) -> list[RunRecord]:
        """The job's last ``limit`` runs on any node, newest first."""
        rows = await (await self._connected()).fetch(HISTORY, job, limit, timeout=QUERY_TIMEOUT)
        return [RunRecord(*row) for row in rows]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class DurableJobs:
    """Connects a Scheduler to a job store through its hooks (no change to the engine)."""

    def __init__(self, scheduler: Scheduler, store: PostgresJobStore) -> None:
        self.scheduler = scheduler
        self.store = store
        self._pending: set[asyncio.Task[None]] = set()
        self._replicate: StateCallback | None = scheduler.state_changed
        scheduler.state_changed = self._state_changed
        previous_start, previous_stop = scheduler.on_job_start, scheduler.on_job_stop

        def started(job: Job, tick: datetime) -> None:
            retries.start_run()
            if previous_start is not None:
                previous_start(job, tick)

        def stopped(job: Job, result: RunResult) -> None:
            self._record(job, result)
            if previous_stop is not None:
                previous_stop(job, result)

        scheduler.on_job_start = started
        scheduler.on_job_stop = stopped

    async def load(self) -> int:
        """Adopt the stored states of the jobs defined here; how many were adopted.

        A run marked in flight in the store cannot still be running after a restart of
        the whole cluster, so that marker is dropped; live peers' newer states still win
        (the engine never moves a job's last tick backwards).
        """
        count = 0
        for name, state in (await self.store.load_states()).items():
            if name not in self.scheduler:
                continue
            state.running_since = state.running_tick = state.running_on = None
            self.scheduler.update_state(name, state)
            count += 1
        return count

    async def _state_changed(self, job: Job, state: JobState) -> None:
        await self.store.save_state(job.name, state)
        if self._replicate is not None:
            outcome = self._replicate(job, state)
            if outcome is not None:
                await outcome

    def _record(self, job: Job, result: RunResult) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            log.warning("job store is slow: run of %r at %s not recorded", job.name, result.tick)
            return
        run = RunRecord(
            job=result.job,
            tick=result.tick,
            node=result.node,
            started_at=result.started_at,
            duration=result.duration,
            status=result.status,
            error=result.error,
            attempts=max(1, retries.attempts()),
        )
        task = asyncio.get_running_loop().create_task(self._write(run))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, run: RunRecord) -> None:
        try:
            await self.store.record_run(run)
        except Exception as exc:
            log.warning("run of %r at %s not recorded: %s", run.job, run.tick.isoformat(), exc)

    async def flush(self) -> None:
        """Wait for the history rows being written."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


async def _create_schema(pool: Any) -> None:
    import asyncpg

    for _ in range(3):  # concurrent CREATE IF NOT EXISTS can race on the catalog
        try:
            await pool.execute(SCHEMA, timeout=QUERY_TIMEOUT)
            return
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
            continue
