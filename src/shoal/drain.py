"""Draining an ASGI app that sits behind a load balancer, for any ASGI server.

A load balancer learns that a node is going away only from its health
checks (HAProxy) or from a deregistration that takes a moment to reach every
balancer node (the ALB). So on SIGTERM a node must not close its port at
once; it goes through three phases, timed from one setting each:

1. **lame duck** (`SHOAL_LAME_DUCK_MS`, 5 s): readiness fails, but every
   request is still served, so the balancer has time to stop sending;
   responses carry `Connection: close`, so no idle keep-alive connection is
   left for the balancer to reuse after the port closes;
2. **in flight** (`SHOAL_MAX_REQUEST_MS`, the longest request, 60 s): the
   server stops accepting; requests already running finish;
3. **cut**: a request still running then, whose response has not started,
   is answered `503` with `Retry-After`, which clients and balancers retry;
   never a 500.

The HTTP keep-alive follows from the longest request: it must outlast the
balancer's idle timeout, which must outlast the longest request
(`keep_alive` > balancer idle timeout > `max_request`).

    drain = Drain.from_env()
    app = drain.wrap(app)                 # counts requests, answers the cut
    ...                                   # on SIGTERM:
    await drain.run(stop_accepting)       # lame duck, stop, wait, cut

`shoal.asgi.serve` does this for uvicorn, signals included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from shoal.config import ConfigError

log = logging.getLogger("shoal.drain")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# HAProxy (compose) checks every 1 s and needs 2 failures with a 1 s check
# timeout: out of rotation within 3 s. On ECS the target is deregistered
# before SIGTERM; 5 s also covers the deregistration reaching every ALB node.
LAME_DUCK_S = 5.0
# The longest request the app serves (the `hi` app's longest `/wait`).
MAX_REQUEST_S = 60.0
# Above the balancer's idle timeout (max request + 10 s, see `idle_timeout`).
KEEP_ALIVE_MARGIN_S = 20.0
IDLE_TIMEOUT_MARGIN_S = 10.0


@dataclass(eq=False)
class _Request:
    task: asyncio.Task[Any] | None
    started: bool = False  # the response has started: too late for a 503
    cut: bool = False


@dataclass
class Drain:
    """Lame duck, then in-flight requests finish, then a retryable 503 for the rest."""

    lame_duck: float = LAME_DUCK_S
    max_request: float = MAX_REQUEST_S
    retry_after: int = 1
    _requests: set[_Request] = field(default_factory=set, init=False, repr=False)
    _begun: float | None = field(default=None, init=False, repr=False)
    _idle: asyncio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lame_duck < 0 or self.max_request <= 0:
            raise ConfigError("the lame duck must be >= 0 and the longest request > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Drain:
        """`SHOAL_LAME_DUCK_MS` and `SHOAL_MAX_REQUEST_MS`, validated."""
        env = os.environ if env is None else env
        return cls(
            lame_duck=_ms(env, "SHOAL_LAME_DUCK_MS", LAME_DUCK_S),
            max_request=_ms(env, "SHOAL_MAX_REQUEST_MS", MAX_REQUEST_S, minimum=1),
        )

    # the timeout chain -------------------------------------------------------
    @property
    def idle_timeout(self) -> float:
        """The load balancer's idle timeout this app expects: above the longest request."""
        return self.max_request + IDLE_TIMEOUT_MARGIN_S

    @property
    def keep_alive(self) -> float:
        """The server's keep-alive: above the balancer's idle timeout, so the balancer,
        not the server, closes an idle connection (else the ALB sends sporadic 502s)."""
        return self.max_request + KEEP_ALIVE_MARGIN_S

    @property
    def shutdown_time(self) -> float:
        """How long `run` takes at most, from SIGTERM until the last response."""
        return self.lame_duck + self.max_request + 1.0

    # state -------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """False from the start of the drain on: readiness should fail."""
        return self._begun is None

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def begin(self) -> None:
        """Fail readiness now; serve on. Idempotent."""
        if self._begun is None:
            self._begun = time.monotonic()
            log.info(
                "draining: readiness fails; serving %.1f s more (lame duck), then up to "
                "%.1f s for %d request(s) in flight",
                self.lame_duck,
                self.max_request,
                self.in_flight,
            )

    async def run(self, stop_accepting: Callable[[], Any]) -> None:
        """The whole drain: begin, lame duck, `stop_accepting()`, wait, cut what is left."""
        self.begin()
        assert self._begun is not None
        await asyncio.sleep(max(0.0, self._begun + self.lame_duck - time.monotonic()))
        result = stop_accepting()
        if asyncio.iscoroutine(result):
            await result
        if await self.wait_idle(self.max_request):
            return
        cut = self.cut()
        log.warning("%d request(s) still running after %.1f s: 503", cut, self.max_request)
        await self.wait_idle(5.0)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs; False on timeout."""
        if not self._requests:
            return True
        self._idle = self._idle or asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return not self._requests
        return True

    def cut(self) -> int:
        """Answer every running request whose response has not started with a 503."""
        cut = 0
        for request in list(self._requests):
            if not request.started and not request.cut and request.task is not None:
                request.cut = True
                request.task.cancel()
                cut += 1
        return cut

    # the middleware -----------------------------------------------------------
    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app`, with its HTTP requests counted and answerable by the cut."""

        async def drained_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            request = _Request(asyncio.current_task())
            self._requests.add(request)

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    request.started = True
                    if not self.serving:
                        message["headers"] = [*message.get("headers", []), _CLOSE]
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            except asyncio.CancelledError:
                if not request.cut or request.started:
                    raise
                if request.task is not None:
                    request.task.uncancel()
                await self._unavailable(send)
            finally:
                self._requests.discard(request)
                if not self._requests and self._idle is not None:
                    self._idle.set()

        return drained_app

    async def _unavailable(self, send: Send) -> None:
        body = b'{"detail":"this node is shutting down; retry"}'
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.retry_after).encode()),
                    _CLOSE,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


_CLOSE = (b"connection", b"close")


def _ms(env: Mapping[str, str], name: str, default_s: float, minimum: int = 0) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default_s
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number of milliseconds.") from None
    if value < minimum or not math.isfinite(value):
        raise ConfigError(f"{name}={value}: must be at least {minimum} ms.")
    return value / 1000
