"""Cron expressions in Quantum's syntax, evaluated by croniter, with an explicit DST policy.

Syntax (what Elixir's Quantum accepts):

- 5 fields: ``minute hour day-of-month month day-of-week``
- 6 fields: ``second minute hour day-of-month month day-of-week`` (seconds FIRST)
- 7 fields: the 6-field form plus a trailing ``year`` (1970-2099)
- names (``JAN``, ``MON``), ranges, steps, lists, and croniter's ``L``, ``W``, ``#``
- aliases ``@yearly @annually @monthly @weekly @daily @midnight @hourly
  @minutely @secondly`` and ``@reboot`` (fires once when the scheduler starts)

croniter only ever sees *naive wall-clock* times: its own time-zone handling has
a long history of DST bugs, so the mapping from wall-clock times to instants is
done here, by one documented rule.

DST policy (per schedule, in the schedule's zone):

- **Interval schedules** -- the hour field is ``*`` (every hour), e.g.
  ``*/5 * * * * *`` or ``0 * * * *``: they follow elapsed real time. They fire at
  every instant whose local wall time matches. Wall times inside a spring-forward
  gap do not exist and are not made up (``*/5`` seconds stays 5 s apart across
  the gap); a repeated fall-back hour fires in both of its occurrences.
- **Wall-clock schedules** -- the hour field is restricted, e.g. ``30 2 * * *``:
  they name a time of day. A matching time inside a spring-forward gap fires
  once, at the first valid instant after the gap (Berlin: 02:30 -> 03:00 CEST);
  several matching times inside one gap collapse into that one firing. A
  matching time inside a repeated fall-back hour fires once, at its first
  occurrence (the earlier, summer-time instant).

Zone transitions are assumed to be more than a day apart (true for every zone
in today's tz database); whole-second offsets are handled exactly.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = ["ALIASES", "REBOOT", "CronError", "CronSchedule", "resolve_zone"]

REBOOT = "@reboot"

#: Quantum's aliases, as the expression each stands for.
ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
    "@minutely": "* * * * *",
    "@secondly": "* * * * * *",
}

_ONE_SECOND = timedelta(seconds=1)
_ONE_DAY = timedelta(days=1)
_EPSILON = timedelta(microseconds=1)
_HOUR_FIELD = 1  # index of the hour field in croniter's expanded form


class CronError(ValueError):
    """A cron expression or time zone is invalid; the message names both the input and the
    problem."""


def resolve_zone(tz: str | ZoneInfo) -> ZoneInfo:
    """Turn a zone name into a ZoneInfo, failing with a CronError that names it."""
    if isinstance(tz, ZoneInfo):
        return tz
    if not isinstance(tz, str) or not tz:
        raise CronError(f"time zone must be an IANA zone name such as 'Europe/Berlin', got {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(
            f"unknown time zone {tz!r} (expected an IANA name such as 'Europe/Berlin')"
        ) from exc


class CronSchedule:
    """A parsed cron expression bound to a time zone; immutable and thread-safe.

    Build it with :meth:`parse`; ask it for fire times with :meth:`next_after`.
    """

    __slots__ = ("_cron", "_expr", "_fields", "_interval", "_lock", "_tz")

    def __init__(self, expr: str, tz: ZoneInfo, fields: str | None, interval: bool) -> None:
        """Use :meth:`parse`; this constructor trusts its arguments."""
        self._expr = expr
        self._tz = tz
        self._fields = fields
        self._interval = interval
        self._lock = threading.Lock()
        self._cron: croniter | None = None
        if fields is not None:
            self._cron = croniter(
                fields, datetime(2000, 1, 1), ret_type=datetime, second_at_beginning=True
            )

    @classmethod
    def parse(cls, expr: str, tz: str | ZoneInfo = "UTC") -> CronSchedule:
        """Parse ``expr`` in Quantum's syntax for zone ``tz``; raise CronError if either is bad.

        An expression that can never fire (say ``0 0 0 30 2 *``, or a year in the
        past) is rejected here too, so mistakes surface when the job is defined.
        """
        if not isinstance(expr, str):
            raise CronError(f"cron expression must be a string, got {expr!r}")
        text = " ".join(expr.split())
        if not text:
            raise CronError("cron expression is empty")
        try:
            zone = resolve_zone(tz)
        except CronError as exc:
            raise CronError(f"cron expression {text!r}: {exc}") from None
        lowered = text.lower()
        if lowered == REBOOT:
            return cls(REBOOT, zone, None, interval=False)
        if text.startswith("@"):
            if lowered not in ALIASES:
                known = " ".join([*ALIASES, REBOOT])
                raise CronError(f"cron expression {text!r}: unknown alias (known: {known})")
            fields = ALIASES[lowered]
            text = lowered
        else:
            fields = text
        parts = fields.split()
        if len(parts) not in (5, 6, 7):
            raise CronError(
                f"cron expression {text!r}: expected 5 fields (minute hour day month weekday), "
                f"6 (second first) or 7 (second first, year last), got {len(parts)}"
            )
        for part in parts:
            head = part[:1].upper()
            if head in ("H", "R") and (len(part) == 1 or part[1] in "(/"):
                raise CronError(
                    f"cron expression {text!r}: hashed/random field {part!r} is not cron syntax"
                )
        try:
            expanded, _ = croniter.expand(fields, second_at_beginning=True, strict=True)
        except Exception as exc:  # croniter raises several types for bad input
            raise CronError(f"cron expression {text!r}{_reason(exc)}") from exc
        hours = expanded[_HOUR_FIELD]
        interval = hours == ["*"] or set(hours) == set(range(24))
        schedule = cls(text, zone, fields, interval)
        try:
            first = schedule.next_after(datetime.now(UTC))
        except Exception as exc:
            raise CronError(f"cron expression {text!r}{_reason(exc)}") from exc
        if first is None:
            raise CronError(
                f"cron expression {text!r}: never fires (no match in the next 50 years)"
            )
        return schedule

    # -- properties ---------------------------------------------------------------------------

    @property
    def expression(self) -> str:
        """The expression as written (whitespace normalised; aliases lower-cased)."""
        return self._expr

    @property
    def tz(self) -> ZoneInfo:
        """The zone whose wall clock the fields refer to."""
        return self._tz

    @property
    def is_reboot(self) -> bool:
        """True for ``@reboot``: fires once at scheduler start, never on the clock."""
        return self._fields is None

    @property
    def is_interval(self) -> bool:
        """True when the hour field is ``*``: such schedules follow elapsed real time over DST."""
        return self._interval

    @property
    def has_seconds(self) -> bool:
        """True for the 6/7-field forms (second resolution)."""
        return self._fields is not None and len(self._fields.split()) > 5

    def __str__(self) -> str:
        return self._expr

    def __repr__(self) -> str:
        return f"CronSchedule({self._expr!r}, tz={self._tz.key!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronSchedule):
            return NotImplemented
        return (self._expr, self._tz.key) == (other._expr, other._tz.key)

    def __hash__(self) -> int:
        return hash((self._expr, self._tz.key))

    # -- evaluation ---------------------------------------------------------------------------

    def next_after(self, dt: datetime) -> datetime | None:
        """The first fire time strictly after ``dt``, or None if the schedule never fires again.

        ``dt`` must be aware (any zone). The result is aware **UTC**: a datetime in the
        second pass of a repeated hour (``fold=1``) never compares equal to one in another
        zone (PEP 495), so instants are kept in UTC; use ``.astimezone(schedule.tz)`` to show
        them. ``@reboot`` has no clock fire times, so it returns None.
        """
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError(f"next_after needs an aware datetime, got naive {dt!r}")
        if self._fields is None:
            return None
        t = dt.astimezone(UTC)
        found = self._next_interval(t) if self._interval else self._next_wall_clock(t)
        return found

    def latest_in(self, after: datetime, until: datetime) -> datetime | None:
        """The last fire time in ``(after, until]`` (aware UTC), or None: the newest missed tick.

        Binary search on ``next_after`` (monotonic), so long gaps cost a few dozen lookups,
        not one per missed tick.
        """
        first = self.next_after(after)
        if first is None or first > until:
            return None
        lo, hi = after.astimezone(UTC), until.astimezone(UTC)
        # next_after(lo) <= until and next_after(hi) > until; fire times are whole seconds,
        # so once the window is under a second it holds exactly one of them.
        while hi - lo >= timedelta(milliseconds=500):
            mid = lo + (hi - lo) / 2
            found = self.next_after(mid)
            if found is not None and found <= until:
                lo = mid
            else:
                hi = mid
        return self.next_after(lo)

    def _naive_next(self, wall: datetime) -> datetime | None:
        """croniter's next match strictly after a naive wall time (pure calendar arithmetic)."""
        assert self._cron is not None
        with self._lock:
            try:
                found: datetime = self._cron.get_next(datetime, start_time=wall)
            except Exception as exc:
                if type(exc).__name__ == "CroniterBadDateError":
                    return None
                raise
        return found

    def _offset(self, u: datetime) -> timedelta:
        offset = u.astimezone(self._tz).utcoffset()
        assert offset is not None
        return offset

    def _next_interval(self, t: datetime) -> datetime | None:
        """Interval policy: the first instant after ``t`` whose wall time matches.

        Within a stretch of constant UTC offset, wall time and instants map one to one;
        when the candidate lies beyond a transition, restart at the transition with the
        new offset (including the transition instant itself).
        """
        u, inclusive = t, False
        while True:
            offset = self._offset(u)
            wall = (u + offset).replace(tzinfo=None)
            found = self._naive_next(wall - _EPSILON if inclusive else wall)
            if found is None:
                return None
            candidate = (found - offset).replace(tzinfo=UTC)
            transition = self._next_transition(u, candidate)
            if transition is None:
                return candidate
            u, inclusive = transition, True

    def _next_wall_clock(self, t: datetime) -> datetime | None:
        """Wall-clock policy: gap times move to the gap's end, repeated times fire at the first
        occurrence; so the fire instant is a non-decreasing function of the wall time."""
        local = t.astimezone(self._tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold == 1:
            # Second pass through a repeated hour: every wall time up to the end of the
            # repeat already fired in the first pass, so search from the repeat's end.
            first = wall.replace(tzinfo=self._tz).astimezone(UTC)
            transition = self._first_change(first, t)
            wall = (transition + self._offset(first)).replace(tzinfo=None) - _EPSILON
        found = self._naive_next(wall)
        return None if found is None else self._resolve_wall(found)

    def _resolve_wall(self, wall: datetime) -> datetime:
        """Map a naive wall time to its one fire instant under the wall-clock policy."""
        early = wall.replace(tzinfo=self._tz, fold=0)
        late = wall.replace(tzinfo=self._tz, fold=1)
        if early.utcoffset() == late.utcoffset():
            return early.astimezone(UTC)
        a, b = sorted([early.astimezone(UTC), late.astimezone(UTC)])
        exists = a.astimezone(self._tz).replace(tzinfo=None) == wall
        if exists:
            return a  # repeated hour: first occurrence
        return self._first_change(a, b)  # gap: the first instant after it

    def _next_transition(self, after: datetime, until: datetime) -> datetime | None:
        """The first UTC-offset change in ``(after, until]``, stepping a day at a time."""
        base = self._offset(after)
        lo = after
        while lo < until:
            hi = min(lo + _ONE_DAY, until)
            if self._offset(hi) != base:
                return self._first_change(lo, hi)
            lo = hi
        return None

    def _first_change(self, lo: datetime, hi: datetime) -> datetime:
        """The whole second in ``(lo, hi]`` where the offset first differs from ``lo``'s.

        Requires exactly one transition in the window (it is at most a day wide).
        """
        base = self._offset(lo)
        lo_s = int(lo.timestamp() // 1)
        hi_s = -int(-hi.timestamp() // 1)
        while hi_s - lo_s > 1:
            mid = (lo_s + hi_s) // 2
            if self._offset(datetime.fromtimestamp(mid, UTC)) == base:
                lo_s = mid
            else:
                hi_s = mid
        return datetime.fromtimestamp(hi_s, UTC)


def _reason(exc: BaseException) -> str:
    """croniter's message without its own copy of the expression, ready to follow it."""
    message = str(exc) or type(exc).__name__
    if message.startswith("[") and "] " in message:
        message = message.split("] ", 1)[1]
    message = message.rstrip(".")
    return f" {message}" if message.startswith("is ") else f": {message}"
