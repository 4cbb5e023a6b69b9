"""Differential tests: shoal's cron against cronsim, an independent crontab(5) implementation.

A fixed corpus (day fields crossed, all L/LW/nL/# forms that cronsim reads, steps that
start with ``*``) is walked from fixed start times, fire time by fire time, in UTC and
across the DST changes of two zones. Every disagreement must be one of the documented
policy differences listed in ``KNOWN``; anything else fails the test and is printed.

Run with ``-s`` to see the figures (expressions x start times, comparisons, disagreements).
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim, CronSimError

from shoal.cron import CronError, CronSchedule

from .test_cron_properties import cronsim_quirk, in_cronsim_syntax

DOMS = ["*", "*/2", "*/3", "1", "15", "1,15", "10-20", "L", "LW", "31", "29", "1-7", "2-30/7"]
DOWS = ["*", "MON", "1-5", "*/2", "5L", "FRIL", "MON#2", "0,6", "SUN", "7", "2#5", "*/3"]
MONTHS = ["*", "FEB", "*/4", "JAN,JUL"]
TIMES = ["0 0", "30 9", "*/15 *", "0 */6", "*/20 5 4", "0 0 */2"]  # the last two: 6 fields

STARTS = [
    datetime(2024, 1, 1, tzinfo=UTC),
    datetime(2024, 2, 28, 23, 59, 59, tzinfo=UTC),
    datetime(2025, 6, 15, 12, 34, 56, 789000, tzinfo=UTC),
    datetime(2027, 12, 31, 23, 0, tzinfo=UTC),
    datetime(2031, 3, 1, 6, tzinfo=UTC),
]
FIRES = 5  # successive fire times compared from each start

#: Documented policy differences: the only disagreements allowed, by name.
KNOWN = {
    "dst-class": (
        "near a DST change, shoal applies its wall-clock policy to every schedule whose hour "
        "field is restricted; cronsim applies Debian cron's wall-clock fix-ups only to 5-field "
        "expressions whose minute and hour fields do not start with '*', and elapsed time to "
        "the rest (docs/scheduler.md, 'Time zones and DST')"
    ),
    "cronsim-before-start": (
        "started in the second pass of a repeated hour, cronsim drops the fold and returns the "
        "first pass's fire time, which lies before the start; its later fire times agree"
    ),
}


def corpus() -> list[str]:
    """Every DOM x DOW pair, each with two of the time/month variants (deterministic)."""
    out: list[str] = []
    variants = itertools.cycle(itertools.product(TIMES, MONTHS))
    for dom, dow in itertools.product(DOMS, DOWS):
        for _ in range(2):
            time_part, month = next(variants)
            out.append(f"{time_part} {dom} {month} {dow}")
    return out


def cronsim_walk(expr: str, start: datetime, n: int) -> list[datetime] | None:
    """cronsim's next ``n`` fire times after ``start`` as aware UTC; None if it rejects."""
    try:
        it = CronSim(in_cronsim_syntax(expr), start.astimezone(UTC).replace(tzinfo=None))
    except CronSimError:
        return None
    out: list[datetime] = []
    for _ in range(n):
        try:
            out.append(next(it).replace(tzinfo=UTC))
        except StopIteration:
            break
    return out


def shoal_walk(schedule: CronSchedule, start: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    t = start
    for _ in range(n):
        nxt = schedule.next_after(t)
        if nxt is None:
            break
        out.append(nxt)
        t = nxt
    return out


def test_corpus_in_utc_has_no_disagreements() -> None:
    exprs = corpus()
    compared = 0
    skipped: list[str] = []
    bad: list[str] = []
    for expr in exprs:
        if cronsim_quirk(expr):
            skipped.append(expr)
            continue
        try:
            schedule = CronSchedule.parse(expr)
        except CronError as exc:
            # both must find it impossible: cronsim rejects it or never fires it
            theirs = cronsim_walk(expr, STARTS[0], 1)
            if theirs:
                bad.append(f"{expr}: shoal rejects ({exc}), cronsim fires {theirs[0]}")
            continue
        for start in STARTS:
            theirs = cronsim_walk(expr, start, FIRES)
            ours = shoal_walk(schedule, start, FIRES)
            compared += 1
            if theirs is None:
                bad.append(f"{expr}: cronsim rejects what shoal accepts")
                break
            if ours != theirs:
                bad.append(f"{expr} from {start}: shoal {ours} cronsim {theirs}")
    print(
        f"\ncron differential (UTC): {len(exprs)} expressions x {len(STARTS)} start times, "
        f"{compared} walks of {FIRES} fire times, {len(bad)} disagreements, "
        f"{len(skipped)} skipped (cronsim defect)"
    )
    assert len(exprs) >= 300 and compared >= 1400
    assert not bad, "\n".join(bad[:20])


def quantum_and(expr: str, start: datetime, n: int) -> list[datetime]:
    """Quantum's day rule through cronsim: fire times of the expression with the weekday
    field unrestricted, kept when the date also matches the weekday field alone."""
    fields = expr.split()
    dom_only = " ".join([*fields[:-1], "*"])
    dow_only = " ".join([*fields[:-3], "*", *fields[-2:]])
    out: list[datetime] = []
    try:
        it = CronSim(in_cronsim_syntax(dom_only), start.replace(tzinfo=None))
    except CronSimError:
        return out
    horizon = start.year + 50
    for t in it:  # bounded by the horizon: dates only increase
        if t.year > horizon or len(out) == n:
            break
        probe = next(CronSim(in_cronsim_syntax(dow_only), t - timedelta(seconds=1)))
        if probe == t:
            out.append(t.replace(tzinfo=UTC))
    return out


def test_quantum_day_match_ands_the_day_fields() -> None:
    """day_match="and" against cronsim's own field matching, for every pair of restricted
    day fields that do not start with '*' (the only pairs where the two rules differ)."""
    pairs = [
        (dom, dow)
        for dom, dow in itertools.product(DOMS, DOWS)
        if not dom.startswith("*") and not dow.startswith("*")
    ]
    bad: list[str] = []
    compared = 0
    for dom, dow in pairs:
        expr = f"0 0 {dom} * {dow}"
        expected = quantum_and(expr, STARTS[0], 3)
        try:
            schedule = CronSchedule.parse(expr, day_match="and")
        except CronError:
            if expected:
                bad.append(f"{expr}: shoal rejects, cronsim's AND fires {expected[0]}")
            continue
        for start in STARTS[:3]:
            compared += 1
            expected = quantum_and(expr, start, 3)
            ours = shoal_walk(schedule, start, len(expected) or 1)
            if ours != expected:
                bad.append(f"{expr} from {start}: shoal {ours} cronsim AND {expected}")
    print(f"\ncron differential (day_match='and'): {len(pairs)} pairs, {compared} walks")
    assert compared >= 150
    assert not bad, "\n".join(bad[:20])


def dst_starts(zone: ZoneInfo) -> list[datetime]:
    """Start times from 3 hours before to 1 hour after each change of 2025 and 2026, every
    20 minutes, in UTC."""
    out: list[datetime] = []
    for year in (2025, 2026):
        t = datetime(year, 1, 1, tzinfo=UTC)
        end = datetime(year + 1, 1, 1, tzinfo=UTC)
        while t < end:  # find the changes, day by day, then hour by hour
            nxt = t + timedelta(days=1)
            if t.astimezone(zone).utcoffset() != nxt.astimezone(zone).utcoffset():
                h = t
                while h.astimezone(zone).utcoffset() == t.astimezone(zone).utcoffset():
                    h += timedelta(hours=1)
                out.extend(h + timedelta(minutes=m) for m in range(-180, 61, 20))
            t = nxt
    return out


DST_TIMES = ["0 0", "30 2", "0,30 2", "*/15 2", "0 *", "*/20 *", "0 1-3", "15 5 2", "0 0 */2"]
DST_DAYS = [("*", "*"), ("*/2", "*"), ("1-31", "SUN"), ("*", "SUN"), ("L", "*")]


def cronsim_class_is_wall(expr: str) -> bool:
    """cronsim's own rule for its Debian-cron DST fix-ups (see KNOWN['dst-class'])."""
    fields = expr.split()
    return len(fields) == 5 and not fields[0].startswith("*") and not fields[1].startswith("*")


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "America/New_York"])
def test_across_dst_changes_only_documented_policy_differences(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    starts = dst_starts(zone)
    exprs = [f"{t} {dom} * {dow}" for t in DST_TIMES for dom, dow in DST_DAYS]
    reasons: Counter[str] = Counter()
    bad: list[str] = []
    compared = 0
    for expr in exprs:
        schedule = CronSchedule.parse(expr, zone)
        for start in starts:
            compared += 1
            local = start.astimezone(zone)
            try:
                theirs = [
                    t.astimezone(UTC)
                    for t in itertools.islice(CronSim(in_cronsim_syntax(expr), local), 3)
                ]
            except CronSimError:
                bad.append(f"{expr}: cronsim rejects")
                break
            ours = shoal_walk(schedule, start, 3)
            if ours == theirs:
                continue
            if theirs and theirs[0] <= start and theirs[1:] == ours[:2]:
                reasons["cronsim-before-start"] += 1
            elif cronsim_class_is_wall(expr) != (not schedule.is_interval):
                reasons["dst-class"] += 1
            else:
                bad.append(f"{expr} from {local}: shoal {ours} cronsim {theirs}")
    print(
        f"\ncron differential ({zone_name} DST): {len(exprs)} expressions x {len(starts)} "
        f"start times, {compared} walks of 3, known policy differences {dict(reasons)}, "
        f"unexplained {len(bad)}"
    )
    assert set(reasons) <= set(KNOWN)
    assert not bad, "\n".join(bad[:20])
