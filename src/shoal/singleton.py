"""Cluster-wide singletons: one running instance of a task per cluster, under a name.

Modes (README, "Singletons", states the guarantees):

- `mesh`: at most one per connected group once views agree. The incumbent
  keeps it when nodes join; a graceful stop hands over at once; when two
  holders meet (a healed partition) the older claim survives, ties broken by
  node name, so every node reaches the same verdict.
- `quorum`: runs only where a strict majority of the expected cluster is
  connected, and only with that majority's explicit consent (`quorum.py`): a
  claim needs promises from a majority, and acting (a tick, `ctx.is_valid()`)
  needs a fresh confirmation from a majority. A holder that loses its majority
  stops before the majority side may take over: it checks its peers against a
  stricter deadline than the failure detector's, and the majority side waits a
  drain bound on top.
- `lease`: an external lease in Postgres with a fencing token (see `lease.py`).

Nodes exchange their singleton state (what they hold, since when, what they
run, whether they drain) on every change and on every node-up, through the
messaging layer; a node claims nothing until it has heard from every peer it
is connected to and its first discovery round's dials have settled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import shoal.loop
from shoal import logs, wire
from shoal.mesh import MembershipEvent
from shoal.messaging import check_signature
from shoal.quorum import Acceptor, Ballot, majority, parse_ballot
from shoal.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from shoal.config import Settings
    from shoal.lag import LagMonitor
    from shoal.lease import LeaseBackend
    from shoal.mesh import Mesh
    from shoal.messaging import Handler, Messaging

log = logging.getLogger("shoal.singleton")
T = TypeVar("T")

STATE_HANDLER = "shoal.singleton.state"
PREPARE_HANDLER = "shoal.singleton.prepare"
CONFIRM_HANDLER = "shoal.singleton.confirm"
# The longest singleton name. Every name travels in each state message (several times),
# which must fit in one frame: a longer one ended the singletons' checker on its first
# broadcast (MessageTooLarge), and with it every singleton and the cron leader.
MAX_NAME = 200
# The cron leader's singleton (shoal.jobs), registered when the node starts, after the
# app's: its room in the state message is kept from the start (`_check_state_fits`).
SCHEDULER_LEADER = "shoal.scheduler"
# How often holders re-check quorum freshness and lease deadlines.
CHECK_INTERVAL = 0.1
# A singleton task that raised is started again after this pause (no crash loop).
RESTART_DELAY = 1.0


class SingletonHost(Protocol):
    """What `Singletons` uses of its node: a `shoal.Node` is one. A test may pass
    another object with these members, so this module reads and tests on its own."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def messaging(self) -> Messaging: ...
    @property
    def mesh(self) -> Mesh | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def lag(self) -> LagMonitor: ...

    def nodes(self) -> list[str]: ...

    def register(
        self, name: str, handler: Handler, *, sync_to_thread: bool | None = None
    ) -> None: ...

    def add_listener(self, listener: Callable[[MembershipEvent], None]) -> Callable[[], None]: ...

    async def call(self, node: str, handler: str, payload: Any, timeout: float = 5.0) -> Any: ...


@dataclass
class SingletonContext:
    """What a running singleton task gets: its name, mode, fencing token and validity."""

    name: str
    mode: str
    token: int
    #: The node running the singleton (the app's `shoal.Node`).
    node: SingletonHost
    _valid: Callable[[], bool] = field(repr=False, default=lambda: True)
    _confirm: Callable[[], Awaitable[bool]] | None = field(repr=False, default=None)

    def is_valid(self) -> bool:
        """False once this node may no longer act as the holder (check before side effects).

        Quorum mode: True only within the confirmation window (see the README) of the
        last majority confirmation, measured on the monotonic clock, which runs on
        while a process is paused; lease mode: within the lease, less the drain
        bound; mesh mode: while this node's view says it holds, and not right after
        an event-loop stall (until the view has been checked again).
        """
        return self._valid()

    async def confirm(self) -> bool:
        """Ask now: may this node still act as the holder? Quorum mode asks a majority
        (one round trip); mesh mode re-checks its view after a stall; lease mode is
        `is_valid()`. Await it right before a side effect that must not happen twice."""
        if self._confirm is None:
            return self.is_valid()
        return await self._confirm()


SingletonFunc = Callable[[SingletonContext], Awaitable[None] | None]


@runtime_checkable
class Service(Protocol):
    """A long-lived object run as a singleton: started on claim, stopped on release."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _PeerState(NamedTuple):
    held: dict[str, float]  # singleton name -> claimed_at (wall clock)
    registered: set[str]
    draining: bool


class _Singleton:
    """One registered singleton and what this node knows of its holding."""

    def __init__(self, name: str, func: SingletonFunc, mode: str) -> None:
        self.name = name
        self.func = func
        self.mode = mode
        self.holding = False
        self.claimed_at = 0.0
        self.token = 0
        self.task: asyncio.Task[None] | None = None
        self.lease_valid_until = 0.0  # monotonic
        self.lease_task: asyncio.Task[None] | None = None
        self.retry_at = 0.0  # monotonic; after a crash, not before this
        self.starts = 0
        self.ballot: Ballot = (0, "")  # quorum mode: the ballot this node holds (or claims) with
        self.confirmed_until = 0.0  # monotonic; quorum mode: end of the confirmation window
        self.claiming = False
        self.renewing = False


class Singletons:
    """The singletons of one node. Reached as `node.singletons`."""

    def __init__(self, node: SingletonHost) -> None:
        self.node = node
        self.settings = node.settings
        self._items: dict[str, _Singleton] = {}
        self._peers: dict[str, _PeerState] = {}
        self._max_seen = 1
        self._settled = False
        self._stopping = False
        self._checker: asyncio.Task[None] | None = None
        self._too_large = RateLimitedLog(log, streak=False)  # state sent without foreign ballots
        self._revalidating = False
        self._lost_at: dict[str, float] = {}  # peer -> monotonic time it went down
        self._lease: LeaseBackend | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.window = self.settings.failure_timeout - self.settings.heartbeat_interval
        self.acceptor = Acceptor(self.window)
        node.register(STATE_HANDLER, self._on_peer_state)
        node.register(PREPARE_HANDLER, self._on_prepare)
        node.register(CONFIRM_HANDLER, self._on_confirm)
        node.add_listener(self._on_membership)

    # public API --------------------------------------------------------------
    def register(self, name: str, func: SingletonFunc | Service, mode: str | None = None) -> None:
        """Run `func(ctx)` (or a Service's start/stop) on exactly one node, under `name`."""
        mode = mode or self.settings.singleton_mode
        if mode not in ("mesh", "quorum", "lease"):
            raise ValueError(f"unknown singleton mode {mode!r}: use mesh, quorum or lease")
        if mode == "lease" and not self.settings.lease_dsn:
            raise ValueError("lease mode needs SHOAL_LEASE_DSN (a Postgres DSN)")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            shown = repr(name) if not isinstance(name, str) else f"{len(name)} characters"
            raise ValueError(f"a singleton's name is a string of 1-{MAX_NAME} characters: {shown}")
        if name in self._items:
            raise ValueError(f"a singleton named {name!r} is already registered")
        if not isinstance(func, Service):
            check_signature(f"singleton {name!r}", func, "(ctx), or be a Service", None)
        self._check_state_fits([*self._items, name])
        run = _service_runner(func) if isinstance(func, Service) else func
        self._items[name] = _Singleton(name, run, mode)
        if self._checker is not None:
            self._start_item(self._items[name])
            self._broadcast()
            self._reconcile()

    def holders(self) -> dict[str, str | None]:
        """Singleton name -> the node that runs it (as far as this node knows), or None."""
        names = set(self._items) | {n for s in self._peers.values() for n in s.held}
        result: dict[str, str | None] = {}
        for name in sorted(names):
            holders = self._holders_of(name, self._items.get(name))
            result[name] = holders[0][1] if holders else None
        return result

    def starts(self, name: str) -> int:
        """How many times this node started singleton `name` (its takeovers)."""
        item = self._items.get(name)
        return item.starts if item else 0

    def is_holder(self, name: str) -> bool:
        item = self._items.get(name)
        return bool(item and item.holding)

    def snapshot(self) -> dict[str, Any]:
        """For `/cluster` and `shoal status`: holder, mode and token of each singleton."""
        holders = self.holders()
        return {
            name: {
                "holder": holder,
                "mode": self._items[name].mode if name in self._items else None,
                "token": self._items[name].token if name in self._items else None,
            }
            for name, holder in holders.items()
        }

    # lifecycle (driven by Node) ------------------------------------------------
    async def start(self) -> None:
        if any(item.mode == "lease" for item in self._items.values()) or (
            self.settings.singleton_mode == "lease"
        ):
            from shoal.lease import LeaseBackend

            assert self.settings.lease_dsn is not None
            self._lease = LeaseBackend(self.settings.lease_dsn)
        for item in self._items.values():
            self._start_item(item)
        self._checker = asyncio.create_task(self._check_loop(), name="shoal-singletons")

    def _start_item(self, item: _Singleton) -> None:
        if item.mode == "lease" and item.lease_task is None:
            item.lease_task = asyncio.create_task(
                self._lease_loop(item), name=f"shoal-lease-{item.name}"
            )

    async def stop(self) -> None:
        """Graceful stop: stop running tasks (bounded drain), tell peers, so they take over."""
        self._stopping = True
        self._broadcast()  # peers stop counting us as a candidate
        for item in self._items.values():
            if item.lease_task is not None:
                item.lease_task.cancel()
        await asyncio.gather(
            *(self._release(item, "node stopping") for item in self._items.values())
        )
        if self._checker is not None:
            self._checker.cancel()
        if self._lease is not None:
            await self._lease.close()

    # state exchange ----------------------------------------------------------
    def _local_state(self) -> dict[str, Any]:
        return {
            "held": {n: i.claimed_at for n, i in self._items.items() if i.holding},
            "registered": sorted(self._items),
            "draining": self._stopping,
            # Not held, but not released either: a confirmation we asked may make us hold.
            "claiming": sorted(n for n, i in self._items.items() if i.claiming),
            "ballots": {n: list(b) for n, b in self.acceptor.promised.items()},
        }

    def _check_state_fits(self, names: list[str]) -> None:
        """Refuse a singleton whose name would make the state message outgrow one frame
        at its largest (every name held, claimed and balloted): that broadcast would fail
        with MessageTooLarge in the checker, and no singleton would run again."""
        longest_node_name = "n" * 320
        counted = names if SCHEDULER_LEADER in names else [*names, SCHEDULER_LEADER]
        worst = {
            "held": dict.fromkeys(counted, 0.0),
            "registered": counted,
            "draining": False,
            "claiming": counted,
            "ballots": {n: [2**63 - 1, longest_node_name] for n in counted},
        }
        try:
            wire.encode_frame([wire.SEND, STATE_HANDLER, worst], self.settings.max_frame_size)
        except wire.MessageTooLarge:
            raise ValueError(
                f"too many singletons: with {names[-1]!r}, their {len(names)} names would not "
                f"fit in one state message (SHOAL_MAX_FRAME_BYTES={self.settings.max_frame_size})"
            ) from None

    def _broadcast(self, peers: list[str] | None = None) -> None:
        state = self._local_state()
        try:
            self.node.messaging.send_to_peers(STATE_HANDLER, state, peers)
        except wire.MessageTooLarge:
            # The acceptor's ballots also name singletons only other nodes register, which
            # `_check_state_fits` cannot count. Learning them is an extra (each acceptor
            # keeps its own promises), so send ours only: that fits, as registration checked.
            own = {n: b for n, b in state["ballots"].items() if n in self._items}
            self._too_large.problem(
                "state",
                "singleton state too large for one frame (SHOAL_MAX_FRAME_BYTES=%d) with the "
                "ballots of %d singletons other nodes register: sent without them",
                self.settings.max_frame_size,
                len(state["ballots"]) - len(own),
            )
            state["ballots"] = own
            self.node.messaging.send_to_peers(STATE_HANDLER, state, peers)

    def _on_peer_state(self, payload: Any, sender: str) -> None:
        if not isinstance(payload, dict) or sender not in self.node.nodes():
            return
        held = payload.get("held")
        registered = payload.get("registered")
        if not isinstance(held, dict) or not isinstance(registered, list):
            return
        state = _PeerState(
            {str(k): float(v) for k, v in held.items() if isinstance(v, int | float)},
            {str(n) for n in registered},
            bool(payload.get("draining")),
        )
        self._peers[sender] = state
        ballots = payload.get("ballots")
        if isinstance(ballots, dict):
            for name, value in ballots.items():
                ballot = parse_ballot(value)
                if isinstance(name, str) and ballot is not None:
                    self.acceptor.learn(name, ballot)
        released = state.registered - set(state.held)
        claiming = payload.get("claiming")
        if isinstance(claiming, list):
            released -= {str(n) for n in claiming}
        for name in released:
            # A holder that says it stopped no longer acts on its confirmations.
            self.acceptor.released(name, sender)
        self._reconcile()

    def _on_membership(self, event: MembershipEvent) -> None:
        if event.kind == "up":
            self._max_seen = max(self._max_seen, len(self.node.nodes()) + 1)
            self._broadcast([event.node])
            return
        self._lost_at[event.node] = time.monotonic()
        state = self._peers.pop(event.node, None)
        if state is not None:
            for name in state.held:
                item = self._items.get(name)
                if item is not None:
                    log.info("singleton %s: holder %s is down (%s)", name, event.node, event.reason)
        self._reconcile()

    # decisions -----------------------------------------------------------------
    def _holders_of(self, name: str, item: _Singleton | None) -> list[tuple[float, str]]:
        """(claimed at, node) of the holders we know of, oldest claim first.

        In quorum mode a holder we have not heard from for the confirmation window
        no longer counts: it has stepped down by now (it lost its majority), or
        could not have renewed, so claimants need not wait for the failure
        detector (3 s by default) to call it down."""
        fresh = self._fresh_peers() if item is not None and item.mode == "quorum" else None
        holders = [
            (s.held[name], peer)
            for peer, s in self._peers.items()
            if name in s.held and (fresh is None or peer in fresh)
        ]
        if item is not None and item.holding:
            holders.append((item.claimed_at, self.node.name))
        return sorted(holders)

    def _settled_now(self) -> bool:
        """First discovery round done, its dials finished, and every peer has told its state."""
        if not self._settled:
            mesh = self.node.mesh
            if not (self.node.ready and mesh is not None and not mesh.dialing):
                return False
            self._settled = True
        return all(peer in self._peers for peer in self.node.nodes())

    def _expected(self) -> int:
        return self.settings.expected_nodes or self._max_seen

    def _has_majority(self) -> bool:
        """A strict majority of the expected cluster heard from recently, this node included.

        "Recently" is stricter than the failure detector (one heartbeat less), so a
        cut-off holder stops before the other side can declare it down and take over.
        """
        return (len(self._fresh_peers()) + 1) * 2 > self._expected()

    def _stop_margin(self) -> float:
        """How long before its confirmation lapses a quorum holder without a newer one
        steps down: its drain bound (and one check), but at most half of the time
        between renewals and the lapse, so that two renewals can be tried first."""
        renew_ahead = self.window - self.settings.heartbeat_interval
        return min(self.drain_bound("quorum") + CHECK_INTERVAL, renew_ahead / 2)

    def _drain_overrun(self) -> float:
        """How long a stepped-down holder's task may outlive its confirmation (short
        timeouts only: 0.1 s by default); a claimant waits that much longer."""
        return self.drain_bound("quorum") + CHECK_INTERVAL - self._stop_margin()

    def _fresh_peers(self) -> set[str]:
        """Peers heard from within the confirmation window (failure timeout - one heartbeat)."""
        mesh = self.node.mesh
        if mesh is None:
            return set()
        now = time.monotonic()
        return {p for p, c in mesh.connections.items() if now - c.last_received < self.window}

    @property
    def lease_backend(self) -> LeaseBackend | None:
        """The Postgres lease store, when a lease-mode singleton is registered."""
        return self._lease

    def drain_bound(self, mode: str) -> float:
        """How long a released singleton task may take to stop, per mode."""
        if mode == "quorum":
            return min(self.settings.drain_timeout, 1.0)
        if mode == "lease":
            return min(self.settings.drain_timeout, self.settings.lease_ttl / 5)
        return self.settings.drain_timeout

    def _reconcile(self) -> None:
        if self._stopping or self.node.mesh is None:
            return
        for item in self._items.values():
            self._reconcile_item(item)

    def _reconcile_item(self, item: _Singleton) -> None:
        holders = self._holders_of(item.name, item)
        me = self.node.name
        if item.holding:
            if item.mode == "quorum" and not self._has_majority():
                self._spawn_release(item, "lost the majority")
            elif item.mode == "quorum" and time.monotonic() >= item.confirmed_until - (
                self._stop_margin()
            ):
                # Early, so that the task has stopped (drain bound) about when the
                # confirmation lapses, which is when a successor may start.
                self._spawn_release(item, "no majority confirmation in time")
            elif item.mode != "lease" and holders and holders[0][1] != me:
                self._spawn_release(item, f"{holders[0][1]} holds an older claim")
            return
        if item.mode == "lease" or holders or not self._settled_now():
            return
        if time.monotonic() < item.retry_at:
            return
        fresh = self._fresh_peers() if item.mode == "quorum" else None  # as in `_holders_of`
        candidates = [me] + [
            peer
            for peer, s in self._peers.items()
            if item.name in s.registered and not s.draining and (fresh is None or peer in fresh)
        ]
        if min(candidates) != me:
            return
        if item.mode == "quorum":
            # Fresh peers only, as for keeping it: a holder that just stepped down
            # for lack of a fresh majority must not claim again on stale connections.
            # No other wait: the promisers' answers say how long ago they confirmed
            # the old holder, and the claim waits until that confirmation has lapsed
            # (`_claim_quorum`); the old holder stopped its task before it lapsed.
            if not self._has_majority():
                return
            if not item.claiming:
                item.claiming = True
                self._spawn(self._claim_quorum(item))
            return
        self._claim(item, token=item.token + 1)

    def _claim(self, item: _Singleton, token: int) -> None:
        item.holding = True
        item.claimed_at = time.time()
        item.token = token
        item.starts += 1
        log.info(
            "singleton %s: running on %s (mode %s, token %d)",
            item.name,
            self.node.name,
            item.mode,
            token,
            extra={"singleton": item.name, "token": token},
        )
        ctx = SingletonContext(
            item.name,
            item.mode,
            token,
            self.node,
            lambda: self._valid(item),
            lambda: self.confirm(item.name),
        )
        item.task = asyncio.create_task(self._run(item, ctx), name=f"shoal-singleton-{item.name}")
        self._broadcast()

    def _valid(self, item: _Singleton) -> bool:
        if not item.holding or self._stopping:
            return False
        if item.mode == "lease":
            return time.monotonic() < item.lease_valid_until
        if item.mode == "quorum":
            return time.monotonic() < item.confirmed_until
        return not self.node.lag.stalled_recently()

    async def _run(self, item: _Singleton, ctx: SingletonContext) -> None:
        logs.bind(singleton=item.name, token=ctx.token)  # this task and those it starts
        try:
            if _is_async(item.func):
                await item.func(ctx)  # type: ignore[misc]  # async, so an awaitable
            else:
                await _run_in_thread(item.func, ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "singleton %s failed; it will be started again in %.0f s", item.name, RESTART_DELAY
            )
            item.retry_at = time.monotonic() + RESTART_DELAY
            item.holding = False
            item.confirmed_until = 0.0
            item.task = None
            self._broadcast()
            self._reconcile()

    def _spawn_release(self, item: _Singleton, why: str) -> None:
        self._spawn(self._release(item, why))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a task nobody references may be garbage-collected
        task.add_done_callback(self._tasks.discard)

    async def _release(self, item: _Singleton, why: str) -> None:
        """Stop the task (cancellation, bounded drain), then tell the peers."""
        if not item.holding:
            return
        item.holding = False
        item.confirmed_until = 0.0
        task, item.task = item.task, None
        log.info("singleton %s: stopping on %s (%s)", item.name, self.node.name, why)
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=self.drain_bound(item.mode))
            if not done:
                log.warning("singleton %s did not stop within its drain bound", item.name)
        if item.mode == "lease" and self._lease is not None and self._stopping:
            with contextlib.suppress(Exception):
                await self._lease.release(item.name, self._owner, item.token)
        if item.mode == "quorum":
            # What the peers do on the broadcast below, for our own acceptor too: else a
            # successor whose majority counts our answer waits out our last confirmation.
            self.acceptor.released(item.name, self.node.name)
        self._broadcast()
        self._reconcile()

    async def _check_loop(self) -> None:
        """Periodic re-evaluation: quorum freshness and delays depend on time passing."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            if self.node.lag.stalled_recently() and not self._revalidating:
                self._revalidating = True
                self._spawn(self._revalidate_in_background())
            self._reconcile()
            self._renew_confirmations()

    async def _revalidate_in_background(self) -> None:
        try:
            await self.revalidate()
        finally:
            self._revalidating = False

    # quorum mode: promises and confirmations (see quorum.py) ------------------
    async def confirm(self, name: str, job: str | None = None, tick: float | None = None) -> bool:
        """May this node act as `name`'s holder now (and run `job`'s `tick`, once)?

        Quorum mode asks a majority (one round trip); mesh mode re-checks its view
        after an event-loop stall; lease mode answers from the lease.
        """
        item = self._items.get(name)
        if item is None or not item.holding:
            return False
        if item.mode == "quorum":
            return await self._confirm_round(item, job, tick)
        if item.mode == "mesh":
            await self.revalidate()
        return self._valid(item)

    async def revalidate(self) -> None:
        """After an event-loop stall: wait (bounded by the failure timeout) until the
        peers lost since the stall began are back, and every peer has been heard from
        since, so decisions use a fresh view (their singleton and job states)."""
        lag = self.node.lag
        if not lag.stalled_recently():
            return
        since = lag.last_stall_end
        began = since - lag.last_stall
        deadline = since + self.settings.failure_timeout
        mesh = self.node.mesh
        while time.monotonic() < deadline and mesh is not None:
            conns = mesh.connections
            lost = [p for p, at in self._lost_at.items() if at >= began and p not in conns]
            fresh = all(
                c.last_received > since + self.settings.heartbeat_interval for c in conns.values()
            )
            if fresh and not lost and all(p in self._peers for p in conns):
                break
            await asyncio.sleep(CHECK_INTERVAL / 2)
        lag.revalidated(since)
        self._reconcile()

    async def _ask(
        self, handler: str, payload: dict[str, Any], local: dict[str, Any]
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Ask this node's acceptor (`local`, already answered) and every connected peer;
        True as soon as a majority of the expected cluster said yes."""
        need = majority(self._expected())
        replies = [local]
        yes = 1 if local.get("ok") is True else 0
        peers = self.node.nodes()
        if yes >= need or yes + len(peers) < need:
            return yes >= need, replies
        timeout = min(1.0, self.window / 2)
        calls = [
            asyncio.ensure_future(self.node.call(p, handler, payload, timeout=timeout))
            for p in peers
        ]
        try:
            for next_reply in asyncio.as_completed(calls):
                try:
                    reply = await next_reply
                except Exception:
                    continue
                if isinstance(reply, dict):
                    replies.append(reply)
                    yes += reply.get("ok") is True
                if yes >= need:
                    return True, replies
            return False, replies
        finally:
            for call in calls:
                call.cancel()

    def _learn(self, name: str, replies: list[dict[str, Any]]) -> Ballot:
        """Raise our promise to the highest ballot the replies name; return it."""
        for reply in replies:
            ballot = parse_ballot(reply.get("promised"))
            if ballot is not None:
                self.acceptor.learn(name, ballot)
        return self.acceptor.highest(name)

    async def _confirm_round(
        self, item: _Singleton, job: str | None = None, tick: float | None = None
    ) -> bool:
        ballot = item.ballot
        payload: dict[str, Any] = {"name": item.name, "ballot": list(ballot)}
        if job is not None and tick is not None:
            payload.update(job=job, tick=tick)
        asked = time.monotonic()
        local = self.acceptor.confirm(item.name, ballot, job, tick)
        ok, replies = await self._ask(CONFIRM_HANDLER, payload, local)
        highest = self._learn(item.name, replies)
        if item.ballot != ballot or not (item.holding or item.claiming):
            return False
        if highest > ballot and item.holding:
            self._spawn_release(item, f"superseded by token {highest[0]} of {highest[1]}")
            return False
        if ok:
            item.confirmed_until = max(item.confirmed_until, asked + self.window)
        elif job is not None:
            whys = sorted({str(r.get("why")) for r in replies if r.get("ok") is not True})
            log.warning(
                "singleton %s: tick %s of job %s not confirmed by a majority (%s)",
                item.name,
                tick,
                job,
                "; ".join(whys) or "no answer",
            )
        return ok

    def _renew_confirmations(self) -> None:
        """Quorum holders re-confirm every heartbeat, so `is_valid()` stays true."""
        now = time.monotonic()
        for item in self._items.values():
            if (
                item.mode == "quorum"
                and item.holding
                and not item.renewing
                and item.confirmed_until - now < self.window - self.settings.heartbeat_interval
            ):
                item.renewing = True
                self._spawn(self._renew(item))

    async def _renew(self, item: _Singleton) -> None:
        try:
            await self._confirm_round(item)
        finally:
            item.renewing = False

    async def _claim_quorum(self, item: _Singleton) -> None:
        """Promises from a majority for a new ballot, the old holder's window lapsed,
        one confirmation: then run. Any failure leaves it to the next reconcile."""
        try:
            token = max(item.token, self.acceptor.highest(item.name)[0]) + 1
            ballot: Ballot = (token, self.node.name)
            payload = {"name": item.name, "ballot": list(ballot)}
            ok, replies = await self._ask(
                PREPARE_HANDLER, payload, self.acceptor.prepare(item.name, ballot)
            )
            if self._learn(item.name, replies) > ballot or not ok:
                log.debug("singleton %s: no majority promised token %d", item.name, token)
                item.retry_at = time.monotonic() + CHECK_INTERVAL * 3
                return
            ages = [r["age"] for r in replies if isinstance(r.get("age"), int | float)]
            overrun = self._drain_overrun()
            wait = max([self.window - float(age) + overrun for age in ages], default=0.0)
            if wait > 0:
                log.info(
                    "singleton %s: waiting %.2f s for the previous holder's window to lapse",
                    item.name,
                    wait,
                )
                await asyncio.sleep(wait)
            if self._stopping or item.holding or self.acceptor.highest(item.name) != ballot:
                return
            item.ballot = ballot
            if await self._confirm_round(item) and not self._stopping and not item.holding:
                self._claim(item, token)
        finally:
            item.claiming = False

    def _on_prepare(self, payload: Any, sender: str) -> dict[str, Any]:
        request = _parse_request(payload, sender)
        if request is None:
            return {"ok": False, "why": "malformed request"}
        return self.acceptor.prepare(request[0], request[1])

    def _on_confirm(self, payload: Any, sender: str) -> dict[str, Any]:
        request = _parse_request(payload, sender)
        if request is None:
            return {"ok": False, "why": "malformed request"}
        name, ballot = request
        job, tick = payload.get("job"), payload.get("tick")
        if job is not None or tick is not None:
            if not isinstance(job, str) or not isinstance(tick, int | float):
                return {"ok": False, "why": "malformed request"}
            return self.acceptor.confirm(name, ballot, job, float(tick))
        return self.acceptor.confirm(name, ballot)

    # lease mode --------------------------------------------------------------
    @property
    def _owner(self) -> str:
        mesh = self.node.mesh
        incarnation = mesh.incarnation.hex() if mesh is not None else ""
        return f"{self.node.name}/{incarnation}"

    async def _lease_loop(self, item: _Singleton) -> None:
        """Acquire or renew every ttl/3; stop the task before the lease can expire."""
        assert self._lease is not None
        ttl = self.settings.lease_ttl
        problems = RateLimitedLog(log)
        while True:
            started = time.monotonic()
            try:
                if item.holding:
                    # Never past the moment the holder must stop (a hung database).
                    left = max(0.0, min(ttl / 3, item.lease_valid_until - started))
                    ok = await _within(
                        self._lease.renew(item.name, self._owner, item.token, ttl), left
                    )
                    if ok:
                        item.lease_valid_until = started + ttl - self.drain_bound("lease")
                    else:
                        await self._release(item, "lease lost")
                elif self.node.ready and not self._stopping:
                    token = await _within(self._lease.acquire(item.name, self._owner, ttl), ttl / 3)
                    if token is not None:
                        item.lease_valid_until = started + ttl - self.drain_bound("lease")
                        self._claim(item, token)
            except Exception as exc:  # asyncpg's errors do not share a base with OSError
                problems.problem(
                    type(exc).__name__,
                    "singleton %s: lease store error (%s: %s)",
                    item.name,
                    type(exc).__name__,
                    exc,
                )
            else:
                problems.recovered("singleton %s: lease store reachable again", item.name)
            deadline = started + ttl / 3
            while True:  # checked at least once: a call that timed out used the whole period
                if item.holding and time.monotonic() >= item.lease_valid_until:
                    await self._release(item, "lease not renewed in time")
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(min(CHECK_INTERVAL, deadline - time.monotonic()))


async def _within(call: Awaitable[T], timeout: float) -> T:
    """`call`'s result, or TimeoutError after `timeout` s. Unlike `asyncio.wait_for`, it does
    not wait for the cancelled call to end: asyncpg's cancellation itself talks to the
    server, so against a hung database it would hang too, and the lease loop would miss
    the deadline at which its holder must stop."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        raise TimeoutError(f"no answer within {timeout:.2f} s")
    return task.result()


def _parse_request(payload: Any, sender: str) -> tuple[str, Ballot] | None:
    """(name, ballot) of a prepare/confirm request; the ballot must be the sender's own."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    ballot = parse_ballot(payload.get("ballot"))
    if ballot is None or ballot[1] != sender:
        return None
    return payload["name"], ballot


def _service_runner(service: Service) -> SingletonFunc:
    async def run(_ctx: SingletonContext) -> None:
        await service.start()
        try:
            await asyncio.Event().wait()
        finally:
            await service.stop()

    return run


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


async def _run_in_thread(func: SingletonFunc, ctx: SingletonContext) -> None:
    """A sync singleton runs in a thread of its own, so it may block without stalling the
    node, nor the other sync singletons and jobs.

    Its `ctx.is_valid()` asks the event loop (the holder's state lives there);
    once the loop is gone it answers False. Cancelling (a release) cannot stop
    the thread: the function stops when `is_valid()` turns False. An awaitable it
    returns runs on the loop with that same context: there it answers directly.
    """
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def valid_from_thread() -> bool:
        if threading.get_ident() == loop_thread:  # waiting on our own loop would block it
            return ctx.is_valid()
        answer: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def ask() -> None:
            try:
                answer.set_result(ctx.is_valid())
            except Exception as exc:
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(ask)
            return answer.result(timeout=5.0)
        except (RuntimeError, concurrent.futures.TimeoutError):  # the loop is closed or stuck
            return False

    # A thread of its own: it may hold it for as long as it is the holder.
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"shoal-{ctx.name}")
    try:
        outcome = await shoal.loop.in_thread(
            thread, func, dataclasses.replace(ctx, _valid=valid_from_thread)
        )
    finally:
        thread.shutdown(wait=False)
    if inspect.isawaitable(outcome):
        await outcome
