"""Serving an ASGI app with uvicorn so that deploys drop no request.

`serve` runs uvicorn with the timeout chain of a `Drain` (keep-alive above
the balancer's idle timeout) and, on SIGTERM or SIGINT, drains before it
stops: readiness fails, the lame duck keeps serving, the port closes,
requests in flight finish or get a retryable 503. Only then does
`on_stopped` run (e.g. `node.stop`: hand over singletons, leave the mesh),
so a request waiting for a message from the cluster still receives it.
A second signal stops at once.

Needs the `web` extra (uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

try:
    import uvicorn
except ImportError as exc:
    raise ImportError("shoal.asgi needs uvicorn: pip install 'shoal[web]'") from exc

from shoal.drain import ASGIApp, Drain
from shoal.loop import signal_handlers

log = logging.getLogger("shoal.asgi")

# uvicorn's own cancel after its graceful-shutdown timeout must never come
# before the drain's cut (which answers 503 instead of uvicorn's 500).
_UVICORN_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first signal drains and the second one stops."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._draining: asyncio.Task[None] | None = None
        self.signalled = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with signal_handlers(self.on_signal):
            yield

    def on_signal(self, sig: int) -> None:
        self.signalled = True
        if self._draining is not None:  # a second signal: stop waiting
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self.force_exit = self.should_exit = True
            return
        log.info("%s: draining, then leaving the cluster", signal.Signals(sig).name)
        self._draining = asyncio.create_task(self.drain.run(self._stop_accepting))

    def _stop_accepting(self) -> None:
        self.should_exit = True


def uvicorn_config(app: ASGIApp, drain: Drain, **options: Any) -> uvicorn.Config:
    """A uvicorn config for `app` wrapped by `drain`, with its timeouts in line."""
    options.setdefault("host", "0.0.0.0")
    options.setdefault("lifespan", "off")
    return uvicorn.Config(
        drain.wrap(app),
        timeout_keep_alive=max(1, round(drain.keep_alive)),
        timeout_graceful_shutdown=max(1, round(drain.max_request + _UVICORN_MARGIN_S)),
        **options,
    )


async def serve(
    app: ASGIApp,
    drain: Drain,
    *,
    on_stopped: Callable[[], Awaitable[Any]] | None = None,
    **options: Any,
) -> int:
    """Serve `app` until a signal has drained it; then await `on_stopped`.

    `options` go to `uvicorn.Config` (port, host, log_config, ...). Returns
    the exit code: 0 after a drain, 1 if the server could not start.
    """
    server = DrainingServer(uvicorn_config(app, drain, **options), drain)
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits this way when the port is taken (logged)
        return 1
    finally:
        if on_stopped is not None:
            await on_stopped()
    return 0 if server.started else 1
