"""Event-loop lag monitor: notices when this process stopped running for a while.

A blocked loop (sync code on it) and a paused process (SIGSTOP, a VM freeze)
look the same from inside: a short sleep wakes up far too late. Both leave the
node acting on a stale view of the cluster, so singletons revalidate after one
(`Singletons.revalidate`) before acting. Stalls are logged, rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shoal.ratelimit import RateLimitedLog

log = logging.getLogger("shoal.lag")

# How often the monitor wakes up, and the lateness that counts as a stall (seconds).
PERIOD = 0.1
STALL = 0.5


class LagMonitor:
    """Measures how late the loop wakes a `PERIOD` sleep; remembers the last stall."""

    def __init__(self, threshold: float = STALL) -> None:
        self.threshold = threshold
        self.last_stall_end = float("-inf")  # monotonic
        self.last_stall = 0.0  # seconds
        self.stalls = 0
        self._revalidated = float("-inf")
        self._last_wake = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, period=10.0, streak=False)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shoal-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def stalled_recently(self) -> bool:
        """A stall ended and nobody has revalidated since.

        Also true when called first thing after a stall, before the monitor's own
        (late) wake-up has run: its wake-up is overdue then.
        """
        overdue = time.monotonic() - self._last_wake - PERIOD
        if self._task is not None and overdue >= self.threshold:
            self.note(overdue)
            self._last_wake = time.monotonic()
        return self.last_stall_end > self._revalidated

    def revalidated(self, stall_end: float) -> None:
        self._revalidated = max(self._revalidated, stall_end)

    def note(self, lag: float) -> None:
        """Record a stall of `lag` seconds that ends now."""
        self.last_stall_end = time.monotonic()
        self.last_stall = lag
        self.stalls += 1
        self._log.problem(
            "stall",
            "event loop stalled for %.2f s (blocked or paused); %d stall(s)",
            lag,
            self.stalls,
        )

    async def _run(self) -> None:
        while True:
            self._last_wake = time.monotonic()
            await asyncio.sleep(PERIOD)
            lag = time.monotonic() - self._last_wake - PERIOD
            if lag >= self.threshold:
                self.note(lag)
