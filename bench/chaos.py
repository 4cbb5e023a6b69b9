"""Chaos run: kill, stop and restart `hi` nodes at random; the job must never run twice.

    .venv/bin/python bench/chaos.py [--nodes 5] [--minutes 3] [--seed 1]

A static cluster of `--nodes` real processes on loopback runs the `hi` job every
second (mesh mode). Every 2-6 s one node is SIGKILLed or SIGTERMed and a fresh
process takes its address. At the end it prints, per tick: how many ran it
(must be at most one), how many ticks were missed (only expected right after
a SIGKILL of the holder, which loses the tick in flight at most), and the
takeovers. Bounded: it stops after `--minutes` and at most 200 faults.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import job_log
from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs

MAX_FAULTS = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    hosts = [f"127.0.80.{i}" for i in range(2, 2 + args.nodes)]
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(hosts),
        "HI_JOB_SCHEDULE": "* * * * * *",
        "POLLING_INTERVAL": "200",
    }
    faults: Counter[str] = Counter()
    with Procs() as procs:
        nodes = {h: HiNode.start(procs, h, env=env) for h in hosts}
        for node in nodes.values():
            node.wait_ready()
        started = time.monotonic()
        first_tick = int(job_log.parse_stamp(time.strftime("%H:%M:%S.000"))) + 1
        deadline = started + args.minutes * 60
        while time.monotonic() < deadline and sum(faults.values()) < MAX_FAULTS:
            time.sleep(rng.uniform(2, 6))
            host = rng.choice(hosts)
            victim = nodes[host]
            how = rng.choice(["SIGKILL", "SIGTERM"])
            victim.proc.signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
            victim.proc.wait(20)
            faults[how] += 1
            nodes[host] = HiNode.start(procs, host, env=env)
            nodes[host].wait_ready()
            print(f"{time.strftime('%H:%M:%S')} {how} {victim.name}, restarted", flush=True)
        last_tick = int(job_log.parse_stamp(time.strftime("%H:%M:%S.000"))) - 1
        time.sleep(1.5)
        outputs = [p.output() for p in procs.procs]
    counts = job_log.ticks_between(job_log.runs(outputs), first_tick, last_tick)
    doubled = sorted(t for t, n in counts.items() if n > 1)
    missed = sorted(t for t, n in counts.items() if n == 0)
    takeovers = len(job_log.tokens(outputs))
    print()
    print(f"faults: {dict(faults)}; ticks: {len(counts)}; takeovers: {takeovers}")
    print(f"ticks run twice: {len(doubled)} {doubled[:10]}")
    print(f"ticks missed:    {len(missed)} {missed[:10]}")
    return 1 if doubled else 0


if __name__ == "__main__":
    sys.exit(main())
