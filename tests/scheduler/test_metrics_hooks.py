"""The scheduler's metric hooks, counted by shoal.metrics: missed, skipped and run ticks.

A real Scheduler (the one of an unstarted Node) leads from a shared state whose last tick
lies four ticks in the past, under each misfire policy; the /metrics end-to-end test with
real nodes is tests/app/test_metrics.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal import Node, Settings
from shoal.metrics import NodeMetrics, handshake_reason
from shoal.scheduler import JobState, Misfire
from tests.support.hi import COOKIE
from tests.support.procs import async_wait_until


def sample(metrics: NodeMetrics, name: str, **labels: str) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.mark.parametrize(("misfire", "runs", "skipped"), [("skip", 0, 4), ("run_once", 1, 3)])
async def test_missed_ticks_are_counted_by_policy(
    misfire: Misfire, runs: int, skipped: int
) -> None:
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", port=1, topology="static"))
    metrics = NodeMetrics(node)
    # A second registry on the same node (another exporter): before, it took the missed
    # and skipped hooks over, and the first one stopped counting them.
    other = NodeMetrics(node)
    scheduler = node.scheduler
    scheduler.dispatcher = None  # run here: the node is not started, so holds no singleton
    # Every minute at a second that passed ~30 s ago: the newest missed tick is ~30 s old,
    # well beyond the misfire grace, and the next one is ~30 s away.
    target = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    scheduler.add_job(f"{target.second} * * * * *", lambda: None, name="j", misfire=misfire)
    await scheduler.start()
    try:
        last_tick = target - timedelta(minutes=4)  # ticks at -3, -2, -1, 0 minutes missed
        scheduler.start_leading({"j": JobState(last_tick=last_tick)})
        await async_wait_until(
            lambda: sample(metrics, "shoal_job_missed_ticks_total", job="j") > 0, 5.0
        )
        if runs:
            await async_wait_until(
                lambda: sample(metrics, "shoal_job_runs_total", job="j", status="ok") >= runs, 5.0
            )
    finally:
        await scheduler.stop(drain_timeout=0.5)
    for each in (metrics, other):
        assert sample(each, "shoal_job_missed_ticks_total", job="j") == 4
        assert sample(each, "shoal_job_skipped_ticks_total", job="j", reason="misfire") == skipped
        assert sample(each, "shoal_job_runs_total", job="j", status="ok") == runs
        assert sample(each, "shoal_job_lateness_seconds_count", job="j") == runs
    if runs:
        assert sample(metrics, "shoal_job_lateness_seconds_sum", job="j") >= 29


def test_handshake_failure_reasons_are_a_bounded_set() -> None:
    assert handshake_reason("dialer's cookie proof is wrong (different RELEASE_COOKIE?)") == (
        "cookie"
    )
    assert handshake_reason("rejected: cookie") == "cookie"
    assert handshake_reason("handshake did not finish in time") == "timeout"
    assert handshake_reason("TLS handshake failed: bad cert") == "tls"
    assert handshake_reason("unsupported protocol version 9") == "version"
    assert handshake_reason("expected HELLO") == "protocol"
    assert handshake_reason("rejected: wrong node") == "rejected"


async def test_a_tick_skipped_for_overlap_is_counted_with_its_reason() -> None:
    """overlap=False: a tick due while the previous run still runs is not run, and
    shoal_job_skipped_ticks_total{reason="overlap"} counts it."""
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", port=1, topology="static"))
    metrics = NodeMetrics(node)
    scheduler = node.scheduler
    scheduler.dispatcher = None
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()

    scheduler.add_job("* * * * * *", slow, name="slow", run_strategy="local")
    await scheduler.start()
    try:
        await async_wait_until(
            lambda: (
                sample(metrics, "shoal_job_skipped_ticks_total", job="slow", reason="overlap") >= 1
            ),
            5.0,
            message="an overlap skip counted",
        )
        assert sample(metrics, "shoal_job_runs_total", job="slow", status="ok") == 0
        release.set()
        await async_wait_until(
            lambda: sample(metrics, "shoal_job_runs_total", job="slow", status="ok") >= 1, 5.0
        )
    finally:
        release.set()
        await scheduler.stop(drain_timeout=0.5)
    assert sample(metrics, "shoal_job_skipped_ticks_total", job="slow", reason="misfire") == 0


async def test_a_deleted_jobs_series_are_dropped_and_other_jobs_keep_theirs() -> None:
    """Run-time jobs with ever-new names (one per customer, say) must not add series for
    good: deleting a job drops every series labelled with it, even of a run in flight."""
    node = Node(Settings(cookie=COOKIE, host="127.0.0.1", port=1, topology="static"))
    metrics = NodeMetrics(node)
    other = NodeMetrics(node)  # another registry on the node drops them too
    scheduler = node.scheduler
    scheduler.dispatcher = None
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        started.set()
        await release.wait()

    for name in ("kept", "gone", "gone-while-running"):
        scheduler.add_job("0 0 1 1 *", lambda: None, name=name)
    await scheduler.start()
    try:
        await scheduler.run_now("kept")
        await scheduler.run_now("gone")
        assert sample(metrics, "shoal_job_runs_total", job="gone", status="ok") == 1
        scheduler.delete_job("gone")
        for each in (metrics, other):
            assert 'job="gone"' not in each.render()[0].decode()
        assert sample(metrics, "shoal_job_runs_total", job="kept", status="ok") == 1
        assert sample(metrics, "shoal_job_duration_seconds_count", job="kept") == 1
        # A run that ends after its job was deleted adds no series back.
        scheduler.delete_job("gone-while-running")
        scheduler.add_job("0 0 1 1 *", slow, name="gone-while-running")
        running = asyncio.ensure_future(scheduler.run_now("gone-while-running"))
        await asyncio.wait_for(started.wait(), 5.0)
        scheduler.delete_job("gone-while-running")
        release.set()
        assert (await running).status == "ok"
        assert "gone-while-running" not in metrics.render()[0].decode()
    finally:
        release.set()
        await scheduler.stop(drain_timeout=0.5)
