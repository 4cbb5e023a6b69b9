"""CronSchedule: Quantum syntax, aliases, errors at definition time, the DST policy by example."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from shoal.cron import ALIASES, CronError, CronSchedule

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def fires(expr: str, tz: str, start: datetime, n: int) -> list[str]:
    """The next ``n`` fire times after ``start``, as ISO strings with their offsets."""
    schedule = CronSchedule.parse(expr, tz)
    out: list[str] = []
    t: datetime | None = start
    for _ in range(n):
        assert t is not None
        t = schedule.next_after(t)
        assert t is not None
        assert t.tzinfo is UTC
        out.append(t.astimezone(schedule.tz).isoformat())
    return out


# -- syntax ---------------------------------------------------------------------------------


def test_five_fields_are_minute_resolution() -> None:
    start = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    assert fires("*/15 * * * *", "UTC", start, 3) == [
        "2024-05-01T12:15:00+00:00",
        "2024-05-01T12:30:00+00:00",
        "2024-05-01T12:45:00+00:00",
    ]


def test_six_fields_put_seconds_first() -> None:
    start = datetime(2024, 5, 1, 12, 0, 3, 500_000, tzinfo=UTC)
    assert fires("*/5 * * * * *", "UTC", start, 2) == [
        "2024-05-01T12:00:05+00:00",
        "2024-05-01T12:00:10+00:00",
    ]
    assert fires("30 15 10 * * *", "UTC", start, 1) == ["2024-05-02T10:15:30+00:00"]


def test_seven_fields_end_with_a_year() -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    assert fires("0 0 12 * * * 2030", "UTC", start, 2) == [
        "2030-01-01T12:00:00+00:00",
        "2030-01-02T12:00:00+00:00",
    ]
    one_year = CronSchedule.parse("0 0 12 1 JAN * 2030")
    first = one_year.next_after(start)
    assert first == datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert one_year.next_after(first) is None  # the year is over: no more fire times


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("0 9 * JAN-MAR MON", "2025-01-06T09:00:00+00:00"),  # names and ranges
        ("0 9 1,15 * *", "2025-01-01T09:00:00+00:00"),  # lists
        ("0 0 L * *", "2025-01-31T00:00:00+00:00"),  # last day of the month
        ("0 0 * * 5#3", "2025-01-17T00:00:00+00:00"),  # third Friday
        ("0 0 * * L5", "2025-01-31T00:00:00+00:00"),  # last Friday
        ("0 0 15W * *", "2025-01-15T00:00:00+00:00"),  # nearest weekday to the 15th
        ("0 0 * * 7", "2025-01-05T00:00:00+00:00"),  # 7 is Sunday too
        ("0 0 * * 5L", "2025-01-31T00:00:00+00:00"),  # last Friday, Quantum's form
        ("0 0 * * FRIL", "2025-01-31T00:00:00+00:00"),  # last Friday, by name
        ("0 0 * * MON#2", "2025-01-13T00:00:00+00:00"),  # second Monday
    ],
)
def test_names_lists_and_special_characters(expr: str, expected: str) -> None:
    start = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert fires(expr, "UTC", start, 1) == [expected]
    in_croniter_syntax = expr.replace("FRIL", "L5").replace("5L", "L5")
    reference = croniter(in_croniter_syntax, start, ret_type=datetime).get_next()
    assert reference.isoformat() == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("0 0 LW * *", ["2025-05-30", "2025-06-30", "2025-07-31", "2025-08-29"]),
        ("0 0 L * *", ["2025-05-31", "2025-06-30", "2025-07-31", "2025-08-31"]),
        ("0 0 1W * *", ["2025-06-02", "2025-07-01", "2025-08-01", "2025-09-01"]),  # Sun -> Mon
        ("0 0 31W * *", ["2025-05-30", "2025-06-30", "2025-07-31", "2025-08-29"]),  # clamps
        ("0 0 15W * *", ["2025-05-15", "2025-06-16", "2025-07-15", "2025-08-15"]),  # Sun -> Mon
    ],
)
def test_weekday_forms_of_the_day_of_month(expr: str, expected: list[str]) -> None:
    """Quantum's W forms: the weekday nearest a day, never leaving the month."""
    start = datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert [f[:10] for f in fires(expr, "UTC", start, 4)] == expected


def test_day_fields_combine_as_crontab_by_default_and_as_quantum_when_asked() -> None:
    start = datetime(2024, 1, 1, 12, tzinfo=UTC)  # a Monday
    # both restricted: crontab ORs them (the 15th, or any Monday)
    assert [f[:10] for f in fires("0 0 15 * MON", "UTC", start, 3)] == [
        "2024-01-08",
        "2024-01-15",
        "2024-01-22",
    ]
    # a '*'-prefixed field counts as unrestricted: odd days that are Mondays
    assert [f[:10] for f in fires("0 0 */2 * MON", "UTC", start, 3)] == [
        "2024-01-15",
        "2024-01-29",
        "2024-02-05",
    ]
    quantum = CronSchedule.parse("0 0 15 * MON", "UTC", day_match="and")
    t: datetime | None = start
    got = []
    for _ in range(2):
        assert t is not None
        t = quantum.next_after(t)
        got.append(t)
    assert got == [datetime(2024, 1, 15, tzinfo=UTC), datetime(2024, 4, 15, tzinfo=UTC)]
    assert quantum.day_match == "and" and quantum != CronSchedule.parse("0 0 15 * MON")
    with pytest.raises(CronError, match="day_match"):
        CronSchedule.parse("* * * * *", day_match="or")  # type: ignore[arg-type]


# The next three fire times after Thursday 2024-02-29 13:14:15 UTC, worked out by hand
# (not from the alias table, so a wrong table entry fails here).
ALIAS_FIRES = {
    "@yearly": ["2025-01-01T00:00:00", "2026-01-01T00:00:00", "2027-01-01T00:00:00"],
    "@annually": ["2025-01-01T00:00:00", "2026-01-01T00:00:00", "2027-01-01T00:00:00"],
    "@monthly": ["2024-03-01T00:00:00", "2024-04-01T00:00:00", "2024-05-01T00:00:00"],
    "@weekly": ["2024-03-03T00:00:00", "2024-03-10T00:00:00", "2024-03-17T00:00:00"],  # Sundays
    "@daily": ["2024-03-01T00:00:00", "2024-03-02T00:00:00", "2024-03-03T00:00:00"],
    "@midnight": ["2024-03-01T00:00:00", "2024-03-02T00:00:00", "2024-03-03T00:00:00"],
    "@hourly": ["2024-02-29T14:00:00", "2024-02-29T15:00:00", "2024-02-29T16:00:00"],
    "@minutely": ["2024-02-29T13:15:00", "2024-02-29T13:16:00", "2024-02-29T13:17:00"],
    "@secondly": ["2024-02-29T13:14:16", "2024-02-29T13:14:17", "2024-02-29T13:14:18"],
}


def test_every_alias_has_an_expectation() -> None:
    assert set(ALIAS_FIRES) == set(ALIASES)


@pytest.mark.parametrize("alias", sorted(ALIAS_FIRES))
def test_aliases_mean_their_expression(alias: str) -> None:
    start = datetime(2024, 2, 29, 13, 14, 15, tzinfo=UTC)
    schedule = CronSchedule.parse(alias.upper())
    got: list[str] = []
    t: datetime | None = start
    for _ in range(3):
        assert t is not None
        t = schedule.next_after(t)
        assert t is not None
        got.append(t.isoformat())
    assert got == [f"{iso}+00:00" for iso in ALIAS_FIRES[alias]]
    assert str(schedule) == alias


def test_secondly_and_minutely() -> None:
    start = datetime(2024, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)
    assert CronSchedule.parse("@secondly").next_after(start) == start.replace(
        second=1, microsecond=0
    )
    assert CronSchedule.parse("@minutely").next_after(start) == start.replace(
        minute=1, microsecond=0
    )


def test_reboot_has_no_clock_times() -> None:
    reboot = CronSchedule.parse("@reboot", "Europe/Berlin")
    assert reboot.is_reboot
    assert reboot.next_after(datetime.now(UTC)) is None
    assert str(reboot) == "@reboot"


def test_identity_and_text() -> None:
    a = CronSchedule.parse("  */5   * * * * * ", "Europe/Berlin")
    assert str(a) == "*/5 * * * * *"
    assert repr(a) == "CronSchedule('*/5 * * * * *', tz='Europe/Berlin')"
    assert a == CronSchedule.parse("*/5 * * * * *", BERLIN)
    assert a != CronSchedule.parse("*/5 * * * * *", "UTC")
    assert a.has_seconds and a.is_interval
    assert not CronSchedule.parse("0 3 * * *").is_interval


def test_results_are_utc_and_any_zone_is_accepted() -> None:
    schedule = CronSchedule.parse("0 0 9 * * *", "Europe/Berlin")
    start = datetime(2024, 6, 1, 12, tzinfo=ZoneInfo("Asia/Tokyo"))  # 05:00 Berlin
    result = schedule.next_after(start)
    assert result == datetime(2024, 6, 1, 9, tzinfo=BERLIN)
    assert result is not None and result.tzinfo is UTC


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        CronSchedule.parse("* * * * *").next_after(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("expr", "zone"),
    [("* * * * * *", "UTC"), ("0 0 * * *", "Asia/Tokyo"), ("*/7 * * * *", "Europe/Paris")],
)
def test_the_end_of_datetimes_range_has_no_fire_time_and_raises_nothing(
    expr: str, zone: str
) -> None:
    """A bogus far-future `last_tick` (a corrupt stored state) must not crash a ticker."""
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert CronSchedule.parse(expr, zone).next_after(last) is None
    assert CronSchedule.parse(expr, zone).latest_in(last - timedelta(days=1), last) is None


def test_latest_in_finds_the_newest_tick_of_a_gap() -> None:
    schedule = CronSchedule.parse("0 0 3 * * *", "Europe/Berlin")
    after = datetime(2024, 1, 1, tzinfo=UTC)
    until = datetime(2024, 7, 10, 12, tzinfo=UTC)
    assert schedule.latest_in(after, until) == datetime(2024, 7, 10, 1, tzinfo=UTC)
    assert schedule.latest_in(until - timedelta(hours=1), until) is None


# -- errors at definition time --------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("", "empty"),
        ("* * * *", "expected 5 fields"),
        ("* * * * * * * *", "got 8"),
        ("60 * * * *", "out of range"),
        ("* 24 * * *", "out of range"),
        ("*/0 * * * *", "step '0'"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 5-2 * *", "runs backwards"),
        ("0 0 * * MON#6", "#1 to #5"),
        ("0 0 32W * *", "out of range"),
        ("0 0 * * 8L", "out of range"),
        ("0 0 0 1 1 * 2001", "never fires"),
        ("@fortnightly", "unknown alias"),
        ("H * * * *", "hashed/random"),
        ("R 0 * * *", "hashed/random"),
        ("H/5 * * * *", "hashed/random"),
        ("0 H(0-5) * * *", "hashed/random"),
        ("0 0 * * * R/2", "hashed/random"),
        ("* * * FOO *", "not acceptable"),
        ("a b c d e", "not acceptable"),
    ],
)
def test_bad_expressions_fail_with_a_clear_message(expr: str, problem: str) -> None:
    with pytest.raises(CronError) as caught:
        CronSchedule.parse(expr)
    message = str(caught.value)
    assert problem in message
    if expr.strip():
        assert repr(" ".join(expr.split())) in message  # names the expression


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe/Berlinn", "../etc/passwd", ""])
def test_unknown_time_zones_fail_with_a_clear_message(zone: str) -> None:
    with pytest.raises(CronError, match="time zone") as caught:
        CronSchedule.parse("*/5 * * * * *", zone)
    assert "'*/5 * * * * *'" in str(caught.value)


def test_cron_error_is_a_value_error() -> None:
    assert issubclass(CronError, ValueError)
    with pytest.raises(CronError, match="must be a string"):
        CronSchedule.parse(5)  # type: ignore[arg-type]


# -- DST policy, by example -----------------------------------------------------------------


def test_berlin_spring_gap_wall_clock_fires_once_at_gap_end() -> None:
    # 2024-03-31: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    start = datetime(2024, 3, 30, 12, tzinfo=BERLIN)
    assert fires("30 2 * * *", "Europe/Berlin", start, 2) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
    ]


def test_several_gap_times_collapse_into_one_firing() -> None:
    start = datetime(2024, 3, 31, 1, 0, tzinfo=BERLIN)
    assert fires("*/15 2,3 * * *", "Europe/Berlin", start, 3) == [
        "2024-03-31T03:00:00+02:00",  # 02:00, 02:15, 02:30, 02:45 and 03:00 together
        "2024-03-31T03:15:00+02:00",
        "2024-03-31T03:30:00+02:00",
    ]


def test_berlin_fall_repeat_wall_clock_fires_once_at_first_occurrence() -> None:
    # 2024-10-27: 03:00 CEST falls back to 02:00 CET; 02:00-02:59 happens twice.
    start = datetime(2024, 10, 26, 12, tzinfo=BERLIN)
    assert fires("30 2 * * *", "Europe/Berlin", start, 2) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]
    # Starting inside the second pass does not fire the repeated times again.
    second_pass = datetime(2024, 10, 27, 1, 10, tzinfo=UTC)  # 02:10 CET
    assert fires("*/15 2 * * *", "Europe/Berlin", second_pass, 1) == ["2024-10-28T02:00:00+01:00"]


def test_new_york_gap_and_repeat() -> None:
    # 2024-03-10 02:00 EST -> 03:00 EDT; 2024-11-03 02:00 EDT -> 01:00 EST.
    assert fires(
        "30 2 * * *", "America/New_York", datetime(2024, 3, 9, 12, tzinfo=NEW_YORK), 2
    ) == ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]
    assert fires(
        "30 1 * * *", "America/New_York", datetime(2024, 11, 2, 12, tzinfo=NEW_YORK), 2
    ) == ["2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]


def test_interval_schedules_follow_elapsed_time_across_the_gap() -> None:
    start = datetime(2024, 3, 31, 1, 59, 50, tzinfo=BERLIN)
    times = fires("*/5 * * * * *", "Europe/Berlin", start, 3)
    assert times == [
        "2024-03-31T01:59:55+01:00",
        "2024-03-31T03:00:00+02:00",  # five real seconds later
        "2024-03-31T03:00:05+02:00",
    ]


def test_interval_schedules_run_through_both_passes_of_a_repeat() -> None:
    start = datetime(2024, 10, 27, 0, 59, 50, tzinfo=UTC)  # 02:59:50 CEST
    assert fires("*/5 * * * * *", "Europe/Berlin", start, 3) == [
        "2024-10-27T02:59:55+02:00",
        "2024-10-27T02:00:00+01:00",  # five real seconds later, second pass
        "2024-10-27T02:00:05+01:00",
    ]
    hourly = fires(
        "0 * * * *", "America/New_York", datetime(2024, 11, 3, 0, 30, tzinfo=NEW_YORK), 3
    )
    assert hourly == [
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:00:00-05:00",
        "2024-11-03T02:00:00-05:00",
    ]


@pytest.fixture
def far_local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set far from UTC (CI machines run in UTC, which would
    hide a conversion that uses the local zone where UTC is meant)."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14, no DST
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_results_do_not_depend_on_the_machines_local_zone(far_local_zone: None, zone: str) -> None:
    # Around the spring-forward and fall-back changes of 2025 in both zones, and a plain day.
    for start in (
        "2025-03-09T06:30:00",
        "2025-03-30T00:30:00",
        "2025-10-26T00:30:00",
        "2025-11-02T05:30:00",
        "2025-06-01T12:00:00",
    ):
        at = datetime.fromisoformat(start).replace(tzinfo=UTC)
        for expr in ("*/20 * * * * *", "0 30 * * * *", "0 0 2 * * *", "0 15 1,2,3 * * *"):
            schedule = CronSchedule.parse(expr, zone)
            got = schedule.next_after(at)
            assert got is not None and got.tzinfo is UTC
            wall = croniter(expr, at.astimezone(ZoneInfo(zone)), second_at_beginning=True)
            if zone == "UTC":
                assert got == wall.get_next(datetime)
            later = at + timedelta(hours=30)
            latest = schedule.latest_in(at, later)
            assert latest is not None and at < latest <= later
            following = schedule.next_after(latest)
            assert following is not None and following > later
