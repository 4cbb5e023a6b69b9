"""Retries for job functions: a failed attempt is tried again within the same run.

Usually a job option: ``@node.job(schedule, max_attempts=3, backoff=2.0)`` (the engine
then calls :func:`call_async`); :func:`retrying` does the same for any function.

A retried run keeps its tick: the attempts happen inside the one run that the scheduler
started for that tick, so a retry never counts as a second run of the tick, the shared
state records one run, and ``overlap=False`` holds throughout. A job's ``timeout`` bounds
the whole run, retries and back-off included.

    @node.job("0 */5 * * * *", timeout=120)
    @retrying(Retry(max_attempts=3, backoff=2.0))
    async def sync_invoices() -> None: ...

Each attempt's log lines carry ``attempt`` (see shoal.logs); :func:`attempts` tells
what the current run used so far (shoal.history records it).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from shoal import logs

__all__ = ["Retry", "attempts", "call_async", "retrying"]

log = logging.getLogger("shoal.retries")
F = TypeVar("F", bound=Callable[..., Any])

#: A per-run counter (a one-item list, so a job run in a thread updates the run's copy).
_attempts: ContextVar[list[int] | None] = ContextVar("shoal_attempts", default=None)


def start_run() -> list[int]:
    """Give the current run its own attempt counter (called before the job function)."""
    counter = [0]
    _attempts.set(counter)
    return counter


def attempts() -> int:
    """Attempts the current run made so far (1 for a run without retries); 0 outside one."""
    counter = _attempts.get()
    return counter[0] if counter else 0


@dataclass(frozen=True)
class Retry:
    """How often and how soon a failed attempt is tried again.

    ``max_attempts`` counts the first one (1 = no retry). The n-th retry waits
    ``min(backoff * factor**(n-1), max_backoff)`` seconds, each +/- ``jitter`` (a fraction),
    so nodes that fail together do not retry together.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 60.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        if not (self.backoff >= 0 and self.max_backoff >= 0 and self.factor >= 1):  # NaN too
            raise ValueError("backoff and max_backoff must be >= 0, factor >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed."""
        base = min(self.backoff * self.factor ** (failed_attempt - 1), self.max_backoff)
        import random  # here, not at the top: `import shoal` need not pay for it

        return base * (1 + random.uniform(-self.jitter, self.jitter)) if base else 0.0


def retrying(policy: Retry | None = None, **options: Any) -> Callable[[F], F]:
    """Decorate a job function (sync or async) so a failure is retried by ``policy``
    (or ``Retry(**options)``). The signature is kept, so the scheduler still passes a
    RunContext to a function that takes one."""
    chosen = policy if policy is not None else Retry(**options)

    def decorate(fn: F) -> F:
        name = getattr(fn, "__qualname__", repr(fn))
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await call_async(chosen, name, lambda: fn(*args, **kwargs))

            return cast(F, run_async)

        @functools.wraps(fn)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            attempt = 1
            while True:
                count_attempt(attempt)
                try:
                    with logs.context(attempt=attempt):
                        return fn(*args, **kwargs)
                except chosen.retry_on as exc:
                    if attempt >= chosen.max_attempts:
                        raise
                    wait = _failed(name, attempt, chosen, exc)
                time.sleep(wait)  # a sync job runs in a worker thread
                attempt += 1

        return cast(F, run_sync)

    return decorate


async def call_async(policy: Retry, name: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``attempt()`` until it returns or ``policy`` gives up (then its error is raised).

    Counts the attempts for :func:`attempts`; each attempt's log lines carry ``attempt``.
    Cancellation (a job's timeout) is never retried.
    """
    number = 1
    while True:
        count_attempt(number)
        try:
            with logs.context(attempt=number):
                return await attempt()
        except policy.retry_on as exc:
            if number >= policy.max_attempts:
                raise
            wait = _failed(name, number, policy, exc)
        await asyncio.sleep(wait)
        number += 1


def count_attempt(attempt: int) -> None:
    """Record that the current run is in attempt ``attempt`` (1-based)."""
    counter = _attempts.get()
    if counter is not None:
        counter[0] = attempt


def _failed(name: str, attempt: int, policy: Retry, exc: BaseException) -> float:
    wait = policy.delay(attempt)
    log.warning(
        "%s: attempt %d of %d failed (%s); retrying in %.3f s",
        name,
        attempt,
        policy.max_attempts,
        type(exc).__name__,
        wait,
        extra={"attempt": attempt},
    )
    return wait
