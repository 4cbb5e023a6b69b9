"""A durable job store in Postgres: job states, run history and run-time job definitions
that outlive the cluster.

Without a store, job state lives in the nodes' memory and is replicated among them, so a
restart of the *whole* cluster forgets the last tick. With one (a node uses it when
``SHOAL_LEASE_DSN`` is set; see ``ClusterJobs``), a node loads every job's last state, the
recent run history and the jobs defined at run time before it leads, and saves each state
change of a cluster job before the run it announces: after a full-cluster restart the
misfire policy then applies to the ticks missed while everything was down (``run_once``
runs the newest once, ``skip`` skips them).

A standalone scheduler uses it directly:

    store = PostgresJobStore(dsn)
    durable = DurableJobs(scheduler, store)
    await durable.load()        # before the scheduler leads

Saving a state is part of announcing a run, as replication is: if the database cannot
take it, the run does not happen (a tick that might be forgotten is not run). Run history
is written in the background and never holds a run up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from shoal.history import RunHistory, RunRecord
from shoal.pg import QUERY_TIMEOUT, LazyPool
from shoal.scheduler import Job, JobState, Scheduler, StateCallback, add_hook

__all__ = ["DurableJobs", "PostgresJobStore"]

log = logging.getLogger("shoal.jobstore")

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
CREATE TABLE IF NOT EXISTS shoal_job_defs (
    job text PRIMARY KEY,
    version bigint NOT NULL,
    origin text NOT NULL,
    definition jsonb NOT NULL
);
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


# A definition replaces the stored one only if it is newer (version, then origin).
SAVE_DEF = """
INSERT INTO shoal_job_defs AS d (job, version, origin, definition)
VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (job) DO UPDATE
    SET version = EXCLUDED.version, origin = EXCLUDED.origin, definition = EXCLUDED.definition
    WHERE (EXCLUDED.version, EXCLUDED.origin) > (d.version, d.origin)
"""

LOAD_DEFS = "SELECT definition::text FROM shoal_job_defs"

# Rows beyond the newest few hundred per job are deleted now and then (see record_run).
PRUNE_RUNS = """
DELETE FROM shoal_job_runs WHERE job = $1 AND id < (
    SELECT min(id) FROM (
        SELECT id FROM shoal_job_runs WHERE job = $1 ORDER BY id DESC LIMIT $2
    ) AS newest
)
"""
KEEP_RUNS = 500  # rows kept per job in shoal_job_runs
PRUNE_EVERY = 100  # runs recorded between two prunes of one job


class PostgresJobStore:
    """Job states and run history in Postgres (asyncpg; the ``shoal[lease]`` extra)."""

    def __init__(self, dsn: str) -> None:
        self._pool = LazyPool(dsn, SCHEMA, "the job store")
        self._recorded: dict[str, int] = {}  # job -> runs recorded since its last prune

    async def _connected(self) -> Any:
        return await self._pool.get()

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
        count = self._recorded.get(run.job, 0) + 1
        self._recorded[run.job] = count % PRUNE_EVERY
        if count >= PRUNE_EVERY:
            await (await self._connected()).execute(
                PRUNE_RUNS, run.job, KEEP_RUNS, timeout=QUERY_TIMEOUT
            )

    async def history(self, job: str, limit: int = 50) -> list[RunRecord]:
        """The job's last ``limit`` runs on any node, newest first."""
        rows = await (await self._connected()).fetch(HISTORY, job, limit, timeout=QUERY_TIMEOUT)
        return [RunRecord(*row) for row in rows]

    async def load_definitions(self) -> list[dict[str, Any]]:
        """Every stored run-time job definition, as its wire dict (see shoal.jobdefs)."""
        rows = await (await self._connected()).fetch(LOAD_DEFS, timeout=QUERY_TIMEOUT)
        return [json.loads(text) for (text,) in rows]

    async def save_definition(self, job: str, version: int, origin: str, wire: Any) -> None:
        await (await self._connected()).execute(
            SAVE_DEF, job, version, origin, json.dumps(wire), timeout=QUERY_TIMEOUT
        )

    async def close(self) -> None:
        await self._pool.close()


class DurableJobs:
    """Connects a Scheduler to a job store through its hooks (no change to the engine).

    States are saved before the replication callback set before (``state_changed``)
    runs; run records come from ``history`` (a RunHistory: runs executed here) or, without
    one, from the scheduler's stop hook.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        store: PostgresJobStore,
        history: RunHistory | None = None,
        cluster_only: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.history = history
        self.cluster_only = cluster_only  # save only cluster jobs' states (a Node's choice)
        self._pending: set[asyncio.Task[None]] = set()
        self._replicate: StateCallback | None = scheduler.state_changed
        scheduler.state_changed = self._state_changed
        if history is not None:
            history.on_record = add_hook(history.on_record, self._record)
        else:
            scheduler.on_job_stop = add_hook(
                scheduler.on_job_stop, lambda _job, result: self._record(RunRecord.of(result))
            )

    async def load(self) -> int:
        """Adopt the stored states (and, with a history, the recent runs) of the jobs
        defined here; how many states were adopted.

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
        if self.history is not None:  # every job's recent runs, on any node
            for job in self.scheduler.list_jobs():
                for record in await self.store.history(job.name, self.history.limit):
                    self.history.add(record)
        return count

    async def _state_changed(self, job: Job, state: JobState) -> None:
        if job.is_cluster or not self.cluster_only:
            await self.store.save_state(job.name, state)
        if self._replicate is not None:
            outcome = self._replicate(job, state)
            if outcome is not None:
                await outcome

    def _record(self, run: RunRecord) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            log.warning("job store is slow: run of %r at %s not recorded", run.job, run.tick)
            return
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
