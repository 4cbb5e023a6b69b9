"""A local `hi` cluster with no root and no Docker (what `./scripts/run` starts).

Two `vegeta` and two `krillin` nodes, each its own process on its own loopback
alias (Linux routes all of 127/8 to `lo`), static topology, each service
clustering only with itself. Their logs go to files and, prefixed with the
node's name, to this terminal. Ctrl-C stops them: SIGTERM to each child by
PID, a bounded wait, then exit 0.

    .venv/bin/python -m hi.local_cluster [--hosts 127.0.0.2,...] [--ports 4001,...]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from shoal.wire import cookie_fingerprint

SERVICES = ("vegeta", "vegeta", "krillin", "krillin")
DEFAULT_HOSTS = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
DEFAULT_PORTS = "4001,4002,4003,4004"
STOP_TIMEOUT = 10.0
COLORS = {"vegeta": "\033[34m", "krillin": "\033[33m"}
# Loopback requests must never go through an HTTP proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Member:
    service: str
    host: str
    port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.service}@{self.host}"

    @property
    def url(self) -> str:
        route = "krillin" if self.service == "krillin" else ""
        return f"http://{self.host}:{self.port}/{route}"

    def open_log(self) -> BinaryIO:
        return open(self.log_path, "ab")

    def get_json(self, path: str) -> Any:
        with _http.open(f"http://{self.host}:{self.port}{path}", timeout=1.0) as response:
            return json.loads(response.read())


def plan(hosts: list[str], ports: list[int], log_dir: Path) -> list[Member]:
    if len(hosts) != len(SERVICES) or len(ports) != len(SERVICES):
        raise SystemExit(f"--hosts and --ports need {len(SERVICES)} values each")
    return [
        Member(service, host, port, log_dir / f"{service}@{host}.log")
        for service, host, port in zip(SERVICES, hosts, ports, strict=True)
    ]


def node_env(member: Member, members: list[Member], cookie: str, mesh_port: int) -> dict[str, str]:
    """The contract's variables for one node; only its own service is listed in SHOAL_HOSTS."""
    env = dict(os.environ)
    # Per-node settings inherited from the shell would make all four nodes collide.
    for var in ("SHOAL_CONTROL_SOCKET", "NODE_NAME_QUERY", "SHOAL_HOSTS", "PORT"):
        env.pop(var, None)
    # No load balancer in front of the local demo: nobody needs a lame duck on Ctrl-C.
    env.setdefault("SHOAL_LAME_DUCK_MS", "0")
    siblings = [m.name for m in members if m.service == member.service]
    env.update(
        RELEASE_COOKIE=cookie,
        NODE_NAME=member.service,
        NODE_HOST=member.host,
        PORT=str(member.port),
        SHOAL_PORT=str(mesh_port),
        TOPOLOGY_TYPE="static",
        SHOAL_HOSTS=",".join(siblings),
        PYTHONUNBUFFERED="1",
    )
    return env


def _die_with_parent() -> None:
    """Linux: SIGTERM this child if the orchestrator dies without cleaning up."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Cluster:
    def __init__(self, members: list[Member], cookie: str, mesh_port: int, out: TextIO) -> None:
        self.members = members
        self.cookie = cookie
        self.mesh_port = mesh_port
        self.out = out
        self.color = out.isatty()
        self.stopping = asyncio.Event()  # set by Ctrl-C / SIGTERM / SIGHUP

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def start(self) -> None:
        width = max(len(m.name) for m in self.members)
        for member in self.members:
            member.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hi.app",
                env=node_env(member, self.members, self.cookie, self.mesh_port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            member.pump = asyncio.create_task(self._pump(member, width, member.open_log()))

    async def _pump(self, member: Member, width: int, log: BinaryIO) -> None:
        """Copy a node's output to its log file and, prefixed, to the terminal."""
        assert member.proc is not None and member.proc.stdout is not None
        prefix = f"{member.name:<{width}} | "
        if self.color:
            prefix = f"{COLORS.get(member.service, '')}{prefix}\033[0m"
        with log:
            async for line in member.proc.stdout:
                log.write(line)
                log.flush()
                self.out.write(prefix + line.decode(errors="replace"))
                self.out.flush()

    def exited(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.returncode is not None]

    async def wait_until(self, what: str, check: Any, deadline: float) -> bool:
        """Poll `check(member)` for every member until all pass, a node exits, or the deadline."""
        pending = list(self.members)
        while pending:
            if self.exited() or self.stopping.is_set():
                return False
            results = await asyncio.gather(*(asyncio.to_thread(_safe, check, m) for m in pending))
            pending = [m for m, ok in zip(pending, results, strict=True) if not ok]
            if pending and time.monotonic() > deadline:
                self.say(f"hi: not {what} in time: {', '.join(m.name for m in pending)}")
                return False
            if pending:
                await asyncio.sleep(0.1)
        return True

    def siblings(self, member: Member) -> list[str]:
        return sorted(m.name for m in self.members if m.service == member.service and m != member)

    async def stop(self) -> None:
        """SIGTERM every node by PID, wait (bounded), SIGKILL what is left."""
        running = [m for m in self.members if m.proc is not None and m.proc.returncode is None]
        for member in running:
            assert member.proc is not None
            member.proc.send_signal(signal.SIGTERM)
        procs = [m.proc for m in running if m.proc is not None]
        if procs:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_TIMEOUT
            )
            for member in running:
                if member.proc is not None and member.proc.returncode is None:
                    self.say(f"hi: {member.name} did not stop in {STOP_TIMEOUT:g} s; killing it")
                    member.proc.kill()
                    await member.proc.wait()
        pumps = [m.pump for m in self.members if m.pump is not None]
        if pumps:  # let the last log lines through
            await asyncio.wait(pumps, timeout=2.0)


def _safe(check: Any, member: Member) -> bool:
    try:
        return bool(check(member))
    except (OSError, ValueError, urllib.error.URLError):
        return False


async def run(args: argparse.Namespace, log_dir: Path) -> int:
    cookie = os.environ.get("RELEASE_COOKIE") or secrets.token_hex(32)
    generated = not os.environ.get("RELEASE_COOKIE")
    hosts = [h.strip() for h in args.hosts.split(",")]
    ports = [int(p) for p in args.ports.split(",")]
    cluster = Cluster(plan(hosts, ports, log_dir), cookie, args.mesh_port, sys.stdout)
    cookie_note = "generated for this run" if generated else "from RELEASE_COOKIE"
    cluster.say(f"hi: starting 4 nodes, cookie {cookie_fingerprint(cookie)} ({cookie_note})")

    stop = cluster.stopping
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
        deadline = time.monotonic() + args.timeout
        ok = await cluster.wait_until(
            "ready", lambda m: m.get_json("/ready")["status"] == "ready", deadline
        ) and await cluster.wait_until(
            "clustered",
            lambda m: m.get_json("/cluster")["nodes"] == cluster.siblings(m),
            deadline,
        )
        if stop.is_set():
            return 0
        if not ok:
            for member in cluster.exited():
                assert member.proc is not None
                cluster.say(f"hi: {member.name} exited with code {member.proc.returncode}")
            cluster.say(f"hi: see the logs in {log_dir}")
            return 1
        cluster.say(_banner(cluster, log_dir))
        watchers = [asyncio.ensure_future(m.proc.wait()) for m in cluster.members if m.proc]
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopper, *watchers], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not stop.is_set():
            for member in cluster.exited():
                assert member.proc is not None
                cluster.say(f"hi: {member.name} exited (code {member.proc.returncode}); stopping")
            return 1
        cluster.say("hi: stopping the cluster (SIGTERM to each node)")
        return 0
    finally:
        await cluster.stop()
        cluster.say("hi: all nodes stopped")


def _banner(cluster: Cluster, log_dir: Path) -> str:
    lines = ["", "hi: the local cluster is up:"]
    for m in cluster.members:
        pid = m.proc.pid if m.proc else "?"
        lines.append(f"  {m.service:<8} {m.url:<30} node {m.name:<20} pid {pid}")
    first = cluster.members[0]
    lines += [
        f"  logs: {log_dir}/<node>.log (also shown below, prefixed with the node's name)",
        f"  try:  .venv/bin/shoal status --node {first.name}",
        f"        .venv/bin/shoal remote --node {first.name}",
        "  Ctrl-C stops the cluster.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Start a local hi cluster: 2 vegeta + 2 krillin nodes on loopback aliases.",
    )
    parser.add_argument("--hosts", default=DEFAULT_HOSTS, help=f"4 NODE_HOSTs ({DEFAULT_HOSTS})")
    parser.add_argument("--ports", default=DEFAULT_PORTS, help=f"4 HTTP ports ({DEFAULT_PORTS})")
    parser.add_argument(
        "--mesh-port",
        type=int,
        default=int(os.environ.get("SHOAL_PORT") or 4370),
        help="SHOAL_PORT of every node (default 4370)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to become ready")
    parser.add_argument("--log-dir", help="where node logs go (default: a new temp directory)")
    args = parser.parse_args(argv)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="hi-local-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(run(args, log_dir)))


if __name__ == "__main__":
    main()
