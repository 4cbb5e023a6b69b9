"""Messaging between nodes: named handlers, send, call, publish/subscribe, wait_for.

Semantics: messages between one sender and one receiver arrive in order;
delivery is at most once; a call returns the reply or raises `CallTimeout`,
`NodeDown` or `RemoteError`, and never hangs.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shoal import wire
from shoal.mesh import MembershipEvent, Mesh, NodeDown

log = logging.getLogger("shoal.messaging")

# A handler gets the payload and the sender's node name; its return value is
# the reply to a call (ignored for a plain send).
Handler = Callable[[Any, str], Any | Awaitable[Any]]

# Handler results of these types are replies as they are, never awaitables.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})

# Messages a slow subscriber may have queued before the oldest are dropped.
SUBSCRIPTION_QUEUE = 10_000


class CallTimeout(TimeoutError):
    """No reply within the call's timeout."""


class RemoteError(RuntimeError):
    """The remote handler raised, or there was no such handler."""


class Subscription:
    """Messages published on a topic, as an async iterator. Use as a context manager."""

    def __init__(self, messaging: Messaging, topic: str) -> None:
        self.topic = topic
        self._messaging = messaging
        self._queue: asyncio.Queue[tuple[Any, str]] = asyncio.Queue(SUBSCRIPTION_QUEUE)
        self.dropped = 0

    def deliver(self, payload: Any, sender: str) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped in (1, 100, 10_000):
                log.warning(
                    "subscriber to %r is slow: %d messages dropped", self.topic, self.dropped
                )
        self._queue.put_nowait((payload, sender))

    async def get(self) -> tuple[Any, str]:
        """The next (payload, sender) published on the topic."""
        return await self._queue.get()

    def close(self) -> None:
        self._messaging._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            payload, _ = await self._queue.get()
            yield payload

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Messaging:
    """Handlers, pending calls and subscriptions of one node."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self.mesh: Mesh | None = None
        self._handlers: dict[str, Handler] = {}
        self._calls: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._ids = itertools.count(1)
        self._topics: dict[str, set[Subscription]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Called with each remote call's round trip in seconds (shoal.metrics sets it).
        self.call_observer: Callable[[float], None] | None = None

    # handlers --------------------------------------------------------------
    def register(self, name: str, handler: Handler) -> None:
        """Make `handler` reachable from every node as `name`."""
        if name in self._handlers:
            raise ValueError(f"a handler named {name!r} is already registered")
        self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    # sending ---------------------------------------------------------------
    async def send(self, node: str, handler: str, payload: Any) -> None:
        """Deliver `payload` to `handler` on `node`, without waiting for a reply."""
        frame = wire.encode_frame([wire.SEND, handler, payload])
        if node == self.node_name:
            self._run_handler(handler, payload, self.node_name, None)
            return
        conn = self._mesh.connection_to(node)
        conn.send_encoded(frame)
        await conn.drain()  # returns at once unless the peer is slower than us

    def send_to_peers(self, handler: str, payload: Any, peers: list[str] | None = None) -> None:
        """Queue `payload` for `handler` on connected `peers` (default: all), not this node.

        For shoal's own small state messages, sent from callbacks that cannot await:
        no flow control, and peers that are not connected are skipped.
        """
        mesh = self.mesh
        if mesh is None:
            return
        conns = mesh.connections
        targets = conns.values() if peers is None else [conns[p] for p in peers if p in conns]
        data = wire.encode_frame([wire.SEND, handler, payload])
        for conn in targets:
            conn.send_encoded(data)

    async def call(self, node: str, handler: str, payload: Any, timeout: float = 5.0) -> Any:
        """Ask `handler` on `node` and return its reply."""
        if node == self.node_name:
            return await asyncio.wait_for(self._local_call(handler, payload), timeout)
        call_id = next(self._ids)
        frame = wire.encode_frame([wire.CALL, call_id, handler, payload])
        conn = self._mesh.connection_to(node)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (future, node)
        started = time.perf_counter()
        try:
            conn.send_encoded(frame)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise CallTimeout(f"{handler!r} on {node} did not reply within {timeout} s") from None
        finally:
            self._calls.pop(call_id, None)
            if self.call_observer is not None:
                self.call_observer(time.perf_counter() - started)

    async def publish(self, topic: str, payload: Any) -> None:
        """Deliver `payload` to every subscriber of `topic` on every node, this one included."""
        frame = [wire.PUBLISH, topic, payload]
        data = wire.encode_frame(frame)  # fails here, at the sender, for non-msgpack payloads
        mesh = self._mesh
        for conn in mesh.connections.values():
            conn.send_encoded(data)
        self._deliver(topic, payload, self.node_name)

    # subscribing -----------------------------------------------------------
    def subscribe(self, topic: str) -> Subscription:
        subscription = Subscription(self, topic)
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._topics.get(subscription.topic)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._topics[subscription.topic]

    async def wait_for(
        self,
        topic: str,
        timeout: float,
        match: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The first payload published on `topic` (anywhere) that `match`es, or TimeoutError."""
        with self.subscribe(topic) as subscription:
            async with asyncio.timeout(timeout):
                while True:
                    payload, _ = await subscription.get()
                    if match is None or match(payload):
                        return payload

    # receiving (called by the mesh) -----------------------------------------
    def on_frame(self, sender: str, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == wire.SEND and len(frame) == 3 and isinstance(frame[1], str):
            self._run_handler(frame[1], frame[2], sender, None)
        elif kind == wire.CALL and len(frame) == 4 and isinstance(frame[2], str):
            self._run_handler(frame[2], frame[3], sender, frame[1])
        elif kind == wire.REPLY and len(frame) == 4:
            entry = self._calls.get(frame[1]) if isinstance(frame[1], int) else None
            if entry is not None and entry[1] == sender and not entry[0].done():
                if frame[2] is True:
                    entry[0].set_result(frame[3])
                else:
                    entry[0].set_exception(RemoteError(str(frame[3])))
        elif kind == wire.PUBLISH and len(frame) == 3 and isinstance(frame[1], str):
            self._deliver(frame[1], frame[2], sender)
        else:
            raise wire.FrameError("malformed message")

    def on_membership(self, event: MembershipEvent) -> None:
        """Fail the calls waiting on a node that went down, at once."""
        if event.kind != "down":
            return
        for future, node in list(self._calls.values()):
            if node == event.node and not future.done():
                future.set_exception(NodeDown(f"{node} went down ({event.reason})"))

    def _deliver(self, topic: str, payload: Any, sender: str) -> None:
        for subscription in self._topics.get(topic, ()):
            subscription.deliver(payload, sender)

    def _run_handler(self, name: str, payload: Any, sender: str, call_id: int | None) -> None:
        handler = self._handlers.get(name)
        if handler is None:
            log.debug("no handler %r for a message from %s", name, sender)
            self._reply(sender, call_id, False, f"no handler named {name!r} on {self.node_name}")
            return
        try:
            result = handler(payload, sender)
        except Exception as exc:
            log.exception("handler %r failed on a message from %s", name, sender)
            self._reply(sender, call_id, False, f"{type(exc).__name__}: {exc}")
            return
        # `inspect.isawaitable` is slow; plain data (the common case) is not awaitable.
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(name, result, sender, call_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif call_id is not None:
            self._reply(sender, call_id, True, result)

    async def _finish(
        self, name: str, result: Awaitable[Any], sender: str, call_id: int | None
    ) -> None:
        try:
            value = await result
        except Exception as exc:
            log.exception("handler %r failed on a message from %s", name, sender)
            self._reply(sender, call_id, False, f"{type(exc).__name__}: {exc}")
        else:
            self._reply(sender, call_id, True, value)

    def _reply(self, sender: str, call_id: int | None, ok: bool, value: Any) -> None:
        if call_id is None or sender == self.node_name:
            return
        conn = self._mesh.connections.get(sender)
        if conn is None:
            return  # the caller is gone; its call already failed with NodeDown
        try:
            conn.send([wire.REPLY, call_id, ok, value])
        except TypeError as exc:
            conn.send([wire.REPLY, call_id, False, f"reply is not msgpack-serialisable: {exc}"])

    async def _local_call(self, name: str, payload: Any) -> Any:
        handler = self._handlers.get(name)
        if handler is None:
            raise RemoteError(f"no handler named {name!r} on {self.node_name}")
        wire.pack(payload)  # same rules as a remote call
        result = handler(payload, self.node_name)
        if inspect.isawaitable(result):
            result = await result
        return result

    @property
    def _mesh(self) -> Mesh:
        if self.mesh is None:
            raise NodeDown("the node is not started")
        return self.mesh
