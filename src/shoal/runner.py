"""`shoal.run`: run a node until SIGTERM or SIGINT, then leave the cluster cleanly.

    node = shoal.Node.from_env()
    ...                               # handlers, singletons, jobs
    shoal.run(node, main())           # main() is optional: the app's own coroutine

On the first SIGTERM or SIGINT the app's coroutine (if still running) is
cancelled, then `node.stop()` hands over singletons and running jobs and tells
the peers that this node is *leaving* (they see `MembershipEvent("down",
name, "leaving")`, not `closed`), and `run` returns: the process exits 0,
without a traceback. A second signal stops at once (exit status 128 + signal).

An HTTP app served by uvicorn uses `shoal.asgi.serve(app, drain,
on_stopped=node.stop)` instead, which drains HTTP requests first (see
`shoal.drain`); both share `shoal.loop.signal_handlers`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar, overload

from shoal import loop
from shoal.node import Node

log = logging.getLogger("shoal.runner")

T = TypeVar("T")


@overload
def run(
    main: Node, app: Coroutine[Any, Any, Any] | None = None, *, debug: bool | None = None
) -> None: ...


@overload
def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T: ...


def run(
    main: Node | Coroutine[Any, Any, T],
    app: Coroutine[Any, Any, Any] | None = None,
    *,
    debug: bool | None = None,
) -> T | None:
    """Run on shoal's event loop (uvloop when installed, see `shoal.loop`).

    `run(node)` or `run(node, app)`: start the node, run the coroutine `app`
    beside it, and return after a SIGTERM or SIGINT once the node has left
    (see `serve`). `run(coroutine)`: `asyncio.run(coroutine)` on that loop.
    """
    # `run(node, main)` for `run(node, main())`: refused before the node starts.
    for what, value, call in (
        ("app", app, "shoal.run(node, {}())"),
        ("main", None if isinstance(main, Node) else main, "shoal.run({}())"),
    ):
        if value is not None and not asyncio.iscoroutine(value):
            example = call.format(getattr(value, "__name__", what))
            raise TypeError(f"shoal.run takes a coroutine as {what}, got {value!r}: {example}")
    if isinstance(main, Node):
        serving = serve(main, app)
        try:
            loop.run(serving, debug=debug)
        except BaseException:
            _close(serving, app)
            raise
        return None
    if app is not None:
        raise TypeError("shoal.run(coroutine) takes no app; use shoal.run(node, app)")
    try:
        return loop.run(main, debug=debug)
    except BaseException:
        _close(main)
        raise


def _close(*coroutines: Coroutine[Any, Any, Any] | None) -> None:
    """Close coroutines that may never have started (no event loop could be made, e.g.
    SHOAL_EVENT_LOOP=uvloop without uvloop): else Python adds "coroutine ... was never
    awaited" warnings to the error. A no-op for a coroutine that ran."""
    for coroutine in coroutines:
        if coroutine is not None:
            coroutine.close()


async def serve(node: Node, app: Coroutine[Any, Any, Any] | None = None) -> None:
    """Start `node`, run `app` beside it until SIGTERM or SIGINT, then stop the node.

    `app` returning leaves the node running until a signal; `app` raising stops
    the node and the exception propagates.
    """
    signalled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    me = asyncio.current_task()
    forced: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not signalled.done():
            log.info("%s: leaving the cluster (a second signal stops at once)", name)
            signalled.set_result(signum)
        elif not forced:
            log.warning("%s again: stopping now", name)
            forced.append(signum)
            if me is not None:
                me.cancel()

    app_task: asyncio.Future[Any] | None = None
    with loop.signal_handlers(on_signal):
        try:
            await node.start()
            if app is not None:
                app_task = asyncio.ensure_future(app)
                await asyncio.wait({signalled, app_task}, return_when=asyncio.FIRST_COMPLETED)
                if app_task.done() and not signalled.done():
                    app_task.result()  # the app failed: stop the node, raise its error
            await signalled
        except asyncio.CancelledError:
            if not forced:
                raise
        finally:
            if app is not None and app_task is None:
                app.close()  # never started (the node did not start)
            try:
                if not forced:
                    if app_task is not None and not app_task.done():
                        app_task.cancel()
                        await asyncio.gather(app_task, return_exceptions=True)
                    await node.stop()
            except asyncio.CancelledError:
                if not forced:
                    raise
        if forced:
            raise SystemExit(128 + forced[0])
