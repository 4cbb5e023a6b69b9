"""Oversized messages, blocking handlers, hostile frames and peers that never read, on real
`hi` processes (issue 7's reproductions). Each time, nobody may go down.

The nodes run `tests.support.hi_probe`: the `hi` app plus hooks that make it do
from code what an application would (call, publish, send raw frames).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import job_log
from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

PROBE = [sys.executable, "-m", "tests.support.hi_probe"]
ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
SCHEDULER = "shoal.scheduler"


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as running:
        yield running


def start(procs: Procs, hosts: list[str], probe: bool = True, **extra: str) -> list[HiNode]:
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(hosts),
        "HI_JOB_SCHEDULE": "* * * * * *",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    nodes = [HiNode.start(procs, h, env=env, argv=PROBE if probe else None) for h in hosts]
    for node in nodes:
        node.wait_ready()
    for node in nodes:
        node.wait_nodes([n.name for n in nodes if n is not node])
    wait_until(
        lambda: all(n.cluster()["singletons"].get(SCHEDULER) for n in nodes), 10, message="holder"
    )
    return nodes


def probe(node: HiNode, path: str, timeout: float = 15.0, **params: object) -> dict[str, object]:
    response = httpx.post(node.url + path, params=params, timeout=timeout)
    response.raise_for_status()
    result: dict[str, object] = response.json()
    return result


def downs(procs: Procs) -> list[str]:
    """Every node-down or dropped-peer line any node logged."""
    return [
        line
        for proc in procs.procs
        for line in proc.output().splitlines()
        if "node down" in line or "dropping" in line
    ]


def doubled_ticks(procs: Procs) -> list[int]:
    runs = job_log.runs([p.output() for p in procs.procs])
    counts = job_log.ticks_between(runs, runs[0].tick, runs[-1].tick) if runs else {}
    return [tick for tick, n in counts.items() if n > 1]


def scheduler_holders(procs: Procs) -> set[str]:
    """Every node that ever started the scheduler singleton."""
    return {
        match["node"]
        for proc in procs.procs
        for line in proc.output().splitlines()
        if (match := job_log.TOKEN.match(line))
    }


def test_a_9_mib_post_gets_413_and_nobody_goes_down(procs: Procs) -> None:
    nodes = start(procs, [f"127.0.91.{i}" for i in range(2, 5)], probe=False)
    body = b"[" + b"1," * (9 * MIB // 2) + b"1]"
    for attempt in range(6):
        response = httpx.post(nodes[attempt % 3].url + "/event/k", content=body, timeout=10)
        assert response.status_code == 413, response.text
        assert "HI_MAX_BODY_BYTES" in response.json()["detail"]
        time.sleep(0.5)
    # Under the limit still works, everywhere.
    assert httpx.post(nodes[0].url + "/event/k", json={"n": 1}, timeout=5).status_code == 202
    time.sleep(1.0)  # a node-down would have been logged by now
    assert downs(procs) == [], procs.dump()
    assert doubled_ticks(procs) == [], procs.dump()


def test_a_9_mib_publish_from_code_raises_message_too_large_at_the_sender(procs: Procs) -> None:
    a, _b = start(procs, ["127.0.92.2", "127.0.92.3"])
    outcome = probe(a, "/probe/publish", size=9 * MIB)
    assert outcome["ok"] is False and outcome["error"] == "MessageTooLarge", outcome
    assert "SHOAL_MAX_FRAME_BYTES" in str(outcome["message"])
    assert probe(a, "/probe/publish", size=1000)["ok"] is True
    time.sleep(1.0)
    assert downs(procs) == [], procs.dump()


def test_a_4_5_s_sync_handler_replies_and_nobody_goes_down(procs: Procs) -> None:
    a, b = start(procs, ["127.0.93.2", "127.0.93.3"])
    holders_before = scheduler_holders(procs)
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        result: dict[str, object] = {}
        caller = threading.Thread(
            target=lambda: result.update(
                probe(a, "/probe/call", node_name=b.name, handler="slow", arg=4.5, call_timeout=10)
            )
        )
        caller.start()
        # Meanwhile b's event loop answers at once: the handler blocks a worker thread only.
        slowest = 0.0
        while caller.is_alive() and time.monotonic() - started < 15:
            asked = time.monotonic()
            assert client.get(b.url + "/health").status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.1)
        caller.join(15)
    assert result.get("ok") is True, result
    assert result["value"]["reply"] == "slept"  # type: ignore[index]
    assert result["value"]["seconds"] >= 4.5  # type: ignore[index]
    assert slowest < 1.0, slowest
    time.sleep(1.0)
    assert downs(procs) == [], procs.dump()
    # Mesh mode: the scheduler singleton never moved, so it never ran twice.
    assert scheduler_holders(procs) == holders_before and len(holders_before) == 1
    assert doubled_ticks(procs) == [], procs.dump()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


@pytest.mark.parametrize("case", ["empty arrays", "1000-deep nested arrays", "empty maps"])
def test_worst_case_frames_cost_the_receiver_under_100_ms_each(procs: Procs, case: str) -> None:
    a, b = start(procs, ["127.0.94.2", "127.0.94.3"])
    count = 10
    idle_from, idle_cpu = time.monotonic(), cpu_seconds(b.proc.pid)
    time.sleep(1.0)
    idle_rate = (cpu_seconds(b.proc.pid) - idle_cpu) / (time.monotonic() - idle_from)
    started, before = time.monotonic(), cpu_seconds(b.proc.pid)
    outcome = probe(a, "/probe/frames", timeout=120, node_name=b.name, case=case, count=count)
    assert outcome["ok"] is True, outcome  # returns once b has handled every frame
    spent = cpu_seconds(b.proc.pid) - before - idle_rate * (time.monotonic() - started)
    print(f"{case}: {spent / count * 1000:.0f} ms of the receiver's CPU per frame")
    assert spent / count < 0.1, spent / count
    wait_until(b.ready, 10, message="b answers")
    assert downs(procs) == [], procs.dump()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_peer_that_never_reads_is_dropped_before_it_grows_memory(procs: Procs) -> None:
    # Few calls at once, so that b's memory is mostly what it queued for `a`.
    hosts = [f"127.0.95.{i}" for i in range(2, 5)]
    a, b, c = start(procs, hosts, SHOAL_MAX_INFLIGHT_PER_PEER="32")
    before = peak_rss(b.proc.pid)
    # 2000 calls for 64 KiB replies, in about a second: 125 MiB that `a` will never read.
    outcome = probe(a, "/probe/flood", node_name=b.name, size=64 * 1024, count=2000)
    assert outcome["ok"] is True, outcome
    wait_until(
        lambda: f"dropping {a.name}" in b.proc.output(), 10, message="b drops a as not reading"
    )
    grown = peak_rss(b.proc.pid) - before
    print(f"b's peak RSS grew by {grown / MIB:.1f} MiB")
    # What b queued for `a`: its send-buffer limit plus at most the one write that crossed
    # it (replies leave one 64 KiB frame per write here).
    found = re.search(r"it has not read (\d+) bytes \(limit (\d+)\)", b.proc.output())
    assert found, b.proc.output()
    unread, limit = int(found[1]), int(found[2])
    assert limit == 16 * MIB and unread <= limit + 256 * 1024, (unread, limit)
    # Its memory: bounded well below the 125 MiB a kept peer would pile up. Peak RSS also
    # holds the copies on their way (encoded, joined, sealed) and what the allocator keeps
    # after freeing them: 30-51 MiB measured on a loaded 2-core machine, 40 MiB was too tight.
    assert grown < 80 * MIB, grown / MIB
    # The good peer was never affected.
    assert all(c.name not in line for line in downs(procs)), procs.dump()
    assert c.name in b.nodes()
