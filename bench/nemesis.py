"""Nemesis: random faults on 5 `hi` nodes in network namespaces; the job must run once per tick.

    sudo .venv/bin/python bench/nemesis.py --minutes 10 --mode quorum [--seed 1] [--log-dir DIR]

Runs `--nodes` (5) `hi` nodes, each in its own network namespace on a bridge
(`tests/support/netns.py`, needs root), with the job every second, in the
singleton mode `--mode` (quorum: SHOAL_EXPECTED_NODES = nodes; lease: a
Postgres in a sixth namespace that no fault touches; mesh). One fault at a
time, every 1-4 s, each kind once per round in a random order:

- `kill`: SIGKILL a node (the scheduler holder half the time), restart it;
- `term`: SIGTERM a node, wait for its exit, restart it;
- `stop`: SIGSTOP a node for 2-12 s, then SIGCONT;
- `partition`: the holder alone, or a random minority, cut from the others
  (blackhole routes on both sides: a silent partition) for 3-10 s, then heal;
- `oversized`: five 9 MiB `POST /event/k` to one node, 0.5 s apart; the
  HTTP statuses are counted;
- `block`: `POST /debug/block?seconds=N` (N in 1-6; `HI_DEBUG_FAULTS=1`):
  the node's event loop is blocked by a sync sleep.

Every run of the job logs `Job tick on: NODE tick ISO token N` next to the
contract line. The checker counts runs per tick over the whole run: ticks run
twice (a failure in quorum and lease mode; in mesh mode allowed only while a
split lasts, up to 2 s after it heals: partitions, and oversized publishes
while peers drop connections for them; not pauses nor blocked loops, after
which a node must check its view before acting) and ticks missed, each with
the fault that was active around it. Exit status 1 when a disallowed
duplicate was found. Bounded: `--minutes` of faults, at most 1000 faults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hi import NetnsHiNode, hosts_list
from tests.support.netns import Host, Network, ip, netns_unavailable_reason
from tests.support.postgres import running_postgres
from tests.support.postgres import unavailable_reason as postgres_unavailable

MAX_FAULTS = 1000
KINDS = ["kill", "term", "stop", "partition", "oversized", "block"]
OVERSIZED = 9 * 1024 * 1024
# Mesh mode: duplicates are allowed while a split (or pause) lasts and this long after.
MESH_GRACE = 2.0
TICK = re.compile(r"Job tick on: (?P<node>\S+) tick (?P<tick>\S+) token (?P<token>\S+)")
CONTRACT = re.compile(r"Job running on: (?P<node>\S+) with cookie")


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # wall clock
    end: float = 0.0
    detail: str = ""


@dataclass
class Member:
    """One node slot: its namespace host and the current process (restarts add logs)."""

    host: Host
    log_root: Path
    env: dict[str, str]
    incarnation: int = 0
    node: NetnsHiNode | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"hi@{self.host.address}"

    def start(self) -> None:
        self.incarnation += 1
        log_dir = self.log_root / f"{self.host.name}-{self.incarnation}"
        log_dir.mkdir(parents=True)
        self.node = NetnsHiNode.start(self.host, log_dir, env=self.env)
        self.logs.append(self.node.log_path)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.node is not None
        return self.node.process

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop_for_restart(self, signum: int, timeout: float = 25.0) -> None:
        self.signal(signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)


class Nemesis:
    def __init__(self, members: list[Member], rng: random.Random, mode: str) -> None:
        self.members = members
        self.rng = rng
        self.mode = mode
        self.faults: list[Fault] = []
        self.http_statuses: Counter[str] = Counter()

    def holder(self) -> Member | None:
        for member in self.rng.sample(self.members, len(self.members)):
            if member.node is None or member.process.poll() is not None:
                continue
            data = member.node.get_json("/cluster")
            if data is not None:
                name = data["singletons"].get("shoal.scheduler")
                return next((m for m in self.members if m.name == name), None)
        return None

    def victim(self) -> Member:
        if self.rng.random() < 0.5:
            holder = self.holder()
            if holder is not None:
                return holder
        return self.rng.choice(self.members)

    def inject(self, kind: str) -> Fault:
        target = self.victim()
        fault = Fault(kind, target.name, time.time())
        getattr(self, f"_{kind}")(target, fault)
        fault.end = time.time()
        self.faults.append(fault)
        return fault

    def _kill(self, target: Member, fault: Fault) -> None:
        target.stop_for_restart(signal.SIGKILL)
        target.start()
        target.node.wait_ready(30) if target.node else None

    def _term(self, target: Member, fault: Fault) -> None:
        target.stop_for_restart(signal.SIGTERM)
        target.start()
        target.node.wait_ready(30) if target.node else None

    def _stop(self, target: Member, fault: Fault) -> None:
        pause = self.rng.uniform(2, 12)
        fault.detail = f"{pause:.1f} s"
        target.signal(signal.SIGSTOP)
        try:
            time.sleep(pause)
        finally:
            target.signal(signal.SIGCONT)

    def _partition(self, target: Member, fault: Fault) -> None:
        if self.rng.random() < 0.5:
            side = [target]
            fault.detail = "holder/one isolated"
        else:
            size = (len(self.members) - 1) // 2
            side = [
                target,
                *self.rng.sample([m for m in self.members if m is not target], size - 1),
            ]
            fault.detail = "minority " + ",".join(m.host.address for m in side)
        other = [m for m in self.members if m not in side]
        cut = self.rng.uniform(3, 10)
        fault.detail += f" for {cut:.1f} s"
        with blackholes(side, other):
            time.sleep(cut)

    def _oversized(self, target: Member, fault: Fault) -> None:
        body = Path(tempfile.mkstemp(prefix="nemesis-big-")[1])
        try:
            body.write_bytes(b"[" + b"0," * (OVERSIZED // 2) + b"0]")
            for _ in range(5):
                result = target.host.run(
                    [
                        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                        "-X", "POST", "-H", "content-type: application/json",
                        "--data-binary", f"@{body}",
                        f"http://{target.host.address}:4000/event/nemesis",
                    ],
                    check=False,
                    timeout=10,
                )  # fmt: skip
                self.http_statuses[result.stdout.strip() or "none"] += 1
                time.sleep(0.5)
        finally:
            body.unlink()
        fault.detail = "statuses so far " + json.dumps(dict(self.http_statuses))

    def _block(self, target: Member, fault: Fault) -> None:
        seconds = self.rng.uniform(1, 6)
        fault.detail = f"{seconds:.1f} s"
        target.host.run(
            [
                "curl", "-s", "-o", "/dev/null", "--max-time", str(int(seconds) + 10),
                "-X", "POST",
                f"http://{target.host.address}:4000/debug/block?seconds={seconds:.2f}",
            ],
            check=False,
            timeout=seconds + 15,
        )  # fmt: skip


@contextmanager
def blackholes(side: list[Member], other: list[Member]) -> Iterator[None]:
    """Silently drop traffic between `side` and `other` (routes in each host namespace)."""
    routes = [(a.host, b.host.address) for a in side for b in other]
    routes += [(b.host, a.host.address) for a in side for b in other]
    added = []
    try:
        for host, address in routes:
            ip("-n", host.name, "route", "add", "blackhole", f"{address}/32")
            added.append((host, address))
        yield
    finally:
        for host, address in added:
            ip("-n", host.name, "route", "del", "blackhole", f"{address}/32", check=False)


@dataclass
class Report:
    ticks: int
    runs: int
    contract_lines: int
    doubled: dict[float, list[str]]
    allowed_doubles: dict[float, list[str]]
    missed: dict[float, str]
    faults: Counter[str]
    http_statuses: Counter[str]

    def failed(self) -> bool:
        return bool(self.doubled)

    def text(self, mode: str) -> str:
        causes = Counter(self.missed.values())
        lines = [
            f"mode {mode}: faults {dict(self.faults)}; oversized POST statuses "
            f"{dict(self.http_statuses)}",
            f"ticks {self.ticks}; runs {self.runs} (contract lines {self.contract_lines})",
            f"ticks run twice: {len(self.doubled)} {_stamps(self.doubled)}",
        ]
        if mode == "mesh":
            lines.append(
                f"ticks run twice while split (allowed in mesh mode): "
                f"{len(self.allowed_doubles)} {_stamps(self.allowed_doubles)}"
            )
        lines.append(f"ticks missed: {len(self.missed)}; causes {dict(causes)}")
        return "\n".join(lines)


def _stamps(ticks: dict[float, Any]) -> str:
    return str([datetime.fromtimestamp(t).strftime("%H:%M:%S") for t in sorted(ticks)][:10])


def check(
    logs: list[str], faults: list[Fault], first: float, last: float, mode: str
) -> tuple[dict[float, list[str]], dict[float, list[str]], dict[float, str], int, int]:
    """Runs per tick in [first, last]: (doubled, allowed doubles, missed with cause, ...)."""
    per_tick: dict[float, list[str]] = {}
    contract = 0
    for text in logs:
        for line in text.splitlines():
            if CONTRACT.search(line):
                contract += 1
            match = TICK.search(line)
            if match:
                tick = datetime.fromisoformat(match["tick"]).timestamp()
                per_tick.setdefault(tick, []).append(f"{match['node']}/{match['token']}")
    ticks = range(int(first), int(last) + 1)
    doubled: dict[float, list[str]] = {}
    allowed: dict[float, list[str]] = {}
    missed: dict[float, str] = {}
    for tick in ticks:
        runs = per_tick.get(float(tick), [])
        if len(runs) > 1:
            if mode == "mesh" and _split_at(faults, tick):
                allowed[tick] = runs
            else:
                doubled[tick] = runs
        elif not runs:
            missed[tick] = _cause(faults, tick)
    total = sum(len(per_tick.get(float(t), [])) for t in ticks)
    return doubled, allowed, missed, total, contract


def _split_at(faults: list[Fault], tick: float) -> bool:
    """Mesh mode: the cluster was split around `tick` (until MESH_GRACE after it healed).

    A partition splits it; so do oversized publishes while peers drop a connection
    for an oversized frame. A paused node or a blocked loop is no split: the node
    cannot act meanwhile, and must check its view before it acts afterwards.
    """
    return any(
        f.kind in ("partition", "oversized") and f.start - 1 <= tick <= f.end + MESH_GRACE
        for f in faults
    )


def _cause(faults: list[Fault], tick: float) -> str:
    """The fault active around `tick` (up to 8 s after it ended: takeover time), if any."""
    near = [f for f in faults if f.start - 1 <= tick <= f.end + 8]
    if not near:
        return "no fault nearby"
    return min(near, key=lambda f: abs(tick - f.start)).kind


def run(args: argparse.Namespace, log_root: Path) -> Report:
    rng = random.Random(args.seed)
    size = args.nodes + (1 if args.mode == "lease" else 0)
    with Network(size) as net, ExitStack() as stack:
        hosts = net.hosts[: args.nodes]
        env = {
            "TOPOLOGY_TYPE": "static",
            "SHOAL_HOSTS": hosts_list([h.address for h in hosts]),
            "POLLING_INTERVAL": "200",
            "HI_JOB_SCHEDULE": "* * * * * *",
            "HI_DEBUG_FAULTS": "1",
            "SHOAL_SINGLETON_MODE": args.mode,
        }
        if args.mode == "quorum":
            env["SHOAL_EXPECTED_NODES"] = str(args.nodes)
        if args.mode == "lease":
            server = stack.enter_context(running_postgres(netns=net.hosts[-1]))
            env["SHOAL_LEASE_DSN"] = server.dsn
        members = [Member(h, log_root, env) for h in hosts]
        for member in members:
            member.start()
        for member in members:
            assert member.node is not None
            member.node.wait_ready(30)
        nemesis = Nemesis(members, rng, args.mode)
        deadline = time.monotonic() + 60
        while nemesis.holder() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first = time.time() + 1
        ends = time.monotonic() + args.minutes * 60
        try:
            kinds: list[str] = []
            while time.monotonic() < ends and len(nemesis.faults) < MAX_FAULTS:
                time.sleep(rng.uniform(1, 4))
                if not kinds:  # every kind once per round, in a random order
                    kinds = rng.sample(KINDS, len(KINDS))
                kind = kinds.pop()
                fault = nemesis.inject(kind)
                print(
                    f"{time.strftime('%H:%M:%S')} {fault.kind} {fault.target} {fault.detail}",
                    flush=True,
                )
                (log_root / "faults.json").write_text(
                    json.dumps([vars(f) for f in nemesis.faults], indent=1)
                )
            last = time.time() - 1
            time.sleep(2)
        finally:
            for member in members:
                member.signal(signal.SIGCONT)
        logs = [p.read_text(errors="replace") for m in members for p in m.logs]
    doubled, allowed, missed, total, contract = check(logs, nemesis.faults, first, last, args.mode)
    return Report(
        ticks=int(last) - int(first) + 1,
        runs=total,
        contract_lines=contract,
        doubled=doubled,
        allowed_doubles=allowed,
        missed=missed,
        faults=Counter(f.kind for f in nemesis.faults),
        http_statuses=nemesis.http_statuses,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--mode", choices=["quorum", "lease", "mesh"], default="quorum")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the node logs here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    reason = netns_unavailable_reason()
    if reason is None and args.mode == "lease":
        reason = postgres_unavailable()
    if reason is not None:
        print(f"nemesis: {reason}", file=sys.stderr)
        return 2
    print(f"nemesis: mode {args.mode}, {args.minutes:g} min, seed {args.seed}", flush=True)
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.log_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="nemesis-") as tmp:
            report = run(args, Path(tmp))
    print(report.text(args.mode), flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
