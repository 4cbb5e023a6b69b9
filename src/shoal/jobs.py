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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from shoal.scheduler import Job, JobState, RunResult, Scheduler
from shoal.singleton import Service, SingletonContext, SingletonFunc, Singletons

if TYPE_CHECKING:
    from shoal.mesh import MembershipEvent
    from shoal.messaging import Handler, Messaging

log = logging.getLogger("shoal.jobs")

LEADER_SINGLETON = "shoal.scheduler"
STATE_HANDLER = "shoal.jobs.state"
RUN_HANDLER = "shoal.jobs.run"


class JobsHost(Protocol):
    """What `ClusterJobs` uses of its node: a `shoal.Node` is one."""

    @property
    def name(self) -> str: ...
    @property
    def messaging(self) -> Messaging: ...
    @property
    def singletons(self) -> Singletons: ...

    def nodes(self) -> list[str]: ...

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
        node.register(STATE_HANDLER, self._on_state)
        node.register(RUN_HANDLER, self._on_run_request)
        node.add_singleton(LEADER_SINGLETON, self._lead_scheduler)
        node.add_listener(
            lambda event: self._send_states(event.node) if event.kind == "up" else None
        )

    # leadership --------------------------------------------------------------
    async def _lead_scheduler(self, ctx: SingletonContext) -> None:
        """Runs while this node holds the scheduler singleton."""
        self._lead = ctx
        self.scheduler.start_leading(self._takeover_states())
        try:
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
        """A node that just joined learns every job's state (it may lead next)."""
        payload = {name: state.to_wire() for name, state in self.scheduler.states().items()}
        if payload:
            self.node.messaging.send_to_peers(STATE_HANDLER, payload, [peer])

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
