"""Property tests: fire times equal cronsim's (an independent crontab(5) implementation) away
from DST edges, and follow the documented DST policy at the edges (checked against a
brute-force oracle, second by second). The fixed-corpus differential run against cronsim,
with its figures, is in test_cron_differential.py."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError
from cronsim.cronsim import Field
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shoal.cron import CronError, CronSchedule

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
DST_ZONES = ["Europe/Berlin", "America/New_York"]


def field(lo: int, hi: int, names: list[str] | None = None) -> st.SearchStrategy[str]:
    """One cron field: *, a value, a range, a step, or a list of those."""
    value = st.integers(lo, hi)
    word = value.map(lambda v: names[v - lo] if names else str(v))
    single = st.one_of(value.map(str), word) if names else value.map(str)
    span = st.tuples(value, value).map(sorted).map(lambda ab: f"{ab[0]}-{ab[1]}")
    step = st.tuples(st.one_of(st.just("*"), span), st.integers(1, hi - lo + 1)).map(
        lambda bs: f"{bs[0]}/{bs[1]}"
    )
    listed = st.lists(st.one_of(single, span), min_size=2, max_size=4).map(",".join)
    return st.one_of(st.just("*"), single, span, step, listed)


SECOND = field(0, 59)
MINUTE = field(0, 59)
HOUR = field(0, 23)
DOM = st.one_of(field(1, 31), st.sampled_from(["L", "LW", "*/2", "*/3"]))
MONTH = field(1, 12, MONTHS)
DOW = st.one_of(
    field(0, 6, DAYS), st.sampled_from(["1#2", "5#3", "5L", "FRIL", "MON-FRI", "MON#1", "*/2"])
)


@st.composite
def expressions(draw: st.DrawFn) -> str:
    """A 5- or 6-field (seconds first) expression in the syntax both shoal and cronsim read
    (cronsim has no year field and no nW; those are tested by example)."""
    core = [draw(MINUTE), draw(HOUR), draw(DOM), draw(MONTH), draw(DOW)]
    if draw(st.booleans()):
        return " ".join(core)
    return " ".join([draw(SECOND), *core])


def in_cronsim_syntax(expr: str) -> str:
    """cronsim spells the last Friday 5L only."""
    return " ".join(
        f"{DAYS.index(f[:-1].upper())}L" if f[:-1].upper() in DAYS and f.endswith("L") else f
        for f in expr.split()
    )


def cronsim_quirk(expr: str) -> str | None:
    """A known cronsim defect this expression hits, or None.

    cronsim reads a one-value range with a step (``0-0/1``) as ``0/1`` (from 0 to the
    field's end); crontab(5), Quantum and shoal read it as the one value.
    """
    for term in ",".join(expr.split()).split(","):
        base, slash, _ = term.partition("/")
        first, dash, last = base.partition("-")
        if slash and dash and first.upper() == last.upper():
            return f"one-value range with a step {term!r}"
    return None


def valid(expr: str) -> bool:
    if cronsim_quirk(expr) is not None:
        return False
    try:
        CronSim(in_cronsim_syntax(expr), datetime(2000, 1, 1))
    except CronSimError:
        return False
    return True


def cronsim_next(expr: str, start: datetime) -> datetime | None:
    """cronsim's first fire time after ``start`` (aware UTC in, aware UTC out)."""
    naive = start.astimezone(UTC).replace(tzinfo=None)
    try:
        found = next(CronSim(in_cronsim_syntax(expr), naive))
    except StopIteration:
        return None
    return found.replace(tzinfo=UTC)


def cronsim_next_in(expr: str, start: datetime) -> datetime | None:
    """cronsim's first fire time after an aware ``start`` in its own zone."""
    try:
        return next(CronSim(in_cronsim_syntax(expr), start.replace(microsecond=0)))
    except StopIteration:
        return None


START = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2037, 12, 31))


@settings(max_examples=150, deadline=None)
@given(expr=expressions(), start=START)
def test_utc_fire_times_equal_cronsim(expr: str, start: datetime) -> None:
    assume(valid(expr))
    try:
        schedule = CronSchedule.parse(expr, "UTC")
    except CronError as exc:
        assert "never fires" in str(exc)
        return
    t: datetime | None = start.replace(tzinfo=UTC)
    for _ in range(4):
        assert t is not None
        expected = cronsim_next(expr, t)
        got = schedule.next_after(t)
        assert got == expected, (expr, t)
        if got is None:
            return
        t = got


def offset_constant(zone: ZoneInfo, a: datetime, b: datetime) -> bool:
    """No UTC-offset change between a and b (checked every six hours and at both ends)."""
    base = a.astimezone(zone).utcoffset()
    t = a
    while t < b:
        if t.astimezone(zone).utcoffset() != base:
            return False
        t += timedelta(hours=6)
    return b.astimezone(zone).utcoffset() == base


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(
    expr=expressions(),
    start=START,
    zone_name=st.sampled_from([*DST_ZONES, "Asia/Tokyo", "Australia/Sydney", "America/Sao_Paulo"]),
)
def test_zoned_fire_times_equal_cronsim_away_from_dst(
    expr: str, start: datetime, zone_name: str
) -> None:
    assume(valid(expr))
    zone = ZoneInfo(zone_name)
    try:
        schedule = CronSchedule.parse(expr, zone)
    except CronError as exc:  # croniter accepts it, so the only reason may be that it never fires
        assert "never fires" in str(exc)
        return
    aware = start.replace(tzinfo=zone)
    assume(aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == start)  # exists
    expected = cronsim_next_in(expr, aware)
    got = schedule.next_after(aware)
    if expected is None or got is None:
        assert expected is got
        return
    end = max(expected, got)
    assume(end - aware < timedelta(days=400) and offset_constant(zone, aware, end))
    assert got == expected


# -- DST edges against a brute-force oracle --------------------------------------------------


def transition(zone_name: str, year: int, spring: bool) -> datetime:
    """The UTC instant of a DST change, from the published rules (not from zoneinfo)."""
    cal = calendar.Calendar()
    if zone_name == "Europe/Berlin":  # last Sunday of March / October, 01:00 UTC
        month = 3 if spring else 10
        day = max(d for d, wd in cal.itermonthdays2(year, month) if d and wd == 6)
        return datetime(year, month, day, 1, tzinfo=UTC)
    # America/New_York since 2007: 2nd Sunday of March 07:00 UTC, 1st Sunday of Nov 06:00 UTC
    month = 3 if spring else 11
    sundays = [d for d, wd in cal.itermonthdays2(year, month) if d and wd == 6]
    return datetime(
        year, month, sundays[1] if spring else sundays[0], 7 if spring else 6, tzinfo=UTC
    )


class Matcher:
    """An independent matcher for plain fields (no L/W/#), from cronsim's field parser."""

    def __init__(self, expr: str) -> None:
        parts = expr.upper().split()
        if len(parts) == 5:
            parts.insert(0, "0")

        def values(f: Field, text: str) -> set[int]:
            return {v for v in f.parse(text) if isinstance(v, int)}

        self.second = values(Field.SECOND, parts[0])
        self.minute = values(Field.MINUTE, parts[1])
        self.hour = values(Field.HOUR, parts[2])
        self.dom_any, self.dow_any = parts[3].startswith("*"), parts[5].startswith("*")
        self.dom = values(Field.DAY, parts[3])
        self.month = values(Field.MONTH, parts[4])
        self.dow = {v % 7 for v in values(Field.DOW, parts[5])}

    def __call__(self, w: datetime) -> bool:
        if not (
            w.second in self.second
            and w.minute in self.minute
            and w.hour in self.hour
            and w.month in self.month
        ):
            return False
        dom_ok, dow_ok = w.day in self.dom, (w.weekday() + 1) % 7 in self.dow
        if not self.dom_any and not self.dow_any:
            return dom_ok or dow_ok  # cron's OR when both day fields are restricted
        return dom_ok and dow_ok


def oracle(
    schedule: CronSchedule, match: Matcher, lo: datetime, hi: datetime, trans: datetime
) -> list[datetime]:
    """Every fire instant in [lo, hi] under the documented policy, by walking each second."""
    zone = schedule.tz
    found: set[datetime] = set()
    u = lo
    while u <= hi:
        local = u.astimezone(zone)
        if match(local.replace(tzinfo=None)) and (schedule.is_interval or local.fold == 0):
            found.add(u)  # wall-clock schedules: only the first pass through a repeat
        u += timedelta(seconds=1)
    if not schedule.is_interval:  # a matching wall time inside a gap fires at the gap's end
        before = (trans - timedelta(seconds=1)).astimezone(zone).replace(tzinfo=None)
        after = trans.astimezone(zone).replace(tzinfo=None)
        w = before + timedelta(seconds=1)
        while w < after:
            if match(w):
                found.add(trans)
                break
            w += timedelta(seconds=1)
    return sorted(found)


PLAIN_DOM = st.one_of(st.just("*"), st.integers(1, 31).map(str))
NEAR_HOURS = st.sampled_from(["*", "2", "1", "3", "1-3", "*/2", "2,3", "0-2", "1,2", "5"])


@st.composite
def dst_expressions(draw: st.DrawFn) -> str:
    """Expressions that fire near 01:00-03:00 local time, where the changes happen."""
    seconds = draw(st.sampled_from(["0", "*/5", "*/20", "15,45", "7", "*"]))
    minutes = draw(st.sampled_from(["*", "0", "30", "*/15", "0,45", "59", "10-20"]))
    return f"{seconds} {minutes} {draw(NEAR_HOURS)} {draw(PLAIN_DOM)} * *"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(
    expr=dst_expressions(),
    zone_name=st.sampled_from(DST_ZONES),
    year=st.integers(2008, 2037),
    spring=st.booleans(),
    starts=st.lists(st.integers(-80 * 60, 80 * 60), min_size=8, max_size=8),
)
def test_dst_edges_follow_the_policy(
    expr: str, zone_name: str, year: int, spring: bool, starts: list[int]
) -> None:
    trans = transition(zone_name, year, spring)
    zone = ZoneInfo(zone_name)
    # The rules computed above really are the zone's transitions.
    assert (trans - timedelta(seconds=1)).astimezone(zone).utcoffset() != trans.astimezone(
        zone
    ).utcoffset()
    schedule = CronSchedule.parse(expr, zone)
    lo, hi = trans - timedelta(minutes=90), trans + timedelta(minutes=90)
    expected_fires = oracle(schedule, Matcher(expr), lo, hi, trans)
    assume(expected_fires)
    for delta in starts:
        start = trans + timedelta(seconds=delta, microseconds=delta % 7 * 100_000)
        later = [f for f in expected_fires if f > start]
        if not later:
            continue
        assert schedule.next_after(start) == later[0], (expr, start.isoformat())
    # Walking fire to fire reproduces the oracle's list: nothing doubled, nothing lost.
    walked: list[datetime] = []
    t = lo - timedelta(microseconds=1)
    while (nxt := schedule.next_after(t)) is not None and nxt <= hi:
        walked.append(nxt.astimezone(UTC))
        t = nxt
    assert walked == expected_fires


@settings(max_examples=100, deadline=None)
@given(
    expr=expressions(),
    zone_name=st.sampled_from(DST_ZONES),
    start=START,
    hours=st.integers(1, 24 * 400),
)
def test_latest_in_is_the_last_fire_before_until(
    expr: str, zone_name: str, start: datetime, hours: int
) -> None:
    assume(valid(expr))
    try:
        schedule = CronSchedule.parse(expr, zone_name)
    except CronError as exc:  # croniter accepts it, so the only reason may be that it never fires
        assert "never fires" in str(exc)
        return
    after = start.replace(tzinfo=UTC)
    until = after + timedelta(hours=hours, microseconds=start.microsecond)
    latest = schedule.latest_in(after, until)
    if latest is None:
        nxt = schedule.next_after(after)
        assert nxt is None or nxt > until
        return
    assert after < latest <= until
    nxt = schedule.next_after(latest)
    assert nxt is None or nxt > until
