"""`Node`: the one object an application holds.

node = Node.from_env()
await node.start()
reply = await node.call("hi@10.0.0.3", "greet", {"who": "vegeta"})
await node.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import shoal.loop
from shoal import logs, wire
from shoal.config import ConfigError, Peer, Settings, parse_hosts
from shoal.discovery import Strategy, strategy_for
from shoal.lag import LagMonitor
from shoal.mesh import MembershipEvent, Mesh, NodeDown, claim_port
from shoal.messaging import (
    Handler,
    Messaging,
    Subscription,
    WaitTimeout,
    check_signature,
    check_timeout,
)
from shoal.singleton import Service, SingletonFunc, Singletons

if TYPE_CHECKING:
    from shoal.control import ControlServer
    from shoal.jobs import ClusterJobs
    from shoal.scheduler import Scheduler

log = logging.getLogger("shoal.node")
# Events a `membership_events()` consumer may fall behind by; then the oldest are dropped.
MEMBERSHIP_QUEUE = 1000

MembershipListener = Callable[[MembershipEvent], None]
JobFunc = TypeVar("JobFunc", bound=Callable[..., Any])


def _has_asyncpg() -> bool:
    import importlib.util  # here: only a node with SHOAL_LEASE_DSN asks

    return importlib.util.find_spec("asyncpg") is not None


class Node:
    """A shoal node: mesh, discovery and messaging for one process."""

    def __init__(self, settings: Settings, strategy: Strategy | None = None) -> None:
        settings.validate()
        # Several nodes per host: the name carries the port claimed here (shoal.mesh).
        settings, self._claimed_port = claim_port(settings)
        self.settings = settings
        self.name = settings.name
        self.started_at = time.time()
        self.messaging = Messaging(settings)
        self.mesh: Mesh | None = None
        self.control: ControlServer | None = None
        self._strategy = strategy
        self._listeners: list[MembershipListener] = []
        self._discovery_task: asyncio.Task[None] | None = None
        self._first_round = asyncio.Event()
        self._stop_hooks: list[Callable[[], Any]] = []
        self.draining = False
        self.listening = False
        self._stopped = False
        self.messaging.register("shoal.ping", lambda _payload, _sender: "pong")
        self.lag = LagMonitor()
        self.singletons = Singletons(self)
        self._jobs: ClusterJobs | None = None
        if settings.lease_dsn:  # with a store: its stop hook runs after the app's, as before
            self._jobs = self._make_jobs()

    @property
    def jobs(self) -> ClusterJobs:
        """The cluster's jobs on this node (shoal.jobs): made on first use, at the latest
        by `start`, so that `import shoal` and `Node(...)` do not import the jobs modules."""
        if self._jobs is None:
            self._jobs = self._make_jobs()
        return self._jobs

    @property
    def scheduler(self) -> Scheduler:
        """This node's cron engine (shoal.scheduler); `job` adds to it."""
        return self.jobs.scheduler

    def _make_jobs(self) -> ClusterJobs:
        from shoal.jobs import ClusterJobs
        from shoal.scheduler import Scheduler

        return ClusterJobs(self, Scheduler(node=self.name))

    @classmethod
    def from_env(cls, **overrides: Any) -> Node:
        """A node configured by the contract's environment variables (see README)."""
        return cls(Settings.from_env(**overrides))

    @property
    def basename(self) -> str:
        return self.settings.basename

    @property
    def cookie_fingerprint(self) -> str:
        return wire.cookie_fingerprint(self.settings.cookie)

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Listen on the mesh port and start discovery. Returns once listening."""
        if self.mesh is not None:  # a second mesh would orphan the first one, still serving
            raise RuntimeError(f"node {self.name} is already started")
        if self._stopped:  # it would serve but stay draining: never ready, never a holder
            raise RuntimeError(
                f"node {self.name} was stopped and a Node starts once: make a new Node(settings)"
            )
        logs.bind(node=self.name)  # the caller's task and every task started from here on
        if self.settings.tls is not None and shoal.loop.name() == "uvloop":
            raise ConfigError(
                f"TLS on the mesh needs asyncio's event loop: {shoal.loop.TLS_REASON}"
            )
        if self.settings.lease_dsn and not _has_asyncpg():
            # Retrying cannot install it: without this the node would serve but never run
            # a singleton or a cluster job, saying why only in its log.
            raise ConfigError(
                "SHOAL_LEASE_DSN (the lease and the job store) needs asyncpg: "
                "pip install 'shoal[lease]'"
            )
        # The jobs register their handlers and leader singleton before any peer can talk to us.
        jobs = self.jobs
        claimed, self._claimed_port = self._claimed_port, None
        self.mesh = Mesh(self.settings, self.messaging.on_frame, self._membership_changed, claimed)
        self.messaging.mesh = self.mesh
        try:
            await self.mesh.start()
            self.lag.start()
            strategy = self._strategy or strategy_for(self.settings)
            await self.singletons.start()
            await jobs.start()
        except BaseException:
            # Not started: no port left bound, and no mesh left behind, so that the app
            # may start again (e.g. once the port is free).
            await self.mesh.stop()
            await self.lag.stop()
            self.mesh = self.messaging.mesh = None
            raise
        self.listening = True
        self._discovery_task = asyncio.create_task(
            self._run_discovery(strategy), name="shoal-discovery"
        )
        from shoal.control import ControlServer  # only a started node has a control socket

        self.control = ControlServer(self)
        try:
            await self.control.start()
        except OSError as exc:  # the node works without it; only `shoal` cannot reach it
            log.warning(
                "no control socket (%s): `shoal status`/`remote` cannot reach this node", exc
            )
            self.control = None
        log.info(
            "node %s listening on %s:%d (topology %s, %s loop, cookie %s)",
            self.name,
            self.settings.host,
            self.settings.listen_port,
            self.settings.topology,
            shoal.loop.name(),
            self.cookie_fingerprint,
        )

    async def stop(self) -> None:
        """Leave gracefully: hand over what this node runs, tell peers, close."""
        if self.mesh is None:
            if self._claimed_port is not None:  # never started: free the port it claimed
                self._claimed_port.sock.close()
                self._claimed_port = None
            return
        self.draining = self._stopped = True
        # Hand over first (the handover gap is what peers wait for), then drain the rest.
        await self.singletons.stop()
        await self.scheduler.stop(self.settings.drain_timeout)
        for hook in reversed(self._stop_hooks):
            try:
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("error while stopping")
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            await asyncio.gather(self._discovery_task, return_exceptions=True)
        await self.mesh.stop()
        self.mesh = None
        await self.lag.stop()
        self.messaging.close()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        self.listening = False
        log.info("node %s stopped", self.name)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def on_stop(self, hook: Callable[[], Any]) -> None:
        """Run `hook` (sync or async) during a graceful stop: after singletons and jobs
        have handed over, before the node leaves the mesh."""
        check_signature("an on_stop hook", hook, "no argument")  # not during the stop
        self._stop_hooks.append(hook)

    @property
    def ready(self) -> bool:
        """True once the mesh listens and the first discovery round has run, until draining."""
        return self.listening and self._first_round.is_set() and not self.draining

    async def wait_ready(self, timeout: float | None = None) -> None:
        if timeout is not None:
            check_timeout(timeout)
        async with asyncio.timeout(timeout):
            await self._first_round.wait()

    async def _run_discovery(self, strategy: Strategy) -> None:
        try:
            await strategy.run(self._propose)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discovery stopped with an error; existing peers stay connected")
            self._first_round.set()

    def _propose(self, peers: Iterable[Peer]) -> None:
        if self.mesh is not None:
            self.mesh.propose(peers)
        self._first_round.set()

    # membership ------------------------------------------------------------
    def _failed_handshakes(self) -> str:
        """Why peers may be missing, for a timeout's message: the log (off unless the app
        configures logging) is where a newcomer with a mistyped cookie would not look."""
        failed = self.mesh.stats.handshake_failures if self.mesh is not None else Counter()
        if not failed:
            return ""
        counts = ", ".join(f"{reason} {count}" for reason, count in sorted(failed.items()))
        hint = " (a different RELEASE_COOKIE?)" if failed["cookie"] else ""
        return f"; failed handshakes since start: {counts}{hint}; the 'shoal' logger says more"

    def nodes(self) -> list[str]:
        """Connected peers' full names, sorted (this node not included)."""
        return self.mesh.peers if self.mesh is not None else []

    async def wait_for_nodes(self, n: int, timeout: float) -> list[str]:
        """Wait until at least `n` peers are connected (this node not counted); returns them.

        Raises `WaitTimeout` (a `TimeoutError`) saying how many of the `n` were connected
        when `timeout` seconds had passed."""
        check_timeout(timeout)
        changed = asyncio.Event()
        remove = self.add_listener(lambda _event: changed.set())
        try:
            async with asyncio.timeout(timeout):
                while len(self.nodes()) < n:
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            seen = self.nodes()
            raise WaitTimeout(
                f"{len(seen)} of {n} peers connected to {self.name} within {timeout:g} s: "
                f"{', '.join(seen) or 'none'}"
                f"{self._failed_handshakes()}",
                timeout,
            ) from None
        finally:
            remove()
        return self.nodes()

    def add_listener(self, listener: MembershipListener) -> Callable[[], None]:
        """Call `listener` on every node up/down event; returns a function that removes it."""
        check_signature("a membership listener", listener, "(event)", None)  # not per event
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def membership_events(self) -> AsyncIterator[MembershipEvent]:
        """Node up/down events as an async iterator. A consumer that falls more than
        MEMBERSHIP_QUEUE events behind loses the oldest (memory stays bounded), with a
        warning; `node.nodes()` always has the current members."""
        queue: asyncio.Queue[MembershipEvent] = asyncio.Queue(MEMBERSHIP_QUEUE)
        dropped = 0

        def put(event: MembershipEvent) -> None:
            nonlocal dropped
            if queue.full():
                queue.get_nowait()
                dropped += 1
                if dropped in (1, 100, 10_000):
                    log.warning("membership_events() consumer is slow: %d events dropped", dropped)
            queue.put_nowait(event)

        remove = self.add_listener(put)
        try:
            while True:
                yield await queue.get()
        finally:
            remove()

    def _membership_changed(self, event: MembershipEvent) -> None:
        self.messaging.on_membership(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("membership listener failed")

    async def connect(self, target: str) -> str:
        """Connect to `name@host`, `host` or `host:port`; returns the peer's name once up."""
        if self.mesh is None:  # as call and send say it
            raise NodeDown("the node is not started")
        peers = parse_hosts(target, self.settings.name_query, self.settings.port)
        if len(peers) != 1:
            raise ValueError(f"connect() takes one `name@host`, `host` or `host:port`: {target!r}")
        (peer,) = peers
        peer = self.settings.peer(peer.basename, peer.host, peer.port)  # `name@host:port`
        if peer.name in self.nodes():
            return peer.name
        event = asyncio.Event()
        remove = self.add_listener(
            lambda e: event.set() if e.kind == "up" and e.node == peer.name else None
        )
        try:
            self.mesh.propose([peer], known=True)
            async with asyncio.timeout(self.settings.handshake_timeout + 1):
                await event.wait()
        except TimeoutError:
            raise NodeDown(f"could not connect to {peer.name} at {peer.host}:{peer.port}") from None
        finally:
            remove()
        return peer.name

    async def ping(self, node: str, timeout: float = 5.0) -> float:
        """Round-trip time to `node` in seconds."""
        started = time.perf_counter()
        await self.call(node, "shoal.ping", None, timeout=timeout)
        return time.perf_counter() - started

    # singletons ------------------------------------------------------------
    def singleton(
        self, name: str | None = None, mode: str | None = None
    ) -> Callable[[SingletonFunc], SingletonFunc]:
        """Decorator: run `async def f(ctx)` on exactly one node of the cluster."""
        if name is not None and not isinstance(name, str):  # `@node.singleton` without ()
            raise ValueError(
                f"node.singleton(name) takes a name, not {name!r}: "
                "write @node.singleton() or @node.singleton('name')"
            )

        def decorate(func: SingletonFunc) -> SingletonFunc:
            self.singletons.register(name or func.__name__, func, mode)
            return func

        return decorate

    def add_singleton(
        self, name: str, target: SingletonFunc | Service, mode: str | None = None
    ) -> None:
        """Run `target` (an `async def f(ctx)` or an object with start/stop) on one node."""
        self.singletons.register(name, target, mode)

    def job(self, schedule: str, **options: Any) -> Callable[[JobFunc], JobFunc]:
        """Decorator: a cron job (Quantum syntax), once per cluster unless `run_strategy` says
        otherwise. Options as `Scheduler.job`: name, tz, overlap, timeout, misfire, ..."""
        return self.scheduler.job(schedule, **options)

    # messaging -------------------------------------------------------------
    def register(self, name: str, handler: Handler, *, sync_to_thread: bool | None = None) -> None:
        """Make `handler(payload, sender)` reachable from every node under `name`.

        A sync handler runs in a worker thread unless `sync_to_thread=False`
        (then it must return at once: it runs on the event loop)."""
        self.messaging.register(name, handler, sync_to_thread=sync_to_thread)

    # send, call and publish hand back messaging's coroutine itself: a coroutine of our
    # own around it would cost each message one more frame (about a tenth of a send).
    def send(self, node: str, handler: str, payload: Any) -> Coroutine[Any, Any, None]:
        return self.messaging.send(node, handler, payload)

    def call(
        self, node: str, handler: str, payload: Any, timeout: float = 5.0
    ) -> Coroutine[Any, Any, Any]:
        return self.messaging.call(node, handler, payload, timeout)

    def publish(self, topic: str, payload: Any) -> Coroutine[Any, Any, None]:
        return self.messaging.publish(topic, payload)

    def subscribe(self, topic: str) -> Subscription:
        return self.messaging.subscribe(topic)

    async def wait_for(
        self, topic: str, timeout: float, match: Callable[[Any], bool] | None = None
    ) -> Any:
        return await self.messaging.wait_for(topic, timeout, match)

    def status(self) -> dict[str, Any]:
        """What `shoal status` and `/cluster` show about this node."""
        return {
            "node": self.name,
            "nodes": self.nodes(),
            "ready": self.ready,
            "draining": self.draining,
            "topology": self.settings.topology,
            "cookie": self.cookie_fingerprint,
            "singletons": self.singletons.snapshot(),
            "jobs": self.jobs.snapshot(),
            "uptime_s": round(time.time() - self.started_at, 3),
        }
