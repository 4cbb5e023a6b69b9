"""Singleton and scheduler figures on real `hi` processes (not part of the test run).

    .venv/bin/python bench/singletons.py [--ticks 60] [--rounds 5]

Prints: failover after SIGKILL of the holder (mesh mode), takeover after a
silent partition (quorum mode, default timings, network namespaces, needs
root), graceful handover gap on SIGTERM, tick lateness p50/p99 (mesh mode,
and quorum mode with its per-tick majority confirmation, whose own latency is
printed too), and failover after SIGKILL in quorum mode. Times
come from the nodes' own millisecond log stamps and this process's clock,
which is the same clock.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import job_log
from tests.support.hi import HiNode, NetnsHiNode, hosts_list
from tests.support.netns import Network, netns_unavailable_reason
from tests.support.procs import Procs, wait_until

SCHEDULER = "shoal.scheduler"
STOPPING = re.compile(rf"^{job_log.STAMP} .*singleton shoal\.scheduler: stopping on (\S+)")


def seconds_of_day(at: float | None = None) -> float:
    stamp = datetime.fromtimestamp(time.time() if at is None else at)
    return stamp.hour * 3600 + stamp.minute * 60 + stamp.second + stamp.microsecond / 1e6


def takeover_after(outputs: list[str], since: float, not_by: str) -> float | None:
    for at, node, _token in job_log.tokens(outputs):
        if at >= since - 0.002 and node != not_by:
            return at
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start(procs: Procs, hosts: list[str], **extra: str) -> list[HiNode]:
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(hosts),
        "HI_JOB_SCHEDULE": "* * * * * *",
        **extra,
    }
    nodes = [HiNode.start(procs, h, env=env) for h in hosts]
    for node in nodes:
        node.wait_ready()
    for node in nodes:
        node.wait_nodes([n.name for n in nodes if n is not node])
    wait_until(lambda: nodes[0].cluster()["singletons"].get(SCHEDULER), 10.0)
    return nodes


def holder_of(nodes: list[HiNode]) -> HiNode:
    name = nodes[0].cluster()["singletons"][SCHEDULER]
    return next(n for n in nodes if n.name == name)


QUORUM = {"SHOAL_SINGLETON_MODE": "quorum", "SHOAL_EXPECTED_NODES": "3"}
CONFIRMED = re.compile(
    r"shoal\.jobs: job \S+ tick \S+ confirmed for \S+ \(token \d+\) in ([\d.]+) ms"
)


def lateness(
    ticks: int, subnet: str = "127.0.60", **extra: str
) -> tuple[float, float, int, list[float]]:
    """Tick lateness p50, p99 (ms), ticks counted, and the quorum confirmation times (ms)."""
    with Procs() as procs:
        nodes = start(procs, [f"{subnet}.{i}" for i in range(2, 5)], **extra)
        first = seconds_of_day() + 1
        wait_until(lambda: seconds_of_day() > first + ticks + 0.5, ticks + 10, interval=0.2)
        outputs = [n.proc.output() for n in nodes]
        runs = [r for r in job_log.runs(outputs) if r.started >= first]
        late = [(r.started - r.tick) * 1000 for r in runs[:ticks]]
        confirms = [float(m[1]) for text in outputs for m in CONFIRMED.finditer(text)]
        return statistics.median(late), percentile(late, 0.99), len(late), confirms


def takeover_times(
    subnet: str, rounds: int, stop: Callable[[HiNode], float], **extra: str
) -> list[float]:
    """ms from the moment `stop(holder)` returns (its own reference time) to the takeover."""
    results = []
    for round_ in range(rounds):
        with Procs() as procs:
            hosts = [f"{subnet}.{i}" for i in range(2 + 3 * round_, 5 + 3 * round_)]
            nodes = start(procs, hosts, **extra)
            holder = holder_of(nodes)
            since = stop(holder)
            others = [n for n in nodes if n is not holder]

            def took(
                o: list[HiNode] = others, h: HiNode = holder, t: float = since
            ) -> float | None:
                return takeover_after([n.proc.output() for n in o], t, h.name)

            results.append((wait_until(took, 5.0) - since) * 1000)
    return results


def sigkill(holder: HiNode) -> float:
    """Kill the holder; the reference is the moment of the kill."""
    killed_at = seconds_of_day()
    holder.proc.kill()
    return killed_at


def sigterm(holder: HiNode) -> float:
    """Stop the holder gracefully; the reference is when it logged releasing the singleton."""
    holder.proc.signal(signal.SIGTERM)
    holder.proc.wait(15)
    stopped = [m for line in holder.proc.output().splitlines() if (m := STOPPING.match(line))]
    return job_log.parse_stamp(stopped[-1]["time"])


def quorum_partition_takeover() -> float | None:
    if netns_unavailable_reason() is not None:
        return None
    with tempfile.TemporaryDirectory() as tmp, Network(3) as net:
        env = {
            "TOPOLOGY_TYPE": "static",
            "SHOAL_HOSTS": hosts_list([h.address for h in net.hosts]),
            "HI_JOB_SCHEDULE": "* * * * * *",
            "SHOAL_SINGLETON_MODE": "quorum",
            "SHOAL_EXPECTED_NODES": "3",
        }
        nodes = [NetnsHiNode.start(h, Path(tmp), env=env) for h in net.hosts]
        for node in nodes:
            node.wait_ready()

        def holder() -> str | None:
            data = nodes[0].get_json("/cluster")
            return None if data is None else data["singletons"].get(SCHEDULER)

        wait_until(holder, 15.0, interval=0.1)
        cut = next(n for n in nodes if n.name == holder())
        cut.host.cut()
        cut_at = seconds_of_day()
        others = [n for n in nodes if n is not cut]
        wait_until(lambda: takeover_after([n.output() for n in others], cut_at, cut.name), 15.0)
        took = takeover_after([n.output() for n in others], cut_at, cut.name)
        assert took is not None
        return took - cut_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    kill = takeover_times("127.0.61", args.rounds, sigkill)
    gap = takeover_times("127.0.62", args.rounds, sigterm)
    quorum_kill = takeover_times("127.0.63", args.rounds, sigkill, **QUORUM)
    partition = quorum_partition_takeover()
    p50, p99, counted, _ = lateness(args.ticks)
    q50, q99, q_counted, confirms = lateness(args.ticks, "127.0.64", **QUORUM)

    def row(what: str, value: str, target: str) -> None:
        print(f"{what:<48} {value:>22}   {target}")

    print()
    row("measure", "result", "target")
    row(
        f"failover after SIGKILL, mesh mode ({args.rounds} runs)",
        f"median {statistics.median(kill):.1f} ms, max {max(kill):.1f} ms",
        "<= 100 ms",
    )
    row(
        "takeover after silent partition, quorum mode",
        "not available (needs root)" if partition is None else f"{partition:.2f} s",
        "<= 3 s",
    )
    row(
        f"graceful handover gap ({args.rounds} runs)",
        f"median {statistics.median(gap):.1f} ms, max {max(gap):.1f} ms",
        "<= 50 ms",
    )
    row(
        f"tick lateness over {counted} ticks", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "p99 <= 10 ms"
    )
    row(
        f"failover after SIGKILL, quorum mode ({args.rounds} runs)",
        f"median {statistics.median(quorum_kill):.0f} ms, max {max(quorum_kill):.0f} ms",
        "(confirmation window)",
    )
    row(
        f"tick lateness, quorum mode, {q_counted} ticks",
        f"p50 {q50:.1f} ms, p99 {q99:.1f} ms",
        "(includes the confirmation)",
    )
    if confirms:
        row(
            f"per-tick majority confirmation ({len(confirms)} ticks)",
            f"p50 {statistics.median(confirms):.1f} ms, p99 {percentile(confirms, 0.99):.1f} ms",
            "4 messages per tick (3 nodes)",
        )


if __name__ == "__main__":
    main()
