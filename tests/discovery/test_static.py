"""Static discovery proposes SHOAL_HOSTS (same basename, not ourselves), again and again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.config import Peer, Settings, parse_hosts
from shoal.discovery import strategy_for
from shoal.discovery.static import StaticStrategy
from shoal.ratelimit import RateLimitedLog
from tests.discovery.conftest import Rounds
from tests.support.procs import async_wait_until


def settings(hosts: str, **overrides: object) -> Settings:
    base = Settings(
        cookie="discovery-test-cookie-6b1f0e3a9c2d4e87",
        basename="hi",
        name_query="hi",
        host="127.0.0.2",
        topology="static",
        polling_interval=0.05,
    )
    return base.with_overrides(hosts=parse_hosts(hosts, "hi", base.port), **overrides)


async def test_proposes_listed_peers_with_our_basename_but_not_ourselves() -> None:
    s = settings("hi@127.0.0.2, hi@127.0.0.3, 127.0.0.4:4999, other@127.0.0.5, hi@127.0.0.3")
    rounds = Rounds()
    task = asyncio.create_task(StaticStrategy(s).run(rounds))
    try:
        await async_wait_until(lambda: len(rounds.rounds) >= 1, timeout=2)
    finally:
        task.cancel()
    assert rounds.rounds[0] == [Peer("hi", "127.0.0.3", 4370), Peer("hi", "127.0.0.4", 4999)]


async def test_reproposes_every_polling_interval_so_restarted_peers_are_redialled() -> None:
    rounds = Rounds()
    task = asyncio.create_task(StaticStrategy(settings("127.0.0.3")).run(rounds))
    try:
        await async_wait_until(lambda: len(rounds.rounds) >= 3, timeout=2)
    finally:
        task.cancel()
    assert all(r == [Peer("hi", "127.0.0.3", 4370)] for r in rounds.rounds)


async def test_same_host_other_port_is_another_node() -> None:
    s = settings("127.0.0.2:4371")
    assert StaticStrategy(s).peers == (Peer("hi", "127.0.0.2", 4371),)


async def test_no_hosts_still_completes_rounds() -> None:
    rounds = Rounds()
    task = asyncio.create_task(StaticStrategy(settings("")).run(rounds))
    try:
        await async_wait_until(lambda: len(rounds.rounds) >= 1, timeout=2)
    finally:
        task.cancel()
    assert rounds.rounds[0] == []


def test_selected_by_topology_type() -> None:
    assert isinstance(strategy_for(settings("127.0.0.3")), StaticStrategy)


def test_rate_limited_log_warns_once_per_period_and_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    problems = RateLimitedLog(logging.getLogger("test.ratelimit"), period=30, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="test.ratelimit")
    for second in range(61):
        now[0] = float(second)
        problems.problem("timeout", "lookup failed: %s", f"detail {second}")
    problems.problem("servfail", "lookup failed: %s", "servfail")
    problems.recovered("ok again")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert levels == [
        ("WARNING", "lookup failed: detail 0"),
        ("WARNING", "lookup failed: detail 30 (failed 31 time(s) in a row)"),
        ("WARNING", "lookup failed: detail 60 (failed 61 time(s) in a row)"),
        ("WARNING", "lookup failed: servfail (failed 62 time(s) in a row)"),
        ("INFO", "ok again (after 62 failed round(s))"),
    ]


def test_two_nodes_per_host_make_each_host_entry_both_ports() -> None:
    """The smallest range (SHOAL_NODES_PER_HOST=2) expands too, not only larger ones."""
    s = settings("hi@127.0.0.3, hi@127.0.0.4:4999", nodes_per_host=2)
    assert [(p.name, p.port) for p in StaticStrategy(s).peers] == [
        ("hi@127.0.0.3", 4370),
        ("hi@127.0.0.3:4371", 4371),
        ("hi@127.0.0.4", 4999),  # an explicit port outside the range: that node only
    ]
