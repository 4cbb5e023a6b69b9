"""Prometheus metrics for a node: membership, messaging, singletons and jobs.

Two halves, so the hot paths never depend on prometheus-client:

- :class:`MeshStats` is plain integers that the mesh bumps as frames go in and out
  (an attribute increment per frame), plus handshake failures by reason;
- :class:`NodeMetrics` (needs the ``shoal[metrics]`` extra) reads those at scrape time
  through a collector, and subscribes to the node's events and hooks for the rest:
  membership events, the scheduler's run/miss/skip hooks, and call latencies.

    metrics = NodeMetrics(node)            # once, before or after node.start()
    body, content_type = metrics.render()  # for GET /metrics

Each node gets its own registry, so several nodes in one process do not collide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from shoal.mesh import MembershipEvent
    from shoal.node import Node
    from shoal.scheduler import Job, RunResult

__all__ = ["HANDSHAKE_REASONS", "MeshStats", "NodeMetrics", "handshake_reason"]

#: The bounded set of ``reason`` labels of ``shoal_handshake_failures_total``.
HANDSHAKE_REASONS = ("cookie", "timeout", "tls", "rejected", "version", "refused", "protocol")
MISSED_COUNT_CAP = 100_000  # ticks counted per gap; a longer gap counts as this many

CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOB_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30, 300)


def handshake_reason(text: str) -> str:
    """Map a handshake failure's message to one of :data:`HANDSHAKE_REASONS`."""
    lowered = text.lower()
    if "cookie" in lowered or "proof" in lowered:
        return "cookie"
    if "in time" in lowered or "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "tls" in lowered or "ssl" in lowered:
        return "tls"
    if "too many handshakes" in lowered:
        return "refused"
    if "version" in lowered:
        return "version"
    if "rejected" in lowered:
        return "rejected"
    return "protocol"


class MeshStats:
    """Counters the mesh keeps whether or not metrics are exported (cheap increments)."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "frames_received",
        "frames_sent",
        "handshake_failures",
    )

    def __init__(self) -> None:
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_received = 0
        self.bytes_received = 0
        self.handshake_failures: Counter[str] = Counter()

    def handshake_failed(self, why: str) -> None:
        self.handshake_failures[handshake_reason(why)] += 1


class NodeMetrics:
    """Prometheus metrics of one node, in their own registry (several may watch one node)."""

    def __init__(self, node: Node) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise ImportError(
                "NodeMetrics needs prometheus-client: pip install 'shoal[metrics]'"
            ) from None
        # Here, not at the top: this module loads with every node, the scheduler only
        # with the first use of jobs (see tests/api/test_import_time.py).
        from shoal.scheduler import add_hook

        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        Gauge("shoal_nodes", "Connected peers.", registry=reg).set_function(
            lambda: len(node.nodes())
        )
        self._node_up = Counter("shoal_node_up", "Peers that came up.", registry=reg)
        self._node_down = Counter(
            "shoal_node_down", "Peers that went down, by reason.", ["reason"], registry=reg
        )
        self._calls = Histogram(
            "shoal_call_duration_seconds",
            "Round trip of node.call() to another node, replies and errors alike.",
            registry=reg,
            buckets=CALL_BUCKETS,
        )
        self._runs = Counter(
            "shoal_job_runs", "Job runs on this node, by outcome.", ["job", "status"], registry=reg
        )
        self._duration = Histogram(
            "shoal_job_duration_seconds",
            "How long job runs took on this node.",
            ["job"],
            registry=reg,
            buckets=JOB_BUCKETS,
        )
        self._lateness = Histogram(
            "shoal_job_lateness_seconds",
            "From a job's tick to the start of its run on this node.",
            ["job"],
            registry=reg,
            buckets=LATENESS_BUCKETS,
        )
        self._missed = Counter(
            "shoal_job_missed_ticks",
            "Ticks not started on time (leader gap, stopped cluster, blocked loop).",
            ["job"],
            registry=reg,
        )
        self._skipped = Counter(
            "shoal_job_skipped_ticks",
            "Ticks never run: misfire policy, or a previous run still running (overlap).",
            ["job", "reason"],
            registry=reg,
        )
        reg.register(cast("Collector", _ScrapeTimeCollector(node)))
        node.add_listener(self._on_membership)
        node.messaging.call_observer = add_hook(node.messaging.call_observer, self._calls.observe)
        scheduler = self._scheduler = node.scheduler
        scheduler.on_tick_missed = add_hook(scheduler.on_tick_missed, self._on_missed)
        scheduler.on_tick_skipped = add_hook(scheduler.on_tick_skipped, self._on_skipped)
        scheduler.on_job_stop = add_hook(scheduler.on_job_stop, self._on_job_stop)
        scheduler.on_job_deleted = add_hook(scheduler.on_job_deleted, self._on_job_deleted)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # hooks -------------------------------------------------------------------
    def _on_membership(self, event: MembershipEvent) -> None:
        if event.kind == "up":
            self._node_up.inc()
        elif event.kind == "down":
            self._node_down.labels(event.reason or "unknown").inc()

    def _on_job_stop(self, job: Job, result: RunResult) -> None:
        if job.name not in self._scheduler:  # deleted while it ran: its series are gone
            return
        self._runs.labels(job.name, result.status).inc()
        self._duration.labels(job.name).observe(max(0.0, result.duration))
        self._lateness.labels(job.name).observe(max(0.0, result.lateness))

    def _on_job_deleted(self, job: Job) -> None:
        """Drop a deleted job's series: run-time jobs with ever-new names would otherwise
        add series for good. A run of it that ends later is not counted."""
        for metric in (self._runs, self._duration, self._lateness, self._missed, self._skipped):
            metric.remove_by_labels({"job": job.name})

    def _on_missed(self, job: Job, first: datetime, last: datetime, outcome: str) -> None:
        """Ticks first..last were due while nothing ran them; see Scheduler.on_tick_missed."""
        due = _count_ticks(job, first, last)
        missed = due - 1 if outcome == "on_time" else due  # the last one ran on time
        skipped = due if outcome == "skip" else due - 1
        if missed > 0:
            self._missed.labels(job.name).inc(missed)
        if skipped > 0:
            self._skipped.labels(job.name, "misfire").inc(skipped)

    def _on_skipped(self, job: Job, tick: datetime, reason: str) -> None:
        self._skipped.labels(job.name, reason).inc()


def _count_ticks(job: Job, first: datetime, last: datetime) -> int:
    """Fire times in [first, last], walked one by one up to MISSED_COUNT_CAP."""
    count, t = 1, first
    while count < MISSED_COUNT_CAP:
        nxt = job.schedule.next_after(t)
        if nxt is None or nxt > last:
            break
        count, t = count + 1, nxt
    return count


class _ScrapeTimeCollector:
    """Reads what is cheaper to read than to count: mesh counters and singleton state."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        node = self.node
        stats = node.mesh.stats if node.mesh is not None else MeshStats()
        for name, doc, value in (
            ("shoal_messages_sent", "Frames sent to peers.", stats.frames_sent),
            ("shoal_messages_received", "Frames received from peers.", stats.frames_received),
            ("shoal_bytes_sent", "Bytes of frames sent to peers.", stats.bytes_sent),
            ("shoal_bytes_received", "Bytes received from peers.", stats.bytes_received),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        failures = CounterMetricFamily(
            "shoal_handshake_failures", "Failed mesh handshakes, by reason.", labels=["reason"]
        )
        for reason in HANDSHAKE_REASONS:
            failures.add_metric([reason], stats.handshake_failures.get(reason, 0))
        yield failures
        holder = GaugeMetricFamily(
            "shoal_singleton_holder",
            "1 for the node this node sees holding each singleton.",
            labels=["singleton", "node"],
        )
        mine = GaugeMetricFamily(
            "shoal_singleton_held", "1 if this node runs the singleton.", labels=["singleton"]
        )
        takeovers = CounterMetricFamily(
            "shoal_singleton_takeovers",
            "Times this node started each singleton.",
            labels=["singleton"],
        )
        singletons = node.singletons
        for name, held_by in sorted(singletons.holders().items()):
            holder.add_metric([name, held_by or ""], 1 if held_by else 0)
            mine.add_metric([name], 1 if singletons.is_holder(name) else 0)
            takeovers.add_metric([name], singletons.starts(name))
        yield holder
        yield mine
        yield takeovers
