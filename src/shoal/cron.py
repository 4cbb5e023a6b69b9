"""Cron expressions in Quantum's syntax with crontab(5) day matching, and an explicit DST policy.

Syntax (what Elixir's Quantum accepts):

- 5 fields: ``minute hour day-of-month month day-of-week``
- 6 fields: ``second minute hour day-of-month month day-of-week`` (seconds FIRST)
- 7 fields: the 6-field form plus a trailing ``year`` (1970-2099)
- names (``JAN``, ``MON``), ranges, steps, lists; 0 and 7 are Sunday
- day of month: ``L`` (last day), ``LW`` (last weekday), ``15W`` (weekday nearest the 15th)
- day of week: ``5L`` / ``FRIL`` (last Friday; croniter's ``L5`` too), ``MON#2`` (second Monday)
- aliases ``@yearly @annually @monthly @weekly @daily @midnight @hourly
  @minutely @secondly`` and ``@reboot`` (fires once when the scheduler starts)

Day matching (``day_match``):

- ``"crontab"`` (default), as crontab(5) and Vixie/Debian cron: when both day fields are
  restricted, a day matching *either* fires; a field that starts with ``*`` (``*``,
  ``*/2``) counts as unrestricted, so ``0 0 */2 * MON`` means odd days that are Mondays.
- ``"and"``, as Quantum: a day must match both fields, always.

The fields are evaluated here on *naive wall-clock* times (pure calendar arithmetic);
the mapping from wall-clock times to instants is done by one documented rule.

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

import bisect
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = ["ALIASES", "REBOOT", "CronError", "CronSchedule", "DayMatch", "resolve_zone"]

REBOOT = "@reboot"

#: How the day-of-month and day-of-week fields combine (see the module docstring).
DayMatch = Literal["crontab", "and"]

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
_SEARCH_YEARS = 50  # a schedule with no match this far ahead never fires
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


class CronError(ValueError):
    """A cron expression or time zone is invalid; the message names both the input and the
    problem."""


class _FieldError(ValueError):
    """A bad field; CronSchedule.parse adds the expression to the message."""


def resolve_zone(tz: str | ZoneInfo) -> ZoneInfo:
    """Turn a zone name into a ZoneInfo, failing with a CronError that names it."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # here: importing it costs a few ms

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


# -- fields ---------------------------------------------------------------------------------


class _Range(NamedTuple):
    name: str
    lo: int
    hi: int
    names: tuple[str, ...] = ()
    names_from: int = 0

    def value(self, text: str, part: str) -> int:
        upper = text.upper()
        if upper in self.names:
            return self.names.index(upper) + self.names_from
        if not text.isdigit():
            raise _FieldError(f"{self.name} field {part!r} is not acceptable")
        number = int(text)
        if not self.lo <= number <= self.hi:
            raise _FieldError(
                f"{self.name} field {part!r}: {number} is out of range {self.lo}-{self.hi}"
            )
        return number


_SECOND = _Range("second", 0, 59)
_MINUTE = _Range("minute", 0, 59)
_HOUR = _Range("hour", 0, 23)
_DOM = _Range("day-of-month", 1, 31)
_MONTH = _Range("month", 1, 12, tuple(_MONTHS), 1)
_DOW = _Range("day-of-week", 0, 7, tuple(_DAYS), 0)
_YEAR = _Range("year", 1970, 2099)


def _values(spec: _Range, part: str) -> set[int]:
    """The numbers one field means: lists of ``*``, ``a``, ``a-b``, each with an optional
    ``/step`` (``a/step`` runs from a to the field's end)."""
    out: set[int] = set()
    for term in part.split(","):
        base, slash, step_text = term.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise _FieldError(f"{spec.name} field {part!r}: step {step_text!r} must be >= 1")
            step = int(step_text)
        if base == "*":
            lo, hi = spec.lo, spec.hi
        elif "-" in base:
            first, _, last = base.partition("-")
            lo, hi = spec.value(first, part), spec.value(last, part)
            if lo > hi:
                raise _FieldError(f"{spec.name} field {part!r}: range {base!r} runs backwards")
        else:
            lo = spec.value(base, part)
            hi = spec.hi if slash else lo
        out.update(range(lo, hi + 1, step))
    return out


class _Days(NamedTuple):
    """Day-of-month and day-of-week fields, with their L/W/# forms."""

    dom: frozenset[int]
    last_day: bool  # L
    last_weekday: bool  # LW
    nearest: frozenset[int]  # nW: the weekday nearest day n
    dow: frozenset[int]  # 0 = Sunday
    last_dow: frozenset[int]  # 5L: the last Friday
    nth_dow: frozenset[tuple[int, int]]  # MON#2: (1, 2)
    both: bool  # a day must match both fields (else either)

    def in_month(self, year: int, month: int) -> list[int]:
        """The days of this month that match, sorted."""
        import calendar  # here: a node without jobs never needs it

        first_weekday, length = calendar.monthrange(year, month)  # Monday = 0
        dom: set[int] = {d for d in self.dom if d <= length}
        if self.last_day:
            dom.add(length)
        if self.last_weekday or self.nearest:

            def weekday(d: int) -> int:
                return (first_weekday + d - 1) % 7

            if self.last_weekday:
                last = length
                while weekday(last) > 4:
                    last -= 1
                dom.add(last)
            for n in self.nearest:
                target = min(n, length)
                if weekday(target) == 5:  # Saturday: Friday, or Monday if that leaves the month
                    target = target - 1 if target > 1 else target + 2
                elif weekday(target) == 6:  # Sunday: Monday, or Friday if that leaves the month
                    target = target + 1 if target < length else target - 2
                dom.add(target)
        dow: set[int] = set()
        for d in range(1, length + 1):
            sunday_based = (first_weekday + d) % 7
            if (
                sunday_based in self.dow
                or (sunday_based in self.last_dow and d + 7 > length)
                or (sunday_based, (d + 6) // 7) in self.nth_dow
            ):
                dow.add(d)
        return sorted(dom & dow if self.both else dom | dow)


def _dom_field(part: str) -> tuple[set[int], bool, bool, set[int]]:
    plain: list[str] = []
    last_day = last_weekday = False
    nearest: set[int] = set()
    for term in part.split(","):
        upper = term.upper()
        if upper == "L":
            last_day = True
        elif upper == "LW":
            last_weekday = True
        elif upper.endswith("W") and term[:-1].isdigit():
            nearest.add(_DOM.value(term[:-1], part))
        else:
            plain.append(term)
    values = _values(_DOM, ",".join(plain)) if plain else set()
    return values, last_day, last_weekday, nearest


def _dow_field(part: str) -> tuple[set[int], set[int], set[tuple[int, int]]]:
    plain: list[str] = []
    last: set[int] = set()
    nth: set[tuple[int, int]] = set()
    for term in part.split(","):
        upper = term.upper()
        if "#" in upper:
            day, _, n = upper.partition("#")
            if not n.isdigit() or not 1 <= int(n) <= 5:
                raise _FieldError(f"day-of-week field {part!r}: #{n} must be #1 to #5")
            nth.add((_DOW.value(day, part) % 7, int(n)))
        elif len(upper) > 1 and upper.endswith("L"):  # Quantum's 5L / FRIL
            last.add(_DOW.value(upper[:-1], part) % 7)
        elif len(upper) > 1 and upper.startswith("L"):  # croniter's L5
            last.add(_DOW.value(upper[1:], part) % 7)
        else:
            plain.append(term)
    values = {v % 7 for v in _values(_DOW, ",".join(plain))} if plain else set()
    return values, last, nth


class _Fields:
    """A parsed expression's fields: finds the next matching naive wall time."""

    def __init__(self, parts: list[str], day_match: DayMatch) -> None:
        if len(parts) == 5:
            parts = ["0", *parts]
        second, minute, hour, dom, month, dow = parts[:6]
        self.seconds = sorted(_values(_SECOND, second))
        self.minutes = sorted(_values(_MINUTE, minute))
        self.hours = sorted(_values(_HOUR, hour))
        self.months = frozenset(_values(_MONTH, month))
        self.years = frozenset(_values(_YEAR, parts[6])) if len(parts) == 7 else None
        dom_values, last_day, last_weekday, nearest = _dom_field(dom)
        dow_values, last_dow, nth_dow = _dow_field(dow)
        if dom.startswith("*") or dow.startswith("*"):
            both = True  # crontab(5): a '*'-prefixed day field is unrestricted, so AND
        else:
            both = day_match == "and"
        self.days = _Days(
            dom=frozenset(dom_values),
            last_day=last_day,
            last_weekday=last_weekday,
            nearest=frozenset(nearest),
            dow=frozenset(dow_values),
            last_dow=frozenset(last_dow),
            nth_dow=frozenset(nth_dow),
            both=both,
        )
        self._month_days: dict[tuple[int, int], list[int]] = {}

    @property
    def every_hour(self) -> bool:
        return len(self.hours) == 24

    def _days_of(self, year: int, month: int) -> list[int]:
        key = (year, month)
        days = self._month_days.get(key)
        if days is None:
            if len(self._month_days) > 1200:
                self._month_days.clear()
            days = self._month_days[key] = self.days.in_month(year, month)
        return days

    def next_after(self, wall: datetime) -> datetime | None:
        """The first matching wall time strictly after ``wall`` (naive), or None within
        the search horizon."""
        start = wall.replace(microsecond=0) + _ONE_SECOND
        day, clock = start.date(), start.time()
        end_year = min(start.year + _SEARCH_YEARS, 9998)
        year, month = day.year, day.month
        today = (year, month, day.day)
        while year <= end_year:
            if (self.years is None or year in self.years) and month in self.months:
                days = self._days_of(year, month)
                from_day = day.day if (year, month) == today[:2] else 1
                for d in days[bisect.bisect_left(days, from_day) :]:
                    found = self._time_from(clock if (year, month, d) == today else time())
                    if found is not None:
                        return datetime.combine(date(year, month, d), found)
            month += 1
            if month == 13:
                year, month = year + 1, 1
        return None

    def _time_from(self, clock: time) -> time | None:
        """The first matching time of day at or after ``clock``."""
        for h in self.hours[bisect.bisect_left(self.hours, clock.hour) :]:
            m_from = clock.minute if h == clock.hour else 0
            for m in self.minutes[bisect.bisect_left(self.minutes, m_from) :]:
                s_from = clock.second if (h, m) == (clock.hour, clock.minute) else 0
                i = bisect.bisect_left(self.seconds, s_from)
                if i < len(self.seconds):
                    return time(h, m, self.seconds[i])
        return None


class CronSchedule:
    """A parsed cron expression bound to a time zone; immutable and thread-safe.

    Build it with :meth:`parse`; ask it for fire times with :meth:`next_after`.
    """

    __slots__ = ("_day_match", "_expr", "_fields", "_interval", "_tz")

    def __init__(
        self, expr: str, tz: ZoneInfo, fields: _Fields | None, day_match: DayMatch = "crontab"
    ) -> None:
        """Use :meth:`parse`; this constructor trusts its arguments."""
        self._expr = expr
        self._tz = tz
        self._fields = fields
        self._day_match = day_match
        self._interval = fields is not None and fields.every_hour

    @classmethod
    def parse(
        cls, expr: str, tz: str | ZoneInfo = "UTC", *, day_match: DayMatch = "crontab"
    ) -> CronSchedule:
        """Parse ``expr`` in Quantum's syntax for zone ``tz``; raise CronError if either is bad.

        ``day_match="and"`` gives Quantum's rule (a day must match both day fields); the
        default is crontab(5)'s. An expression that can never fire (say ``0 0 0 30 2 *``,
        or a year in the past) is rejected here too, so mistakes surface when the job is
        defined.
        """
        if not isinstance(expr, str):
            raise CronError(f"cron expression must be a string, got {expr!r}")
        text = " ".join(expr.split())
        if not text:
            raise CronError("cron expression is empty")
        if day_match not in get_args(DayMatch):
            raise CronError(
                f"cron expression {text!r}: day_match must be 'crontab' or 'and', got {day_match!r}"
            )
        try:
            zone = resolve_zone(tz)
        except CronError as exc:
            raise CronError(f"cron expression {text!r}: {exc}") from None
        lowered = text.lower()
        if lowered == REBOOT:
            return cls(REBOOT, zone, None, day_match)
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
            parsed = _Fields(parts, day_match)
        except _FieldError as exc:
            raise CronError(f"cron expression {text!r}: {exc}") from None
        schedule = cls(text, zone, parsed, day_match)
        if schedule.next_after(datetime.now(UTC)) is None:
            raise CronError(
                f"cron expression {text!r}: never fires (no match in the next "
                f"{_SEARCH_YEARS} years)"
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
    def day_match(self) -> DayMatch:
        """How the two day fields combine: ``"crontab"`` (crontab(5)) or ``"and"`` (Quantum)."""
        return self._day_match

    @property
    def has_seconds(self) -> bool:
        """True for the 6/7-field forms (second resolution)."""
        return len(ALIASES.get(self._expr, self._expr).split()) > 5

    def __str__(self) -> str:
        return self._expr

    def __repr__(self) -> str:
        extra = "" if self._day_match == "crontab" else f", day_match={self._day_match!r}"
        return f"CronSchedule({self._expr!r}, tz={self._tz.key!r}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronSchedule):
            return NotImplemented
        return (self._expr, self._tz.key, self._day_match) == (
            other._expr,
            other._tz.key,
            other._day_match,
        )

    def __hash__(self) -> int:
        return hash((self._expr, self._tz.key, self._day_match))

    # -- evaluation ---------------------------------------------------------------------------

    def next_after(self, dt: datetime) -> datetime | None:
        """The first fire time strictly after ``dt``, or None if the schedule never fires again.

        ``dt`` must be aware (any zone). The result is aware **UTC**: a datetime in the
        second pass of a repeated hour (``fold=1``) never compares equal to one in another
        zone (PEP 495), so instants are kept in UTC; use ``.astimezone(schedule.tz)`` to show
        them. ``@reboot`` has no clock fire times, so it returns None, as it does at the
        ends of datetime's range (years 1 and 9999), where the search has no room.
        """
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError(f"next_after needs an aware datetime, got naive {dt!r}")
        if self._fields is None:
            return None
        t = dt.astimezone(UTC)
        try:
            return self._next_interval(t) if self._interval else self._next_wall_clock(t)
        except OverflowError:
            return None

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
        """The next matching wall time strictly after a naive wall time (calendar arithmetic)."""
        assert self._fields is not None
        return self._fields.next_after(wall)

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
