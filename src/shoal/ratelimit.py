"""A logger wrapper that repeats a warning at most once per period.

Discovery runs every second; a DNS outage that lasts an hour must not write
3600 identical warnings, yet the operator must see that it is still going on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Log a problem at warning when it starts, changes kind, or every `period` s; else debug."""

    def __init__(
        self,
        logger: logging.Logger,
        period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        streak: bool = True,
    ) -> None:
        self._logger = logger
        self._streak = streak
        self._period = period
        self._clock = clock
        self._last_warned: dict[str, float] = {}
        self.failures = 0

    def problem(self, kind: str, message: str, *args: object) -> None:
        """Report a failed round; `kind` groups repeats of the same problem.

        Warns the first time a kind is seen and then once per period, whatever
        details (which query, which server) the message carries.
        """
        self.failures += 1
        now = self._clock()
        previous = self._last_warned.get(kind)
        if previous is None or now - previous >= self._period:
            self._last_warned[kind] = now
            repeated = self._streak and self.failures > 1
            suffix = f" (failed {self.failures} time(s) in a row)" if repeated else ""
            self._logger.warning(message + suffix, *args)
        else:
            self._logger.debug(message, *args)

    def recovered(self, message: str, *args: object) -> None:
        """Report a good round; logs once at info if the previous rounds failed."""
        if self.failures:
            self._logger.info(message + " (after %d failed round(s))", *args, self.failures)
        self.failures = 0
        self._last_warned.clear()
