"""The event loop shoal runs on: uvloop where it is installed, asyncio's otherwise.

uvloop (libuv underneath) is a drop-in asyncio event loop with a much cheaper
round trip; on this project's benchmark machine an echo's p50 fell from about
170 µs to 64 µs. Everything in shoal is written against asyncio's API only, so
either loop gives the same behaviour; uvloop is an optional extra
(`pip install shoal[uvloop]`, Linux and macOS).

`SHOAL_EVENT_LOOP` picks the loop: `auto` (the default: uvloop when it can be
imported, asyncio's loop when SHOAL_TLS_* is set, see TLS_REASON), `uvloop`
(refuse to start without it) or `asyncio`.

    shoal.loop.run(main())     # instead of asyncio.run(main())
    shoal.loop.install()       # for code that calls asyncio.run itself
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar, cast

from shoal.config import ConfigError

ENV = "SHOAL_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")

# The mesh layers TLS on an accepted connection (`loop.start_tls`) after pausing
# reading in `connection_made`; uvloop starts reading right after
# `connection_made` whatever the protocol asked, so the TLS hello would reach
# the mesh as plain bytes. With TLS, `auto` therefore picks asyncio's loop.
TLS_REASON = (
    "uvloop ignores pause_reading() in connection_made, which the mesh's TLS upgrade "
    "relies on; use SHOAL_EVENT_LOOP=asyncio (auto does)."
)


async def in_thread(executor: concurrent.futures.Executor, func: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread` on a given executor: the app's sync code that may block for
    long (singletons, jobs) must not take the loop's default executor, whose few threads
    (CPUs + 4) everything else sent to a thread needs too. Context variables (the log
    fields of `shoal.logs`) go along, as with `to_thread`."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, func, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


def uvloop_available() -> bool:
    """True when uvloop can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def selected(env: Mapping[str, str] | None = None) -> str:
    """The loop `run` would use: "uvloop" or "asyncio"; ConfigError for a bad setting."""
    env = os.environ if env is None else env
    wanted = (env.get(ENV) or "auto").strip().lower()
    if wanted not in CHOICES:
        raise ConfigError(f"{ENV}={wanted!r} is unknown: use one of {', '.join(CHOICES)}.")
    if wanted == "asyncio":
        return "asyncio"
    if env.get("SHOAL_TLS_CERT"):
        if wanted == "uvloop":
            raise ConfigError(f"{ENV}=uvloop cannot be used with SHOAL_TLS_*: {TLS_REASON}")
        return "asyncio"
    if uvloop_available():
        return "uvloop"
    if wanted == "uvloop":
        raise ConfigError(
            f"{ENV}=uvloop but uvloop is not installed: `pip install shoal[uvloop]` "
            f"(Linux and macOS), or set {ENV}=asyncio."
        )
    return "asyncio"


def loop_factory(
    env: Mapping[str, str] | None = None,
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for `asyncio.Runner(loop_factory=...)`; None means asyncio's default loop."""
    if selected(env) == "uvloop":
        import uvloop

        return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
    return None


def policy(env: Mapping[str, str] | None = None) -> asyncio.AbstractEventLoopPolicy:
    """The event loop policy of the selected loop (pytest-asyncio's `event_loop_policy`)."""
    if selected(env) == "uvloop":
        import uvloop

        return cast(asyncio.AbstractEventLoopPolicy, uvloop.EventLoopPolicy())
    return asyncio.DefaultEventLoopPolicy()


def install(env: Mapping[str, str] | None = None) -> str:
    """Make later `asyncio.run` calls use the selected loop; returns its name."""
    asyncio.set_event_loop_policy(policy(env))
    return selected(env)


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """`asyncio.run(main)` on the selected loop (same semantics: a new loop, closed after)."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory()) as runner:
        return runner.run(main)


class BusyPoll:
    """Keeps the event loop polling instead of sleeping for a moment around a call.

    A process asleep in epoll takes several µs to wake (its vCPU may have halted), and a
    call's round trip wakes both nodes. With the reply, or the next request, usually due
    within tens of µs, polling answers sooner: a callback that queues itself again keeps
    the loop polling with a zero timeout. The BEAM's schedulers spin likewise before
    they sleep (`+sbwt`). The mesh pokes it when it has read calls and when it sends
    one (not for one-way messages, replies or heartbeats, where a reader gains no
    round trip); a poke starts the window or moves its end (a clock read).
    """

    def __init__(self, window: float) -> None:
        self._window = window
        self._until = 0.0
        self._polling = False

    @property
    def polling(self) -> bool:
        """True while the loop is kept polling."""
        return self._polling

    def poke(self) -> None:
        """Poll until `window` seconds from now (nothing when the window is 0)."""
        if self._window:
            self._until = time.perf_counter() + self._window
            if not self._polling:
                self._polling = True
                asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        if time.perf_counter() < self._until:
            asyncio.get_running_loop().call_soon(self._poll)
        else:
            self._polling = False


def name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """ "uvloop" or "asyncio": which loop `loop` (default: the running one) is."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


#: The signals that stop a node gracefully: SIGTERM (ECS, Kubernetes, docker stop) and
#: SIGINT (Ctrl-C).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# The callbacks of nested `signal_handlers` blocks, innermost last, per loop.
_handlers: dict[asyncio.AbstractEventLoop, list[Callable[[int], None]]] = {}


@contextlib.contextmanager
def signal_handlers(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call `on_signal(signum)` on the running loop for SIGTERM and SIGINT, while inside.

    One place for shoal's signal handling (`shoal.run` and `shoal.asgi.serve`): no
    KeyboardInterrupt, no default exit; the caller decides how to stop. Blocks nest:
    the innermost gets the signals, and the enclosing one gets them back after it.
    """
    loop = asyncio.get_running_loop()
    stack = _handlers.setdefault(loop, [])
    stack.append(on_signal)
    _install(loop, on_signal)
    try:
        yield
    finally:
        stack.remove(on_signal)
        if stack:
            _install(loop, stack[-1])
        else:
            del _handlers[loop]
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)


def _install(loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> None:
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
