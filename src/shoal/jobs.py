"""The scheduler across the cluster: leadership, shared job state, and where a tick runs.

- Cluster jobs (the default strategy) tick only on the holder of the singleton
  `shoal.scheduler`, so they run once per cluster in the singleton's mode.
- Every change of a job's state (tick started, finished) is sent to all peers
  before the job function runs, so a new leader knows the last tick that was
  started and never runs it again; `run_once` jobs catch up once.
- `all` and `local` jobs run on every node; `random` jobs tick on every node
  and run on the one node that a hash of (job, tick) picks from the sorted
  membership, so connected nodes with the same view agree without talking.
- In `lease` mode a tick also needs a row in Postgres stamped with the current
  fencing token, so a holder paused past its lease cannot run a tick twice.
- In `quorum` mode a tick also needs a confirmation from a majority, asked after
  the tick became due; acceptors confirm each (job, tick) once (see quorum.py).
- In `mesh` mode a leader whose event loop stalled (paused, blocked) first
  waits for a fresh view (`Singletons.revalidate`), then skips a tick that a
  peer reports as started.
- Jobs added, removed, paused or resumed at run time (`add`, `remove`, `pause`,
  `resume`) reach every node as versioned definitions (shoal.jobdefs); every run
  a node executes is sent to its peers, so each keeps the cluster's recent
  history (shoal.history).
- With `SHOAL_LEASE_DSN` set, all of that is also kept in Postgres (shoal.jobstore):
  a node loads it before it may lead, so it survives a restart of the whole cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from shoal.history import RunHistory, RunRecord
from shoal.jobdefs import JobDef, JobDefs, check_options
from shoal.scheduler import (
    InvalidJob,
    Job,
    JobExists,
    JobNotFound,
    JobState,
    RunResult,
    Scheduler,
)
from shoal.singleton import (
    SCHEDULER_LEADER,
    Service,
    SingletonContext,
    SingletonFunc,
    Singletons,
)

if TYPE_CHECKING:
    from shoal.config import Settings
    from shoal.jobstore import DurableJobs, PostgresJobStore
    from shoal.mesh import MembershipEvent
    from shoal.messaging import Handler, Messaging

log = logging.getLogger("shoal.jobs")

LEADER_SINGLETON = SCHEDULER_LEADER
STATE_HANDLER = "shoal.jobs.state"
RUN_HANDLER = "shoal.jobs.run"
DEFS_HANDLER = "shoal.jobs.defs"
RECORDS_HANDLER = "shoal.jobs.runs"

HISTORY_LIMIT = 50  # runs kept per job (in memory on every node; the store keeps more)
SNAPSHOT_RUNS = 10  # runs per job in `/cluster`
BATCH = 100  # definitions or run records per message
F = TypeVar("F", bound=Callable[..., Any])


class JobsHost(Protocol):
    """What `ClusterJobs` uses of its node: a `shoal.Node` is one."""

    @property
    def name(self) -> str: ...
    @property
    def messaging(self) -> Messaging: ...
    @property
    def singletons(self) -> Singletons: ...
    @property
    def settings(self) -> Settings: ...

    def nodes(self) -> list[str]: ...

    def on_stop(self, hook: Callable[[], Any]) -> None: ...

    def register(
        self, name: str, handler: Handler, *, sync_to_thread: bool | None = None
    ) -> None: ...

    def add_listener(self, listener: Callable[[MembershipEvent], None]) -> Callable[[], None]: ...

    def add_singleton(
        self, name: str, target: SingletonFunc | Service, mode: str | None = None
    ) -> None: ...

    async def call(self, node: str, handler: str, payload: Any, timeout: float = 5.0) -> Any: ...


class ClusterJobs:
    """Connects a node's `Scheduler` to the cluster. Reached as `node.jobs`."""

    def __init__(self, node: JobsHost, scheduler: Scheduler) -> None:
        self.node = node
        self.scheduler = scheduler
        self._lead: SingletonContext | None = None
        self._peer_ticks: dict[str, datetime] = {}  # job -> newest tick a peer started
        scheduler.dispatcher = self
        scheduler.state_changed = self._state_changed
        self.history = RunHistory(scheduler, limit=HISTORY_LIMIT)
        self.history.on_record = self._share_record
        self.definitions = JobDefs(scheduler, node.name)
        self.store: PostgresJobStore | None = None
        # Saves a cluster job's state before replicating it (wraps state_changed).
        self._durable: DurableJobs | None = None
        if node.settings.lease_dsn:
            from shoal.jobstore import DurableJobs, PostgresJobStore  # only with a store

            self.store = PostgresJobStore(node.settings.lease_dsn)
            self._durable = DurableJobs(scheduler, self.store, self.history, cluster_only=True)
        self._loaded = asyncio.Event()
        if self.store is None:
            self._loaded.set()
        self._loader: asyncio.Task[None] | None = None
        node.register(STATE_HANDLER, self._on_state)
        node.register(RUN_HANDLER, self._on_run_request)
        node.register(DEFS_HANDLER, self._on_definitions)
        node.register(RECORDS_HANDLER, self._on_records)
        node.on_stop(self._close)
        node.add_singleton(LEADER_SINGLETON, self._lead_scheduler)
        node.add_listener(
            lambda event: self._send_states(event.node) if event.kind == "up" else None
        )

    # start, stop, the store -------------------------------------------------
    async def start(self) -> None:
        """Start the scheduler; with a store, load what it keeps (retried in the background)."""
        await self.scheduler.start()
        if self.store is not None and self._loader is None:
            self._loader = asyncio.get_running_loop().create_task(
                self._load(), name="shoal.jobs.load"
            )

    async def _load(self) -> None:
        """Definitions, states and history from the store; retried until it answers (the
        node may serve meanwhile, but does not lead cluster jobs: it could repeat a tick)."""
        assert self.store is not None and self._durable is not None
        delay = 0.5
        while not self._loaded.is_set():  # ends when loaded or when the node stops
            try:
                definitions = 0
                for wire in await self.store.load_definitions():
                    try:
                        definitions += self.definitions.adopt(JobDef.from_wire(wire))
                    except ValueError as exc:
                        log.warning("job store: ignoring a stored definition: %s", exc)
                count = await self._durable.load()
            except Exception as exc:
                log.warning(
                    "job store: cannot load the jobs' states (%s); retrying in %.1f s; "
                    "this node does not lead cluster jobs until it has",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            log.info("job store: %d job states, %d job definitions loaded", count, definitions)
            self._loaded.set()

    async def wait_loaded(self, timeout: float | None = None) -> None:
        """Return once the store's content is loaded (at once without a store)."""
        async with asyncio.timeout(timeout):
            await self._loaded.wait()

    async def _close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
            self._loader = None
        if self._durable is not None:
            await self._durable.flush()
        if self.store is not None:
            await self.store.close()

    # leadership --------------------------------------------------------------
    async def _lead_scheduler(self, ctx: SingletonContext) -> None:
        """Runs while this node holds the scheduler singleton."""
        self._lead = ctx
        try:
            await self._loaded.wait()  # a node without the stored state must not lead
            self.scheduler.start_leading(self._takeover_states())
            await asyncio.Event().wait()
        finally:
            self._lead = None
            drain = max(0.0, self.node.singletons.drain_bound(ctx.mode) - 0.05)
            final = await self.scheduler.stop_leading(drain)
            for name, state in final.items():
                self._broadcast(name, state)

    def _takeover_states(self) -> dict[str, JobState]:
        """Shared states, minus runs in flight on nodes that are gone (they cannot finish)."""
        alive = {self.node.name, *self.node.nodes()}
        states = self.scheduler.states()
        for state in states.values():
            if state.running_on is not None and state.running_on not in alive:
                state.running_since = state.running_tick = state.running_on = None
        return states

    @property
    def leader(self) -> str | None:
        return self.node.singletons.holders().get(LEADER_SINGLETON)

    # dispatch (called by the Scheduler for every due tick) ----------------------
    async def dispatch(self, job: Job, tick: datetime) -> RunResult | None:
        if job.run_strategy == "random":
            chosen = self._pick(job.name, tick)
            if chosen != self.node.name:
                return None
        elif job.is_cluster and not await self._may_run_cluster_tick(job, tick):
            return None
        return await self.scheduler.run_local(job.name, tick)

    async def _may_run_cluster_tick(self, job: Job, tick: datetime) -> bool:
        lead = self._lead
        if lead is not None and lead.mode == "mesh":
            await self.node.singletons.revalidate()
            lead = self._lead
            seen = self._peer_ticks.get(job.name)
            if seen is not None and seen >= tick:
                log.warning("job %s tick %s not run: a peer already started it", job.name, tick)
                return False
        if lead is None or (lead.mode != "quorum" and not lead.is_valid()):
            log.warning("job %s tick %s not run: this node no longer leads", job.name, tick)
            return False
        if lead.mode == "quorum":
            asked = time.monotonic()
            ok = await self.node.singletons.confirm(LEADER_SINGLETON, job.name, tick.timestamp())
            took = (time.monotonic() - asked) * 1000
            if not ok or self._lead is not lead:
                log.warning(
                    "job %s tick %s not run: no majority confirmation (%.1f ms)",
                    job.name,
                    tick,
                    took,
                )
                return False
            log.info(
                "job %s tick %s confirmed for %s (token %d) in %.1f ms",
                job.name,
                tick.isoformat(),
                self.node.name,
                lead.token,
                took,
            )
        lease = self.node.singletons.lease_backend
        if lead.mode == "lease" and lease is not None:
            try:
                claimed = await lease.claim_tick(LEADER_SINGLETON, lead.token, job.name, tick)
            except Exception as exc:
                log.warning("job %s tick %s not run: lease store error (%s)", job.name, tick, exc)
                return False
            if not claimed:
                log.warning("job %s tick %s not run: fenced off or already run", job.name, tick)
                return False
        return True

    def _pick(self, job: str, tick: datetime) -> str:
        members = sorted([self.node.name, *self.node.nodes()])
        digest = hashlib.sha256(f"{job}\x00{tick.isoformat()}".encode()).digest()
        return members[int.from_bytes(digest[:8], "big") % len(members)]

    async def run_now(self, name: str, timeout: float = 60.0) -> RunResult:
        """Run job `name` now: a cluster job on the current leader (so `overlap=False`
        holds cluster-wide), any other job here. Returns the run's `RunResult`, as
        `Scheduler.run_now` does (a failed run too, with status "error"/"timeout")."""
        job = self.scheduler.find_job(name)
        target = (self.leader or self.node.name) if job.is_cluster else self.node.name
        return await self.run_on(target, name, timeout)

    async def run_on(self, node: str, name: str, timeout: float = 60.0) -> RunResult:
        """Run job `name` now on `node` (this one included); returns the run's `RunResult`.

        On a peer, its scheduler's errors (`JobNotFound`, `JobRunning`, ...) arrive as a
        `RemoteError` whose `type_name` is the error's class name."""
        if node == self.node.name:
            return await self.scheduler.run_now(name)
        reply = await self.node.call(node, RUN_HANDLER, name, timeout=timeout)
        return RunResult.from_wire(reply)

    async def _on_run_request(self, name: Any, _sender: str) -> dict[str, Any]:
        if not isinstance(name, str):
            raise TypeError("job name must be a string")
        return (await self.scheduler.run_now(name)).to_wire()

    # state replication -------------------------------------------------------
    async def _state_changed(self, job: Job, state: JobState) -> None:
        self._broadcast(job.name, state)
        # Let the queued frames reach the sockets before the run begins: a batched
        # (encrypted) connection writes at the end of this loop iteration, and a holder
        # SIGKILLed before that would take its "tick started" marker with it, so the
        # successor would run the tick again.
        await asyncio.sleep(0)

    def _broadcast(self, name: str, state: JobState) -> None:
        self.node.messaging.send_to_peers(STATE_HANDLER, {name: state.to_wire()})

    def _send_states(self, peer: str) -> None:
        """A node that just joined learns every job's state (it may lead next), the run-time
        definitions and the recent history."""
        payload = {name: state.to_wire() for name, state in self.scheduler.states().items()}
        if payload:
            self.node.messaging.send_to_peers(STATE_HANDLER, payload, [peer])
        send = self.node.messaging.send_to_peers
        definitions = [d.to_wire() for d in self.definitions.all()]
        for i in range(0, len(definitions), BATCH):
            send(DEFS_HANDLER, definitions[i : i + BATCH], [peer])
        records = [r.to_wire() for job in self.history.jobs() for r in self.history.runs(job)]
        for i in range(0, len(records), BATCH):
            send(RECORDS_HANDLER, records[i : i + BATCH], [peer])

    def _on_state(self, payload: Any, sender: str) -> None:
        if not isinstance(payload, dict):
            return
        for name, data in payload.items():
            if (
                not isinstance(name, str)
                or name not in self.scheduler
                or not isinstance(data, dict)
            ):
                continue
            try:
                state = JobState.from_wire(data)
            except ValueError as exc:
                log.warning("ignoring job state for %s from %s: %s", name, sender, exc)
                continue
            if state.last_tick is not None:
                seen = self._peer_ticks.get(name)
                if seen is None or state.last_tick > seen:
                    self._peer_ticks[name] = state.last_tick
            self.scheduler.update_state(name, state)

    # run-time jobs ---------------------------------------------------------------
    def task(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator: make a function what run-time jobs naming task ``name`` run. Register
        it on every node (code travels with the image, never over the wire)."""
        if name is not None and not isinstance(name, str):  # `@node.jobs.task` without ()
            raise InvalidJob(
                f"jobs.task(name) takes a name, not {name!r}: "
                "write @node.jobs.task() or @node.jobs.task('name')"
            )

        def register(fn: F) -> F:
            self.definitions.task(name or fn.__name__, fn)
            return fn

        return register

    async def add(
        self, name: str, schedule: str, task: str, *, active: bool = True, **options: Any
    ) -> JobDef:
        """Define job ``name`` on every node: ``schedule`` runs task ``task`` with the job
        ``options`` of ``Scheduler.add_job`` (tz, overlap, timeout, misfire, run_strategy,
        day_match, max_attempts, backoff). Kept in the store when there is one."""
        if name in self.scheduler:
            raise JobExists(name)
        fn = self.definitions.tasks.get(task)
        if fn is None:
            raise InvalidJob(f"no task named {task!r} on this node (see node.jobs.task)")
        try:
            options = check_options(options)
            _validate(schedule, fn, name, options, self.scheduler)
            spec = self.definitions.next(
                name, schedule=schedule, task=task, options=options, active=active
            )
        except InvalidJob:
            raise
        except (ValueError, TypeError) as exc:  # CronError is a ValueError
            raise InvalidJob(f"job {name!r}: {exc}") from None
        return await self._publish(spec)

    async def remove(self, name: str) -> JobDef:
        """Remove run-time job ``name`` from every node (a job defined in code: pause it)."""
        current = self.definitions.get(name)
        if current is None or current.deleted:
            if name in self.scheduler:
                raise InvalidJob(f"job {name!r} is defined in code; pause it instead")
            raise JobNotFound(name)
        if current.defined_in_code:
            raise InvalidJob(f"job {name!r} is defined in code; pause it instead")
        return await self._publish(self.definitions.next(name, deleted=True))

    async def pause(self, name: str) -> JobDef:
        """Stop job ``name`` ticking on every node (a run in flight finishes)."""
        return await self._publish(self._switch(name, active=False))

    async def resume(self, name: str) -> JobDef:
        """Let job ``name`` tick again on every node, from now on."""
        return await self._publish(self._switch(name, active=True))

    def _switch(self, name: str, active: bool) -> JobDef:
        current = self.definitions.get(name)
        if current is not None and not current.deleted and not current.defined_in_code:
            return self.definitions.next(name, active=active)
        if name not in self.scheduler:
            raise JobNotFound(name)
        return self.definitions.next(name, active=active, schedule=None, task=None, options={})

    async def _publish(self, spec: JobDef) -> JobDef:
        """Store (if configured), apply here, tell every peer. A change the store refuses
        is not made anywhere."""
        if self.store is not None:
            await self.store.save_definition(spec.name, spec.version, spec.origin, spec.to_wire())
        self.definitions.adopt(spec)
        self.node.messaging.send_to_peers(DEFS_HANDLER, [spec.to_wire()])
        return spec

    def _on_definitions(self, payload: Any, sender: str) -> None:
        if not isinstance(payload, list):
            return
        for data in payload[:BATCH]:
            try:
                self.definitions.adopt(JobDef.from_wire(data))
            except ValueError as exc:
                log.warning("ignoring a job definition from %s: %s", sender, exc)

    # history -----------------------------------------------------------------------
    def runs(self, name: str, limit: int = HISTORY_LIMIT) -> list[RunRecord]:
        """The last ``limit`` runs of job ``name`` on any node, newest first."""
        if name not in self.scheduler and not self.history.runs(name, 1):
            raise JobNotFound(name)
        return self.history.runs(name, limit)

    def _share_record(self, record: RunRecord) -> None:
        self.node.messaging.send_to_peers(RECORDS_HANDLER, [record.to_wire()])

    def _on_records(self, payload: Any, sender: str) -> None:
        if not isinstance(payload, list):
            return
        for data in payload[:BATCH]:
            try:
                record = RunRecord.from_wire(data)
            except ValueError as exc:
                log.warning("ignoring a run record from %s: %s", sender, exc)
                continue
            if record.job in self.scheduler or self.definitions.get(record.job) is not None:
                self.history.add(record)

    def snapshot(self) -> list[dict[str, Any]]:
        """The scheduler's rows for `/cluster`, with each job's recent runs and origin."""
        rows = self.scheduler.jobs_snapshot()
        for row in rows:
            spec = self.definitions.get(row["name"])
            runtime = spec is not None and not spec.defined_in_code and not spec.deleted
            row["defined"] = "runtime" if runtime else "code"
            row["task"] = spec.task if runtime and spec is not None else None
            row["history"] = [r.to_wire() for r in self.history.runs(row["name"], SNAPSHOT_RUNS)]
        return rows


def _validate(
    schedule: str, fn: Callable[..., Any], name: str, options: dict[str, Any], like: Scheduler
) -> None:
    """Raises what ``add_job`` would, without touching the real scheduler."""
    Scheduler(tz=like.tz, node=like.node).add_job(schedule, fn, name=name, **options)
