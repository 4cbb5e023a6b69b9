"""Messaging between nodes: named handlers, send, call, publish/subscribe, wait_for.

Semantics: messages between one sender and one receiver arrive in order;
delivery is at most once; a call returns the reply or raises `CallTimeout`,
`NodeDown` or `RemoteError`, and never hangs.

Handlers never block the event loop by default: an async handler runs as a
task, a sync one in a worker thread (`sync_to_thread=False` keeps a quick
sync handler on the loop, as shoal's own `shoal.*` handlers are). Every
message is checked against the frame limit where it is made, so an oversized
one fails at its sender (`MessageTooLarge`) and never costs a connection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import inspect
import itertools
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shoal import wire
from shoal.config import Settings
from shoal.mesh import MembershipEvent, Mesh, NodeDown
from shoal.wire import MessageTooLarge

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


class WaitTimeout(TimeoutError):
    """A wait (`wait_for`, `wait_for_nodes`) timed out; the message says what and how long."""

    def __init__(self, message: str, timeout: float, topic: str | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.topic = topic


class RemoteError(RuntimeError):
    """The called handler raised, or there was no such handler.

    Raised the same way whether the handler ran on a peer or on this node:
    `type_name` is the handler's exception type (`"ValueError"`, or
    `"NoHandler"`), `message` its text, and `str(err)` shows both. On a local
    call the original exception is also chained as `__cause__`.
    """

    def __init__(self, message: str, type_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type_name = type_name or type(self).__name__

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"

    @classmethod
    def from_wire(cls, value: Any) -> RemoteError:
        """The error of a failed REPLY: `[type_name, message]`, or a plain string (older nodes)."""
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(v, str) for v in value)
        ):
            return cls(value[1], value[0])
        return cls(str(value))


def check_timeout(timeout: float) -> None:
    """Refuse a timeout that cannot bound a wait: a NaN never fires (the call or wait would
    hang for good), 0 or less would fail every call before it is sent, and a bool is a
    mistake (True would be 1 s). Any real number else (a Fraction, numpy's) is seconds."""
    import numbers  # here: only a timeout that is no float comes this way

    if isinstance(timeout, bool) or not (isinstance(timeout, numbers.Real) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def check_name(what: str, name: Any) -> None:
    """A handler's or topic's name is a str: peers drop a connection whose frames carry
    anything else (a malformed message), so it is refused here, at the sender."""
    if not isinstance(name, str):
        raise ValueError(f"the {what} name must be a str, got {type(name).__name__} {name!r}")


def check_signature(what: str, fn: Any, params: str, *args: Any) -> None:
    """Refuse what cannot be called with `args` when it is registered, not on its first
    message (where the TypeError would reach only the caller, or only the log)."""
    if not callable(fn):
        raise ValueError(f"{what} must be a function taking {params}, got {fn!r}")
    try:
        # The callable itself, not what a decorator's functools.wraps says it wraps: a
        # decorator may supply arguments, and the wrapper is what will be called.
        inspect.signature(fn, follow_wrapped=False).bind(*args)
    except TypeError:
        raise ValueError(f"{what} must take {params}: {fn!r} does not") from None
    except ValueError:
        pass  # no signature to read (some builtins): the first call will tell


def error_to_wire(exc: BaseException) -> list[str]:
    """What a failed REPLY carries: the exception's type name and message."""
    if isinstance(exc, RemoteError):
        return [exc.type_name, exc.message]
    return [type(exc).__name__, str(exc)]


class Busy(RemoteError):
    """The peer refused the call: too many calls from this node are running there.

    `SHOAL_MAX_INFLIGHT_PER_PEER` on the peer; retry later, or call less at once.
    """


class ReplyTooLarge(RemoteError, MessageTooLarge):
    """The handler ran, but its reply does not fit in one frame (`SHOAL_MAX_FRAME_BYTES`)."""


# The `ok` field of a REPLY frame: True, False (the handler failed), or one of
# these, which older nodes read as False.
_REPLY_ERRORS: dict[str | None, type[RemoteError]] = {"busy": Busy, "too_large": ReplyTooLarge}
# How a handler runs: as a task, in a worker thread, or inline on the loop.
_ASYNC, _THREAD, _INLINE = "async", "thread", "inline"


class SubscriptionClosed(RuntimeError):
    """`get()` on a subscription that was closed and has nothing left to read."""


class Subscription:
    """Messages published on a topic, as an async iterator. Use as a context manager; one
    the app drops unclosed (an `async for` left with break) is closed when collected.
    Closing it ends every `async for` over it, once they have read what came before."""

    def __init__(self, messaging: Messaging, topic: str) -> None:
        self.topic = topic
        self._messaging = messaging
        # None, last: closed (`close`), so that a task waiting in `get` wakes up.
        self._queue: asyncio.Queue[tuple[Any, str] | None] = asyncio.Queue(SUBSCRIPTION_QUEUE)
        self.dropped = 0
        self.closed = False

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
        """The next (payload, sender) published on the topic; SubscriptionClosed once it
        was closed and all that came before was read."""
        item = self._queue.get_nowait() if not self._queue.empty() else await self._wait()
        if item is None:
            self._queue.put_nowait(None)  # for the next reader too
            raise SubscriptionClosed(f"the subscription to {self.topic!r} is closed")
        return item

    async def _wait(self) -> tuple[Any, str] | None:
        queue = self._queue
        # While a task waits here, the node holds this subscription strongly: a task that
        # nothing else holds (one the app started and forgot) is otherwise collected with
        # it, and stops receiving. A subscription no one waits on stays weakly held.
        waiting = self._messaging._waiting
        waiting[self] = waiting.get(self, 0) + 1
        try:
            return await queue.get()
        finally:
            if waiting[self] == 1:
                del waiting[self]
            else:
                waiting[self] -= 1

    def close(self) -> None:
        """Stop receiving; wakes the tasks waiting on it (their `async for` ends)."""
        if self.closed:
            return
        self.closed = True
        self._messaging._unsubscribe(self)
        if self._queue.full():  # room for the end mark: the oldest message goes
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                payload, _ = await self.get()
            except SubscriptionClosed:
                return
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

    def __init__(self, settings: Settings) -> None:
        self.node_name = settings.name
        self.mesh: Mesh | None = None
        self._max_frame = settings.max_frame_size
        self._max_inflight = settings.max_inflight_per_peer
        self._threads = settings.handler_threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._handlers: dict[str, tuple[Handler, str]] = {}
        # Pending calls to peers: call id -> (future, node, handler, timeout).
        self._calls: dict[int, tuple[asyncio.Future[Any], str, str, float]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Call deadlines: one loop timer for the earliest, instead of one per call
        # (a timer costs about as much as the rest of a call's sending side). The
        # heap may hold (deadline, id) of calls that already ended; `_compact`
        # keeps it within twice the pending calls.
        self._deadlines: list[tuple[float, int]] = []
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = math.inf
        # Weakly held: a subscription the app dropped without closing it (`async for` left
        # with break) would otherwise buffer up to SUBSCRIPTION_QUEUE payloads for good.
        self._topics: dict[str, weakref.WeakSet[Subscription]] = {}
        # Subscriptions a task is waiting on (`Subscription.get`), held strongly meanwhile.
        self._waiting: dict[Subscription, int] = {}
        self._sweep_topics_at = 64  # `_topics` entries before the next `_sweep_topics`
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Called with each remote call's round trip in seconds (shoal.metrics sets it).
        self.call_observer: Callable[[float], None] | None = None
        self._inflight: collections.Counter[str] = collections.Counter()  # by sender
        self._refused = 0
        self._refused_logged = -1.0
        self._unreadable_dropped = 0  # sends and publishes whose payload was unreadable
        self._unreadable_logged = -math.inf

    # handlers --------------------------------------------------------------
    def register(self, name: str, handler: Handler, *, sync_to_thread: bool | None = None) -> None:
        """Make `handler` reachable from every node as `name`.

        A sync handler runs in a worker thread (`SHOAL_HANDLER_THREADS`), so
        that it may block; `sync_to_thread=False` runs it on the event loop
        instead, for handlers that return at once (faster, and in arrival
        order). Handlers named `shoal.*` are shoal's own and run on the loop.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a handler's name is a non-empty string, got {name!r}")
        if name in self._handlers:
            raise ValueError(f"a handler named {name!r} is already registered")
        check_signature(f"handler {name!r}", handler, "(payload, sender)", None, "")
        if sync_to_thread is None:
            sync_to_thread = not name.startswith("shoal.")
        if _is_async(handler):
            mode = _ASYNC
        else:
            mode = _THREAD if sync_to_thread else _INLINE
        self._handlers[name] = (handler, mode)

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def close(self) -> None:
        """Stop the worker threads once their handlers return (called by `Node.stop`)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if not self._calls:  # calls still pending keep their deadlines
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_timer, self._deadline_at = None, math.inf
            self._deadlines.clear()
            self._loop = None  # a node started again may run on another loop

    # sending ---------------------------------------------------------------
    def _encode(self, frame: list[Any]) -> bytes:
        """A frame's bytes, checked against the frame limit (MessageTooLarge).

        A method, not a functools.partial with a keyword: that costs ~0.4 us more per
        message (a dict built per call, and the call's slow path)."""
        return wire.encode_frame(frame, self._max_frame)

    async def send(self, node: str, handler: str, payload: Any) -> None:
        """Deliver `payload` to `handler` on `node`, without waiting for a reply."""
        if type(handler) is not str:  # (the checks' common case costs no call)
            check_name("handler", handler)
        # `_encode`, inlined: this is the path of every one-way message.
        frame = wire.encode_frame([wire.SEND, handler, payload], self._max_frame)
        if node == self.node_name:
            self._run_handler(handler, payload, self.node_name, None)
            return
        conn = self.mesh.connections.get(node) if self.mesh is not None else None
        if conn is None:
            conn = self._mesh.connection_to(node)  # raises NodeDown, saying why
        conn.send_encoded(frame)
        if conn.blocked:  # the peer is slower than us, or gone
            await conn.drain()

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
        data = self._encode([wire.SEND, handler, payload])
        for conn in targets:
            conn.send_encoded(data)

    async def call(self, node: str, handler: str, payload: Any, timeout: float = 5.0) -> Any:
        """Ask `handler` on `node` and return its reply."""
        if type(handler) is not str:
            check_name("handler", handler)
        if type(timeout) is not float or not timeout > 0:
            check_timeout(timeout)
        call_id = next(self._ids)
        frame = self._encode([wire.CALL, call_id, handler, payload])
        if node == self.node_name:
            try:
                async with asyncio.timeout(timeout):
                    return await self._local_call(handler, payload)
            except TimeoutError:
                raise CallTimeout(
                    f"{handler!r} on {node} did not reply within {timeout} s"
                ) from None
        conn = self.mesh.connections.get(node) if self.mesh is not None else None
        if conn is None:
            conn = self._mesh.connection_to(node)  # raises NodeDown, saying why
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        calls = self._calls
        calls[call_id] = (future, node, handler, timeout)
        deadline = loop.time() + timeout
        heapq.heappush(self._deadlines, (deadline, call_id))
        if deadline < self._deadline_at:
            self._arm_deadline(loop, deadline)
        observer = self.call_observer
        started = time.perf_counter() if observer is not None else 0.0
        try:
            conn.send_encoded(frame)
            conn.mesh.busy_poll.poke()  # the reply may come within µs: poll for it
            return await future
        finally:
            del calls[call_id]
            if len(self._deadlines) > 2 * len(calls) + 64:
                self._compact_deadlines()
            if observer is not None:
                observer(time.perf_counter() - started)

    def _arm_deadline(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """(Re)set the one timer to the earliest deadline."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer = loop.call_at(deadline, self._expire_calls, loop)
        self._deadline_at = deadline

    def _expire_calls(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the calls whose deadline has passed with CallTimeout; re-arm for the next."""
        self._deadline_timer, self._deadline_at = None, math.inf
        # The loop's timers are millisecond-grained, as its clock may be (uvloop).
        now = loop.time() + 0.001
        deadlines, calls = self._deadlines, self._calls
        while deadlines and deadlines[0][0] <= now:
            entry = calls.get(heapq.heappop(deadlines)[1])
            if entry is not None and not entry[0].done():
                future, node, handler, timeout = entry
                future.set_exception(
                    CallTimeout(f"{handler!r} on {node} did not reply within {timeout} s")
                )
        if deadlines:
            self._arm_deadline(loop, deadlines[0][0])

    def _compact_deadlines(self) -> None:
        """Drop the deadlines of calls that ended (bounds the heap to the pending calls)."""
        calls = self._calls
        self._deadlines = [d for d in self._deadlines if d[1] in calls]
        heapq.heapify(self._deadlines)

    async def publish(self, topic: str, payload: Any) -> None:
        """Deliver `payload` to every subscriber of `topic` on every node, this one included."""
        # Fails here, at the sender, for non-msgpack or oversized payloads.
        check_name("topic", topic)
        data = self._encode([wire.PUBLISH, topic, payload])
        mesh = self._mesh
        for conn in mesh.connections.values():
            conn.send_encoded(data)
        self._deliver(topic, payload, self.node_name)

    # subscribing -----------------------------------------------------------
    def subscribe(self, topic: str) -> Subscription:
        check_name("topic", topic)  # another type would never match a peer's message
        subscription = Subscription(self, topic)
        topics = self._topics
        if topic not in topics and len(topics) >= self._sweep_topics_at:
            self._sweep_topics()
        topics.setdefault(topic, weakref.WeakSet()).add(subscription)
        return subscription

    def _sweep_topics(self) -> None:
        """Forget the topics whose subscriptions were all dropped unclosed (collected, so
        never `_unsubscribe`d): ever-new topics (one per request, say) would otherwise
        leave an empty entry each, for good. Amortised: at most once per doubling."""
        for topic in [t for t, subscribers in self._topics.items() if not subscribers]:
            del self._topics[topic]
        self._sweep_topics_at = 2 * len(self._topics) + 64

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
        """The first payload published on `topic` (anywhere) that `match`es; `WaitTimeout`
        (a `TimeoutError` naming the topic and the seconds) when none came in time."""
        check_timeout(timeout)
        with self.subscribe(topic) as subscription:
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        payload, _ = await subscription.get()
                        if match is None or match(payload):
                            return payload
            except TimeoutError:
                raise WaitTimeout(
                    f"no message on topic {topic!r} matched within {timeout:g} s", timeout, topic
                ) from None

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
                if frame[2] is True and type(frame[3]) is not wire.UnreadablePayload:
                    entry[0].set_result(frame[3])
                elif frame[2] is True:
                    entry[0].set_exception(
                        RemoteError(
                            f"the reply of {entry[2]!r} from {sender} could not be decoded "
                            f"here: {frame[3].reason}",
                            "UnreadablePayload",
                        )
                    )
                else:
                    kind = frame[2] if isinstance(frame[2], str) else None
                    error = _REPLY_ERRORS.get(kind)
                    entry[0].set_exception(
                        RemoteError.from_wire(frame[3]) if error is None else error(str(frame[3]))
                    )
        elif kind == wire.PUBLISH and len(frame) == 3 and isinstance(frame[1], str):
            self._deliver(frame[1], frame[2], sender)
        else:
            raise wire.FrameError("malformed message")

    def on_membership(self, event: MembershipEvent) -> None:
        """Fail the calls waiting on a node that went down, at once."""
        if event.kind != "down":
            return
        for future, node, _, _ in list(self._calls.values()):
            if node == event.node and not future.done():
                future.set_exception(NodeDown(f"{node} went down ({event.reason})"))

    def _deliver(self, topic: str, payload: Any, sender: str) -> None:
        if type(payload) is wire.UnreadablePayload:  # the message is lost, not the connection
            self._dropped_unreadable(f"a message on topic {topic!r} from {sender}", payload)
            return
        for subscription in self._topics.get(topic, ()):
            subscription.deliver(payload, sender)

    def _run_handler(self, name: str, payload: Any, sender: str, call_id: int | None) -> None:
        if type(payload) is wire.UnreadablePayload:  # the message fails, not the connection
            self._unreadable(name, sender, call_id, payload)
            return
        entry = self._handlers.get(name)
        if entry is None:
            log.debug("no handler %r for a message from %s", name, sender)
            self._reply(sender, call_id, False, error_to_wire(self._no_handler(name)))
            return
        handler, mode = entry
        if mode != _INLINE and sender != self.node_name:
            if self._inflight[sender] >= self._max_inflight:
                self._refuse(name, sender, call_id)
                return
        result: Any
        try:
            if mode == _THREAD:
                result = asyncio.get_running_loop().run_in_executor(
                    self._worker_threads(), handler, payload, sender
                )
            else:
                result = handler(payload, sender)
        except Exception as exc:
            log.exception("handler %r failed on a message from %s", name, sender)
            self._reply(sender, call_id, False, error_to_wire(exc))
            return
        # `inspect.isawaitable` is slow; plain data (the common case) is not awaitable.
        if mode == _INLINE and (type(result) in _PLAIN or not inspect.isawaitable(result)):
            if call_id is not None:
                self._reply(sender, call_id, True, result)
            return
        self._inflight[sender] += 1
        task = asyncio.ensure_future(self._finish(name, result, sender, call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(
        self, name: str, result: Awaitable[Any], sender: str, call_id: int | None
    ) -> None:
        try:
            value = await result
            if inspect.isawaitable(value):  # a sync handler that returned a coroutine
                value = await value
        except Exception as exc:
            log.exception("handler %r failed on a message from %s", name, sender)
            self._reply(sender, call_id, False, error_to_wire(exc))
        else:
            self._reply(sender, call_id, True, value)
        finally:
            self._inflight[sender] -= 1
            if not self._inflight[sender]:
                del self._inflight[sender]

    def _unreadable(
        self, name: str, sender: str, call_id: int | None, payload: wire.UnreadablePayload
    ) -> None:
        """A message for `name` whose payload this node cannot decode: a call fails with
        RemoteError saying why; a send is dropped, and logged (its sender learns nothing)."""
        why = f"the payload of a message for {name!r} from {sender} could not be decoded"
        if call_id is None:
            self._dropped_unreadable(f"a message for {name!r} from {sender}", payload)
            return
        error = RemoteError(f"{why} on {self.node_name}: {payload.reason}", "UnreadablePayload")
        self._reply(sender, call_id, False, error_to_wire(error))

    def _dropped_unreadable(self, what: str, payload: wire.UnreadablePayload) -> None:
        """Log a dropped send or publish, at most once a second: a sender that sends such
        payloads in a loop must not flood every receiver's log (as `_refuse` says)."""
        self._unreadable_dropped += 1
        now = time.monotonic()
        if now - self._unreadable_logged >= 1.0:
            self._unreadable_logged = now
            log.warning(
                "dropped %s: its payload could not be decoded: %s (%d dropped so far)",
                what,
                payload.reason,
                self._unreadable_dropped,
            )

    def _refuse(self, name: str, sender: str, call_id: int | None) -> None:
        """Too many handler calls from `sender` are running: say Busy, or drop a send."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:  # an overload must not flood the log too
            self._refused_logged = now
            log.warning(
                "refusing a message for %r from %s: %d of its handler calls are running "
                "(SHOAL_MAX_INFLIGHT_PER_PEER; %d refused so far)",
                name,
                sender,
                self._inflight[sender],
                self._refused,
            )
        self._reply(
            sender, call_id, "busy", f"{self.node_name} is busy: too many calls from {sender}"
        )

    def _worker_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="shoal-handler"
            )
        return self._executor

    def _reply(self, sender: str, call_id: int | None, ok: bool | str, value: Any) -> None:
        if call_id is None or sender == self.node_name:
            return
        conn = self.mesh.connections.get(sender) if self.mesh is not None else None
        if conn is None:
            return  # the caller is gone; its call already failed with NodeDown
        try:
            data = self._encode([wire.REPLY, call_id, ok, value])
        except MessageTooLarge as exc:
            log.warning("reply of handler call %d to %s not sent: %s", call_id, sender, exc)
            data = self._encode([wire.REPLY, call_id, "too_large", f"the reply: {exc}"])
        except TypeError as exc:
            error = TypeError(f"reply is not msgpack-serialisable: {exc}")
            data = self._encode([wire.REPLY, call_id, False, error_to_wire(error)])
        conn.send_encoded(data)

    async def _local_call(self, name: str, payload: Any) -> Any:
        """A call to this node: the handler runs as for a peer's call and fails the same way,
        with `RemoteError` (the original exception chained as `__cause__`)."""
        entry = self._handlers.get(name)
        if entry is None:
            raise self._no_handler(name)
        handler, mode = entry
        try:
            if mode == _THREAD:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._worker_threads(), handler, payload, self.node_name
                )
            else:
                result = handler(payload, self.node_name)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.exception("handler %r failed on a message from %s", name, self.node_name)
            raise RemoteError(str(exc), type(exc).__name__) from exc
        try:
            self._encode([wire.REPLY, 0, True, result])  # same rules as a remote call
        except MessageTooLarge as exc:
            raise ReplyTooLarge(f"the reply: {exc}") from None
        except TypeError as exc:
            raise RemoteError(f"reply is not msgpack-serialisable: {exc}", "TypeError") from None
        return result

    def _no_handler(self, name: str) -> RemoteError:
        return RemoteError(f"no handler named {name!r} on {self.node_name}", "NoHandler")

    @property
    def _mesh(self) -> Mesh:
        if self.mesh is None:
            raise NodeDown("the node is not started")
        return self.mesh


def _is_async(fn: Callable[..., Any]) -> bool:
    # Also callable objects whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
