"""Scale benchmark: N bare shoal nodes on loopback in a full mesh, and what it costs.

For each N (default 10, 30, 100) it starts N-1 bare nodes (`bench/scale_node.py`,
no web app), each on its own loopback address 127.0.x.y with the same mesh
port, and measures:

- cold start: first launch until every node is connected to all others;
- join: launching one more node until all N nodes see N-1 peers (the figure
  the BEAM anchor calls `last_launch_to_all_full_ms`), in two variants:
  `full`, where the new node's SHOAL_HOSTS lists every node (the anchor's
  setup), and `seed`, where it lists one node only, so that the mesh's own
  member exchange has to connect it to the rest;
- idle cost per node over a window: CPU, RSS, bytes written to sockets
  (`wchar` in /proc/PID/io: the heartbeat payload) and loopback traffic per
  node (/proc/net/dev: with TCP/IP headers and ACKs);
- failure detection: SIGKILL one node, time until every other node has it
  down; SIGSTOP another (a silent node), the same.

Discovery is `static`: it proposes a fixed list and nothing else, so the join
figure is the mesh's (dial, handshake, member exchange) and not a discovery
period's. Nodes log membership events with timestamps to files; the driver
reads those, so it adds no traffic to the mesh. Every node stops by itself
after a lifetime; the driver ends the ones it started by PID.

Run it in a private network namespace (own loopback, no port clashes):
    sudo unshare --net sh -c 'ip link set lo up && exec .venv/bin/python bench/scale.py --sizes 10'
    sudo unshare --net sh -c 'ip link set lo up && \
        exec .venv/bin/python bench/scale.py --sizes 10 30 100 --json out.json'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = Path(__file__).resolve().parent / "scale_node.py"
BASENAME = "scale"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
POLL = 0.02  # seconds between reads of the event logs


def host(i: int) -> str:
    """The loopback address of node i: 127.0.0.2, 127.0.0.3, ..., then 127.0.1.x."""
    return f"127.0.{i // 250}.{i % 250 + 2}"


def node_name(i: int) -> str:
    return f"{BASENAME}@{host(i)}"


@dataclass
class NodeProc:
    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    launched: float
    offset: int = 0
    boot: float | None = None
    ready: float | None = None
    count: int = 0
    peers: set[str] = field(default_factory=set)
    up_at: dict[str, float] = field(default_factory=dict)  # peer -> last up time
    down_at: dict[str, float] = field(default_factory=dict)  # peer -> last down time
    full_at: float | None = None  # last time the count reached `target`
    target: int = 0
    downs: int = 0  # peer-down events seen (churn)

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """The node processes of one run; reads their event logs; ends them by PID."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.cookie = secrets.token_urlsafe(24)
        self.nodes: dict[int, NodeProc] = {}
        self.retired: list[NodeProc] = []

    def launch(self, index: int, seeds: Iterable[int], target: int) -> NodeProc:
        log = self.workdir / f"node{index}-{len(self.retired)}.log"
        env = {
            **os.environ,
            "RELEASE_COOKIE": self.cookie,
            "NODE_NAME": BASENAME,
            "NODE_HOST": host(index),
            "TOPOLOGY_TYPE": "static",
            "SHOAL_HOSTS": ",".join(host(s) for s in seeds),
            "SHOAL_PORT": str(self.args.port),
            "SHOAL_EVENT_LOOP": self.args.loop,
            "SHOAL_CONTROL_SOCKET": str(self.workdir / f"node{index}.sock"),
            "SCALE_LIFETIME_S": str(self.args.lifetime),
        }
        with log.open("wb") as out:
            launched = time.time()
            proc = subprocess.Popen(
                [sys.executable, str(NODE_SCRIPT)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        node = NodeProc(index, proc, log, launched, target=target)
        self.nodes[index] = node
        return node

    def poll(self) -> None:
        """Read new event lines of every live node."""
        for node in self.nodes.values():
            with node.log.open("rb") as f:
                f.seek(node.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            node.offset += end
            for line in data[:end].decode(errors="replace").splitlines():
                self._apply(node, line)

    @staticmethod
    def _apply(node: NodeProc, line: str) -> None:
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            return  # a warning or traceback from the node; kept in its log
        at, event = int(parts[0]) / 1e6, parts[1]
        if event == "boot":
            node.boot = at
        elif event == "ready":
            node.ready = at
        elif event in ("up", "down") and len(parts) >= 4:
            peer, count = parts[2], int(parts[3])
            node.count = count
            if event == "up":
                node.peers.add(peer)
                node.up_at[peer] = at
                if count >= node.target and node.full_at is None:
                    node.full_at = at
            else:
                node.peers.discard(peer)
                node.down_at[peer] = at
                node.downs += 1
                if count < node.target:
                    node.full_at = None

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> bool:
        """Poll the logs until `done()` or the deadline; False (and a note) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done():
                return True
            dead = [n.name for n in self.nodes.values() if n.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: node(s) exited: {', '.join(dead)} (logs in workdir)")
            if time.monotonic() > deadline:
                print(f"  ! {what}: not within {timeout:.0f} s", file=sys.stderr, flush=True)
                return False
            time.sleep(POLL)

    def retire(self, node: NodeProc, sig: int = signal.SIGTERM) -> None:
        """Signal one node and reap it (bounded), then forget it."""
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
        try:
            node.proc.wait(10)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(5)
        self.nodes.pop(node.index, None)
        self.retired.append(node)

    def stop_all(self) -> None:
        """SIGTERM every node we started, wait (bounded), SIGKILL the rest. By PID only."""
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a stopped node cannot handle SIGTERM
                node.proc.terminate()
        deadline = time.monotonic() + 15
        for node in self.nodes.values():
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        self.retired.extend(self.nodes.values())
        self.nodes.clear()


# /proc readings ----------------------------------------------------------------
def proc_sample(pid: int) -> dict[str, float]:
    """CPU seconds, RSS and socket+file bytes written so far by one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines() if line)
    return {"cpu": cpu, "rss": rss, "wchar": int(io["wchar"]), "syscw": int(io["syscw"])}


def loopback_sample() -> tuple[int, int]:
    """Bytes and packets sent on `lo` so far (in this network namespace)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            values = rest.split()
            return int(values[8]), int(values[9])
    return 0, 0


def idle_cost(cluster: Cluster, seconds: float) -> dict[str, Any]:
    """Per-node CPU, RSS and traffic over a window in which nothing but heartbeats happens."""
    pids = [n.pid for n in cluster.nodes.values()]
    lo0, t0 = loopback_sample(), time.monotonic()
    before = {pid: proc_sample(pid) for pid in pids}
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    after = {pid: proc_sample(pid) for pid in pids}
    lo1, dt = loopback_sample(), time.monotonic() - t0
    n = len(pids)
    cpu = [(after[p]["cpu"] - before[p]["cpu"]) / dt * 100 for p in pids]
    rss = [after[p]["rss"] / 2**20 for p in pids]
    sent = [(after[p]["wchar"] - before[p]["wchar"]) / dt for p in pids]
    writes = [(after[p]["syscw"] - before[p]["syscw"]) / dt for p in pids]
    return {
        "window_s": round(dt, 2),
        "cpu_pct_mean": round(statistics.mean(cpu), 2),
        "cpu_pct_max": round(max(cpu), 2),
        "cpu_pct_total": round(sum(cpu), 1),
        "rss_mb_mean": round(statistics.mean(rss), 1),
        "rss_mb_max": round(max(rss), 1),
        "sent_bytes_per_s_mean": round(statistics.mean(sent)),
        "writes_per_s_mean": round(statistics.mean(writes)),
        "loopback_bytes_per_s_per_node": round((lo1[0] - lo0[0]) / dt / n),
        "loopback_packets_per_s_per_node": round((lo1[1] - lo0[1]) / dt / n),
    }


# one size ----------------------------------------------------------------------
def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def everyone_full(cluster: Cluster) -> bool:
    return all(n.full_at is not None for n in cluster.nodes.values())


def join(cluster: Cluster, index: int, seeds: list[int], timeout: float) -> dict[str, Any]:
    """Launch node `index` into the converged cluster; time until all N see N-1 peers."""
    n = len(cluster.nodes) + 1
    for node in cluster.nodes.values():
        node.target = n - 1
        node.full_at = None
    new = cluster.launch(index, seeds, target=n - 1)
    newcomer = new.name
    ok = cluster.wait(
        f"join of {newcomer}",
        lambda: (
            everyone_full(cluster)
            and all(newcomer in o.peers for o in cluster.nodes.values() if o is not new)
        ),
        timeout,
    )
    result: dict[str, Any] = {"all_full": ok, "seeds": len(seeds)}
    if ok:
        last = max(n.full_at for n in cluster.nodes.values() if n.full_at is not None)
        result["launch_to_all_full_ms"] = ms(last - new.launched)
        result["launch_to_boot_ms"] = ms((new.boot or new.launched) - new.launched)
        result["launch_to_ready_ms"] = ms((new.ready or new.launched) - new.launched)
        result["ready_to_all_full_ms"] = ms(last - (new.ready or new.launched))
        result["newcomer_full_ms"] = ms((new.full_at or last) - new.launched)
    return result


def detect(cluster: Cluster, victim: NodeProc, sig: int, timeout: float) -> dict[str, Any]:
    """Send `sig` to `victim`; time until every other node has logged it down."""
    cluster.nodes.pop(victim.index)  # its death is expected: `wait` must not stop on it
    others = list(cluster.nodes.values())
    for node in others:
        node.down_at.pop(victim.name, None)
    sent = time.time()
    os.kill(victim.pid, sig)
    ok = cluster.wait(
        f"{signal.Signals(sig).name} of {victim.name}",
        lambda: all(victim.name in n.down_at for n in others),
        timeout,
    )
    times = [n.down_at[victim.name] - sent for n in others if victim.name in n.down_at]
    cluster.retire(victim, signal.SIGKILL)  # a stopped process dies of SIGKILL too
    return {
        "all_saw_down": ok,
        "first_ms": ms(min(times)) if times else None,
        "median_ms": ms(statistics.median(times)) if times else None,
        "last_ms": ms(max(times)) if ok else None,
    }


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster = Cluster(workdir, args)
    load = os.getloadavg()[0]
    try:
        old = list(range(n - 1))
        batch = min(args.batch or n - 1, n - 1)
        first = time.time()
        ok = True
        for start in range(0, n - 1, batch):
            members = old[: start + batch]
            for node in cluster.nodes.values():
                node.target, node.full_at = len(members) - 1, None
            for i in members[start:]:
                cluster.launch(i, old, target=len(members) - 1)
            ok = cluster.wait(
                f"start of {len(members)} nodes",
                lambda: everyone_full(cluster),
                60 + 2 * len(members),
            )
            if not ok:
                break
        cold = max((x.full_at or first) for x in cluster.nodes.values()) - first
        counts = sorted(x.count for x in cluster.nodes.values())
        result: dict[str, Any] = {
            "nodes": n,
            "loadavg_1m_at_start": round(load, 2),
            "cold_start": {
                "nodes": n - 1,
                "batch": batch,
                "all_full": ok,
                "first_launch_to_all_full_ms": ms(cold) if ok else None,
                "peer_count_min_median_max": [counts[0], counts[len(counts) // 2], counts[-1]],
                "peer_down_events": sum(x.downs for x in cluster.nodes.values()),
            },
        }
        if not ok:
            return result
        result["join_full"] = join(cluster, n - 1, [*old, n - 1], args.join_timeout)
        # The same node again, knowing one peer only: the mesh has to introduce it.
        cluster.retire(cluster.nodes[n - 1])
        cluster.wait(
            "graceful leave",
            lambda: all(node_name(n - 1) not in x.peers for x in cluster.nodes.values()),
            10,
        )
        result["join_seed"] = join(cluster, n - 1, [0], args.join_timeout)
        result["idle"] = idle_cost(cluster, args.idle)
        timeout = args.failure_timeout + 15
        result["sigkill_detect"] = detect(cluster, cluster.nodes[1], signal.SIGKILL, timeout)
        result["sigstop_detect"] = detect(cluster, cluster.nodes[2], signal.SIGSTOP, timeout)
        result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        cluster.stop_all()


def lone_node(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One bare node without peers: start-to-ready and RSS after a settle time (like BEAM's)."""
    cluster = Cluster(workdir, args)
    try:
        node = cluster.launch(0, [], target=0)
        ok = cluster.wait("lone node ready", lambda: node.ready is not None, 30)
        if not ok or node.ready is None:
            return {"error": "not ready within 30 s"}
        time.sleep(args.settle)  # RSS after the node has settled, as the anchor measures it
        sample = proc_sample(node.pid)
        return {
            "start_to_ready_ms": ms(node.ready - node.launched),
            "start_to_boot_ms": ms((node.boot or node.launched) - node.launched),
            "rss_mb": round(sample["rss"] / 2**20, 1),
        }
    finally:
        cluster.stop_all()


def import_profile(module: str, top: int = 15) -> list[tuple[str, float]]:
    """The slowest imports (cumulative ms) of `module`, from `python -X importtime`."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 7:  # three levels deep: where the time goes, roughly
            rows.append((m.group(3).strip(), int(m.group(1)) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:top]


# report ------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    def get(r: dict[str, Any], *path: str) -> Any:
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None  # type: ignore[assignment]
        return "-" if r is None else r

    rows = [
        ("start of N-1 nodes, all full (ms)", ("cold_start", "first_launch_to_all_full_ms")),
        ("  nodes started at once", ("cold_start", "batch")),
        ("  peer-down events meanwhile", ("cold_start", "peer_down_events")),
        ("join, full list: launch->all full (ms)", ("join_full", "launch_to_all_full_ms")),
        ("  of which launch->ready (ms)", ("join_full", "launch_to_ready_ms")),
        ("join, one seed: launch->all full (ms)", ("join_seed", "launch_to_all_full_ms")),
        ("idle CPU per node (% of a core)", ("idle", "cpu_pct_mean")),
        ("idle CPU, all nodes (% of a core)", ("idle", "cpu_pct_total")),
        ("RSS per node (MB)", ("idle", "rss_mb_mean")),
        ("heartbeat payload sent (B/s/node)", ("idle", "sent_bytes_per_s_mean")),
        ("socket writes (/s/node)", ("idle", "writes_per_s_mean")),
        ("loopback traffic (B/s/node)", ("idle", "loopback_bytes_per_s_per_node")),
        ("loopback packets (/s/node)", ("idle", "loopback_packets_per_s_per_node")),
        ("SIGKILL: all see down (ms)", ("sigkill_detect", "last_ms")),
        ("SIGSTOP: all see down (ms)", ("sigstop_detect", "last_ms")),
        ("load average (1 min) at start", ("loadavg_1m_at_start",)),
    ]
    header = ["N", *[str(r["nodes"]) for r in results]]
    lines = [header] + [[label, *[str(get(r, *path)) for r in results]] for label, path in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--idle", type=float, default=5.0, help="idle window, s")
    parser.add_argument("--settle", type=float, default=5.0, help="lone node settle time, s")
    parser.add_argument(
        "--batch", type=int, default=0, help="start the first N-1 nodes this many at a time"
    )
    parser.add_argument("--join-timeout", type=float, default=60.0)
    parser.add_argument("--failure-timeout", type=float, default=3.0, help="the nodes' setting, s")
    parser.add_argument("--lifetime", type=float, default=600.0, help="nodes stop by themselves")
    parser.add_argument("--port", type=int, default=4370)
    parser.add_argument(
        "--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="SHOAL_EVENT_LOOP"
    )
    parser.add_argument("--hi", action="store_true", help="also measure hi (needs the web extra)")
    parser.add_argument("--imports", action="store_true", help="show the slowest imports")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if max(args.sizes) > 1000 or min(args.sizes) < 4:
        parser.error("sizes must be between 4 and 1000")
    os.environ["SHOAL_FAILURE_TIMEOUT_MS"] = str(round(args.failure_timeout * 1000))
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks end the nodes we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"load average: {os.getloadavg()}, {os.cpu_count()} CPUs, loop {args.loop}", flush=True)
    report: dict[str, Any] = {"loop": args.loop, "cpus": os.cpu_count(), "sizes": []}
    with tempfile.TemporaryDirectory(prefix="shoal-scale-") as tmp:
        report["lone_node"] = lone_node(args, Path(tmp))
        print(f"lone bare node: {report['lone_node']}", flush=True)
        for n in args.sizes:
            started = time.monotonic()
            print(f"N={n} ...", flush=True)
            workdir = Path(tmp) / f"n{n}"
            workdir.mkdir()
            report["sizes"].append(run_size(n, args, workdir))
            print(f"N={n} done in {time.monotonic() - started:.0f} s", flush=True)
    if args.hi:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from core import measure_hi

        report["hi"] = measure_hi()
        print(f"hi: {report['hi']}")
    if args.imports:
        report["imports"] = {
            "shoal": import_profile("shoal"),
            "hi.app": import_profile("hi.app"),
        }
        for module, rows in report["imports"].items():
            print(f"slowest imports under {module} (cumulative ms):")
            for name, took in rows:
                print(f"  {took:8.1f}  {name}")
    report["loadavg_at_end"] = os.getloadavg()
    print(table(report["sizes"]))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
