"""Cluster-wide singletons: one running instance of a task per cluster, under a name.

Modes (README, "Singletons", states the guarantees):

- `mesh`: at most one per connected group once views agree. The incumbent
  keeps it when nodes join; a graceful stop hands over at once; when two
  holders meet (a healed partition) the older claim survives, ties broken by
  node name, so every node reaches the same verdict.
- `quorum`: runs only where a strict majority of the expected cluster is
  connected. A holder that loses its majority stops before the majority side
  may take over: it checks its peers against a stricter deadline than the
  failure detector's, and the majority side waits a drain bound on top.
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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from shoal.mesh import MembershipEvent
from shoal.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from shoal.lease import LeaseBackend
    from shoal.node import Node

log = logging.getLogger("shoal.singleton")

STATE_HANDLER = "shoal.singleton.state"
# How often holders re-check quorum freshness and lease deadlines.
CHECK_INTERVAL = 0.1
# A singleton task that raised is started again after this pause (no crash loop).
RESTART_DELAY = 1.0


@dataclass
class SingletonContext:
    """What a running singleton task gets: its name, mode, fencing token and validity."""

    name: str
    mode: str
    token: int
    node: Node
    _valid: Callable[[], bool] = field(repr=False, default=lambda: True)

    def is_valid(self) -> bool:
        """False once this node may no longer act as the holder (check before side effects)."""
        return self._valid()


SingletonFunc = Callable[[SingletonContext], Awaitable[None] | None]


@runtime_checkable
class Service(Protocol):
    """A long-lived object run as a singleton: started on claim, stopped on release."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class _PeerState:
    held: dict[str, float]  # singleton name -> claimed_at (wall clock)
    registered: set[str]
    draining: bool


@dataclass
class _Singleton:
    name: str
    func: SingletonFunc
    mode: str
    holding: bool = False
    claimed_at: float = 0.0
    token: int = 0
    task: asyncio.Task[None] | None = None
    holder_lost_at: float = 0.0  # monotonic; quorum mode waits after losing a holder
    lease_valid_until: float = 0.0  # monotonic
    lease_task: asyncio.Task[None] | None = None
    retry_at: float = 0.0  # monotonic; after a crash, not before this
    starts: int = 0


class Singletons:
    """The singletons of one node. Reached as `node.singletons`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self._items: dict[str, _Singleton] = {}
        self._peers: dict[str, _PeerState] = {}
        self._max_seen = 1
        self._settled = False
        self._stopping = False
        self._checker: asyncio.Task[None] | None = None
        self._lease: LeaseBackend | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        node.register(STATE_HANDLER, self._on_peer_state)
        node.add_listener(self._on_membership)

    # public API --------------------------------------------------------------
    def register(self, name: str, func: SingletonFunc | Service, mode: str | None = None) -> None:
        """Run `func(ctx)` (or a Service's start/stop) on exactly one node, under `name`."""
        mode = mode or self.settings.singleton_mode
        if mode not in ("mesh", "quorum", "lease"):
            raise ValueError(f"unknown singleton mode {mode!r}: use mesh, quorum or lease")
        if mode == "lease" and not self.settings.lease_dsn:
            raise ValueError("lease mode needs SHOAL_LEASE_DSN (a Postgres DSN)")
        if name in self._items:
            raise ValueError(f"a singleton named {name!r} is already registered")
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
        }

    def _broadcast(self, peers: list[str] | None = None) -> None:
        self.node.messaging.send_to_peers(STATE_HANDLER, self._local_state(), peers)

    def _on_peer_state(self, payload: Any, sender: str) -> None:
        if not isinstance(payload, dict) or sender not in self.node.nodes():
            return
        held = payload.get("held")
        registered = payload.get("registered")
        if not isinstance(held, dict) or not isinstance(registered, list):
            return
        self._peers[sender] = _PeerState(
            {str(k): float(v) for k, v in held.items() if isinstance(v, int | float)},
            {str(n) for n in registered},
            bool(payload.get("draining")),
        )
        self._reconcile()

    def _on_membership(self, event: MembershipEvent) -> None:
        if event.kind == "up":
            self._max_seen = max(self._max_seen, len(self.node.nodes()) + 1)
            self._broadcast([event.node])
            return
        state = self._peers.pop(event.node, None)
        if state is not None:
            for name in state.held:
                item = self._items.get(name)
                if item is not None:
                    item.holder_lost_at = time.monotonic()
                    log.info("singleton %s: holder %s is down (%s)", name, event.node, event.reason)
        self._reconcile()

    # decisions -----------------------------------------------------------------
    def _holders_of(self, name: str, item: _Singleton | None) -> list[tuple[float, str]]:
        holders = [(s.held[name], peer) for peer, s in self._peers.items() if name in s.held]
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

    def _has_majority(self) -> bool:
        """A strict majority of the expected cluster heard from recently, this node included.

        "Recently" is stricter than the failure detector (one heartbeat less), so a
        cut-off holder stops before the other side can declare it down and take over.
        """
        expected = self.settings.expected_nodes or self._max_seen
        mesh = self.node.mesh
        if mesh is None:
            return False
        window = self.settings.failure_timeout - self.settings.heartbeat_interval
        now = time.monotonic()
        peers = sum(1 for c in mesh.connections.values() if now - c.last_received < window)
        return (peers + 1) * 2 > expected

    def _quorum_delay(self) -> float:
        return self.drain_bound("quorum") + self.settings.heartbeat_interval

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
            elif item.mode != "lease" and holders and holders[0][1] != me:
                self._spawn_release(item, f"{holders[0][1]} holds an older claim")
            return
        if item.mode == "lease" or holders or not self._settled_now():
            return
        if time.monotonic() < item.retry_at:
            return
        candidates = [me] + [
            peer for peer, s in self._peers.items() if item.name in s.registered and not s.draining
        ]
        if min(candidates) != me:
            return
        if item.mode == "quorum":
            # Fresh peers only, as for keeping it: a holder that just stepped down
            # for lack of a fresh majority must not claim again on stale connections.
            if not self._has_majority():
                return
            if time.monotonic() - item.holder_lost_at < self._quorum_delay():
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
        )
        ctx = SingletonContext(item.name, item.mode, token, self.node, lambda: self._valid(item))
        item.task = asyncio.create_task(self._run(item, ctx), name=f"shoal-singleton-{item.name}")
        self._broadcast()

    def _valid(self, item: _Singleton) -> bool:
        if not item.holding or self._stopping:
            return False
        if item.mode == "lease":
            return time.monotonic() < item.lease_valid_until
        if item.mode == "quorum":
            return self._has_majority()
        return True

    async def _run(self, item: _Singleton, ctx: SingletonContext) -> None:
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
            item.task = None
            self._broadcast()
            self._reconcile()

    def _spawn_release(self, item: _Singleton, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release(item, why))
        self._tasks.add(task)  # a task nobody references may be garbage-collected
        task.add_done_callback(self._tasks.discard)

    async def _release(self, item: _Singleton, why: str) -> None:
        """Stop the task (cancellation, bounded drain), then tell the peers."""
        if not item.holding:
            return
        item.holding = False
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
        self._broadcast()
        self._reconcile()

    async def _check_loop(self) -> None:
        """Periodic re-evaluation: quorum freshness and delays depend on time passing."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self._reconcile()

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
                    ok = await asyncio.wait_for(
                        self._lease.renew(item.name, self._owner, item.token, ttl), ttl / 3
                    )
                    if ok:
                        item.lease_valid_until = started + ttl - self.drain_bound("lease")
                    else:
                        await self._release(item, "lease lost")
                elif self.node.ready and not self._stopping:
                    token = await asyncio.wait_for(
                        self._lease.acquire(item.name, self._owner, ttl), ttl / 3
                    )
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
            while time.monotonic() < deadline:
                if item.holding and time.monotonic() >= item.lease_valid_until:
                    await self._release(item, "lease not renewed in time")
                await asyncio.sleep(min(CHECK_INTERVAL, max(0.0, deadline - time.monotonic())))


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
    """A sync singleton runs in a worker thread, so it may block without stalling the node.

    Its `ctx.is_valid()` asks the event loop (the holder's state lives there);
    once the loop is gone it answers False. Cancelling (a release) cannot stop
    the thread: the function stops when `is_valid()` turns False.
    """
    loop = asyncio.get_running_loop()

    def valid_from_thread() -> bool:
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

    outcome = await asyncio.to_thread(func, dataclasses.replace(ctx, _valid=valid_from_thread))
    if inspect.isawaitable(outcome):
        await outcome
