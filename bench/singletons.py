"""Singleton and scheduler figures on real `hi` processes (not part of the test run).

    .venv/bin/python bench/singletons.py [--ticks 60] [--rounds 5]

Prints: failover after SIGKILL of the holder (mesh mode), takeover after a
silent partition (quorum mode, default timings, network namespaces, needs
root), graceful handover gap on SIGTERM, and tick lateness p50/p99. Times
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
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import job_log
from tests.support.hi import HiNode, NetnsHiNode, hosts_list
from tests.support.netns import Network, netns_unavailable_reason
from tests.support.procs import Procs, wait_until

SCHEDULER = "shoal.scheduler"
STOPPING = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) .*singleton shoal\.scheduler: stopping on (\S+)")


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


def lateness(ticks: int) -> tuple[float, float, int]:
    with Procs() as procs:
        nodes = start(procs, [f"127.0.60.{i}" for i in range(2, 5)])
        first = seconds_of_day() + 1
        wait_until(lambda: seconds_of_day() > first + ticks + 0.5, ticks + 10, interval=0.2)
        runs = [r for r in job_log.runs([n.proc.output() for n in nodes]) if r.started >= first]
        late = [(r.started - r.tick) * 1000 for r in runs[:ticks]]
        return statistics.median(late), percentile(late, 0.99), len(late)


def failover_after_sigkill(rounds: int) -> list[float]:
    results = []
    for round_ in range(rounds):
        with Procs() as procs:
            nodes = start(procs, [f"127.0.61.{i}" for i in range(2 + 3 * round_, 5 + 3 * round_)])
            holder = holder_of(nodes)
            killed_at = seconds_of_day()
            holder.proc.kill()
            others = [n for n in nodes if n is not holder]
            wait_until(
                lambda o=others, h=holder, k=killed_at: takeover_after(
                    [n.proc.output() for n in o], k, h.name
                ),
                5.0,
            )
            took = takeover_after([n.proc.output() for n in others], killed_at, holder.name)
            assert took is not None
            results.append((took - killed_at) * 1000)
    return results


def handover_gap(rounds: int) -> list[float]:
    results = []
    for round_ in range(rounds):
        with Procs() as procs:
            nodes = start(procs, [f"127.0.62.{i}" for i in range(2 + 3 * round_, 5 + 3 * round_)])
            holder = holder_of(nodes)
            holder.proc.signal(signal.SIGTERM)
            holder.proc.wait(15)
            stopped = [
                m for line in holder.proc.output().splitlines() if (m := STOPPING.match(line))
            ]
            released = job_log.parse_stamp(stopped[-1].group(1))
            others = [n for n in nodes if n is not holder]
            wait_until(
                lambda o=others, h=holder, r=released: takeover_after(
                    [n.proc.output() for n in o], r, h.name
                ),
                5.0,
            )
            took = takeover_after([n.proc.output() for n in others], released, holder.name)
            assert took is not None
            results.append((took - released) * 1000)
    return results


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

    kill = failover_after_sigkill(args.rounds)
    gap = handover_gap(args.rounds)
    partition = quorum_partition_takeover()
    p50, p99, counted = lateness(args.ticks)

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
        "<= 5 s",
    )
    row(
        f"graceful handover gap ({args.rounds} runs)",
        f"median {statistics.median(gap):.1f} ms, max {max(gap):.1f} ms",
        "<= 50 ms",
    )
    row(
        f"tick lateness over {counted} ticks", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "p99 <= 10 ms"
    )


if __name__ == "__main__":
    main()
