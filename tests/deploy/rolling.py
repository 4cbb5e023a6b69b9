"""Rolling restarts of the compose cluster under load: the zero-downtime proof.

    sudo .venv/bin/python -m tests.deploy.rolling             # both orders, 200 req/s, >= 60 s
    sudo .venv/bin/python -m tests.deploy.rolling --order ecs --rate 300

The cluster is the shipped compose file (2 vegeta + 2 krillin + HAProxy),
with the image built offline from stand-in base images. Every app container
is replaced one by one, in one of two orders:

- `ecs`: start a new one, wait until HAProxy routes to it, SIGTERM the old
  one (ECS with minimum 100 % / maximum 200 %);
- `compose`: SIGTERM the old one, then start a new one.

Meanwhile a load generator sends `--rate` requests a second through HAProxy
to `/` and `/krillin`, and clients hold `/wait/{key}` while their events are
POSTed through HAProxy (which lands them on another node about half of the
time). The summary counts failed requests, non-2xx answers, lost events,
cron ticks missed or run twice, and the latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.deploy.deploy_helpers import COMPOSE_FILE, HAPROXY_CFG, compose_cli
from tests.deploy.docker_env import (
    HAPROXY_CONFIG_PATH,
    build_image,
    build_wheels,
    docker,
    standin_images,
)

SERVICES = {"vegeta": ("/", "*/5"), "krillin": ("/krillin", "*/7")}
REQUEST_TIMEOUT_S = 10.0
WAIT_S = 25.0
# The event follows its /wait by more than a busy node takes to start handling
# a request, so the wait is held when it comes (nothing is buffered for later).
EVENT_DELAY_S = 3.0
READY_DEADLINE_S = 90.0
STOP_TIMEOUT_S = 90


@dataclass
class Summary:
    order: str
    seconds: float = 0.0
    requests: int = 0
    failed: int = 0
    non_2xx: Counter[int] = field(default_factory=Counter)
    max_latency_s: float = 0.0
    p99_latency_s: float = 0.0
    waits: int = 0
    waits_cross_node: int = 0
    events_lost: int = 0
    ticks_expected: int = 0
    ticks_missed: int = 0
    ticks_twice: int = 0
    replaced: list[str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # what became of each lost event

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        return (
            self.failed == 0
            and not self.non_2xx
            and self.events_lost == 0
            and self.ticks_missed == 0
            and self.ticks_twice == 0
            and all(code == 0 for code in self.exit_codes)
        )

    def text(self) -> str:
        return (
            f"order={self.order}: {self.requests} requests in {self.seconds:.0f} s "
            f"({self.rate:.0f}/s), failed {self.failed}, non-2xx {sum(self.non_2xx.values())}"
            f" {dict(self.non_2xx) or ''}, max latency {self.max_latency_s * 1000:.0f} ms "
            f"(p99 {self.p99_latency_s * 1000:.0f} ms); /wait {self.waits} "
            f"({self.waits_cross_node} across nodes), events lost {self.events_lost}; ticks "
            f"{self.ticks_expected}, missed {self.ticks_missed}, run twice {self.ticks_twice}; "
            f"{len(self.replaced)} containers replaced, exit codes {sorted(set(self.exit_codes))}"
            + (f"; errors {dict(self.errors)}" if self.errors else "")
            + (f"; lost: {self.lost[:10]}" if self.lost else "")
        )


def container_logs(cid: str) -> str:
    """A container's output, stdout and stderr (where the nodes log), time-stamped."""
    return subprocess.run(
        ["docker", "logs", "--timestamps", cid],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=True,
    ).stdout


class Cluster:
    """One compose project of the shipped file, with test images and loopback ports."""

    def __init__(self, project: str, image: str, haproxy_image: str, workdir: Path) -> None:
        cli = compose_cli()
        if cli is None:
            raise RuntimeError("neither `docker compose` nor `docker-compose` is installed")
        self.project = project
        self.http_port = random.randint(20000, 29999)
        self.stats_port = self.http_port + 10000
        override = workdir / "override.yml"
        override.write_text(
            json.dumps(
                {
                    "version": "3.8",
                    "services": {
                        "vegeta": {"image": image},
                        "krillin": {"image": image},
                        "lb": {
                            "image": haproxy_image,
                            # compose adds these to the file's HI_HTTP_PORT mapping.
                            "ports": [f"127.0.0.1:{self.stats_port}:8404"],
                            "volumes": [f"{HAPROXY_CFG}:{HAPROXY_CONFIG_PATH}:ro"],
                        },
                    },
                }
            )
        )
        self.base = [*cli, "-p", project, "-f", str(COMPOSE_FILE), "-f", str(override)]
        self.env = {
            **os.environ,
            "RELEASE_COOKIE": secrets.token_hex(32),
            "HI_HTTP_PORT": f"127.0.0.1:{self.http_port}",
        }
        self.logs: dict[str, str] = {}

    def compose(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [*self.base, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def up(self) -> None:
        self.compose("up", "-d", "--no-build")

    def save_logs(self, directory: Path) -> None:
        """Every container's output (removed ones too), HAProxy's included, one file each."""
        directory.mkdir(parents=True, exist_ok=True)
        self.collect_logs()
        for cid in self.containers("lb"):
            self.logs[cid] = container_logs(cid)
        for cid, text in self.logs.items():
            (directory / f"{self.project}-{cid[:12]}.log").write_text(text)

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180)

    def containers(self, service: str) -> list[str]:
        """Running container ids of `service`, oldest first."""
        out = docker(
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        )
        ids = out.split()
        created = {cid: docker("inspect", "-f", "{{.Created}}", cid).strip() for cid in ids}
        return sorted(ids, key=lambda cid: created[cid])

    def address(self, cid: str) -> str:
        return docker(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid
        ).strip()

    def scale(self, service: str, count: int) -> list[str]:
        """Start containers until `service` has `count`; the new ids."""
        before = set(self.containers(service))
        self.compose(
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--no-recreate",
            "--scale",
            f"{service}={count}",
            service,
        )
        return [cid for cid in self.containers(service) if cid not in before]

    def stop(self, cid: str) -> int:
        """SIGTERM (docker stop), wait for the exit, keep its logs, remove it: the exit code."""
        docker("stop", "-t", str(STOP_TIMEOUT_S), cid, timeout=STOP_TIMEOUT_S + 30)
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", cid).strip())
        self.logs[cid] = container_logs(cid)
        docker("rm", cid)
        return code

    def collect_logs(self) -> None:
        for service in SERVICES:
            for cid in self.containers(service):
                self.logs[cid] = container_logs(cid)

    def lb_view(self) -> dict[str, dict[str, str]]:
        """HAProxy's servers per backend: address -> status (UP, DOWN, MAINT...)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with httpx.Client(timeout=3) as client:
            text = client.get(url).text.lstrip("# ")
        view: dict[str, dict[str, str]] = {name: {} for name in SERVICES}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] in view and row["svname"] not in ("FRONTEND", "BACKEND"):
                addr = (row.get("addr") or "").rsplit(":", 1)[0]
                if addr:
                    view[row["pxname"]][addr] = row["status"]
        return view

    def ready(self, cid: str) -> bool:
        """The container's own /ready, asked from inside it."""
        probe = (
            "import os,urllib.request;"
            "urllib.request.urlopen('http://127.0.0.1:'+os.environ['PORT']+'/ready',timeout=3)"
        )
        result = subprocess.run(
            ["docker", "exec", cid, "python", "-c", probe],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return result.returncode == 0

    def wait_routed(self, service: str, cids: list[str], deadline_s: float) -> None:
        """Until every one of `cids` is ready and then UP in HAProxy after a passed check,
        as ECS waits for a new task to be healthy in its target group. (HAProxy shows an
        address UP as soon as DNS returns it, and Docker may reuse a gone one's.)"""
        deadline = time.monotonic() + deadline_s
        for cid in cids:
            while not self.ready(cid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service} {cid[:12]} not ready")
                time.sleep(0.25)
        checked_after = time.monotonic()
        addresses = {self.address(cid) for cid in cids}
        while True:
            try:
                view = self.lb_view()[service]
                up = all(view.get(a, "").startswith("UP") for a in addresses)
                # HAProxy checks every second: one full round after the container was ready.
                if up and time.monotonic() - checked_after > 2.5:
                    return
            except (httpx.HTTPError, KeyError):
                view = {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} {addresses} not UP in HAProxy: {view}")
            time.sleep(0.25)


def parse_hey(text: str) -> tuple[Counter[int], Counter[str], float, float]:
    """hey's summary: status codes, errors, slowest and 99th-percentile latency (s)."""
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    slowest = p99 = 0.0
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("distribution:"):
            section = stripped
            continue
        if stripped.startswith("Slowest:"):
            slowest = float(stripped.split()[1])
        elif section.startswith("Latency") and stripped.startswith("99%"):
            p99 = float(stripped.split()[2])
        elif section.startswith("Status") and stripped.startswith("["):
            code, count = re.match(r"\[(\d+)\]\s+(\d+)", stripped).groups()  # type: ignore[union-attr]
            statuses[int(code)] += int(count)
        elif section.startswith("Error") and stripped.startswith("["):
            count, message = re.match(r"\[(\d+)\]\s+(.*)", stripped).groups()  # type: ignore[union-attr]
            errors[message.rsplit(": ", 1)[-1][:80]] += int(count)
    return statuses, errors, slowest, p99


class Load:
    """`rate` requests a second through HAProxy to / and /krillin (`hey`, half each),
    plus /wait clients whose events are POSTed through HAProxy too."""

    def __init__(self, port: int, rate: float, summary: Summary) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.rate = rate
        self.summary = summary
        self.latencies: list[float] = []
        self.stopping = asyncio.Event()
        self.pending: set[asyncio.Task[None]] = set()

    def _record(self, started: float, status: int | None, error: str | None = None) -> float:
        latency = time.monotonic() - started
        self.summary.requests += 1
        if error is not None:
            self.summary.failed += 1
            self.summary.errors[error] += 1
        elif status is not None and not 200 <= status < 300:
            self.summary.non_2xx[status] += 1
        return latency

    async def _wait_and_event(self, client: httpx.AsyncClient, prefix: str) -> None:
        key = secrets.token_hex(8)
        prefix = prefix.rstrip("/")
        started = time.monotonic()
        waiting = asyncio.create_task(
            client.get(f"{prefix}/wait/{key}", params={"timeout": WAIT_S}, timeout=WAIT_S + 10)
        )
        await asyncio.sleep(EVENT_DELAY_S)
        posted = time.monotonic()
        sender = None
        try:
            event = await client.post(f"{prefix}/event/{key}", timeout=REQUEST_TIMEOUT_S)
            latency = self._record(posted, event.status_code)
            if event.status_code == 202:
                self.latencies.append(latency)
                sender = event.json()["published"]["from"]
        except httpx.HTTPError as exc:
            self._record(posted, None, "event " + type(exc).__name__)
        self.summary.waits += 1
        try:
            response = await waiting
        except httpx.HTTPError as exc:
            self._record(started, None, "wait " + type(exc).__name__)
            self.summary.events_lost += 1
            self.summary.lost.append(f"{key}: wait {type(exc).__name__}, event from {sender}")
            return
        self._record(started, response.status_code)
        if response.status_code != 200:
            self.summary.events_lost += 1
            self.summary.lost.append(
                f"{key}: wait {response.status_code} {response.text[:60]!r}, event from {sender}"
            )
            return
        if sender is not None and response.json()["received_on"] != sender:
            self.summary.waits_cross_node += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def run(self) -> None:
        # hey paces each worker: many slow-paced workers keep the rate when some
        # responses are slow. Stopped by SIGINT, after which it prints its summary.
        per_worker = 0.5  # a worker waits for each answer: 2 s of latency keeps the pace
        workers = max(1, round(self.rate / len(SERVICES) / per_worker))
        heys = [
            await asyncio.create_subprocess_exec(
                "hey",
                "-z",
                "3600s",
                "-c",
                str(workers),
                "-q",
                f"{per_worker:g}",
                "-t",
                str(int(REQUEST_TIMEOUT_S)),
                self.base + path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            for path, _ in SERVICES.values()
        ]
        outputs = [asyncio.create_task(h.communicate()) for h in heys]
        try:
            async with httpx.AsyncClient(base_url=self.base) as client:
                paths = [path for path, _ in SERVICES.values()]
                sent = 0
                while not self.stopping.is_set():
                    self._spawn(self._wait_and_event(client, paths[sent % 2]))
                    sent += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), 0.25)
                if self.pending:
                    await asyncio.wait(set(self.pending), timeout=WAIT_S + 20)
        finally:
            for hey in heys:
                if hey.returncode is None:
                    hey.send_signal(signal.SIGINT)
            done = await asyncio.wait_for(asyncio.gather(*outputs), 60)
        for stdout, _ in done:
            statuses, errors, slowest, p99 = parse_hey(stdout.decode(errors="replace"))
            self.summary.requests += sum(statuses.values()) + sum(errors.values())
            self.summary.failed += sum(errors.values())
            self.summary.errors.update(errors)
            for code, count in statuses.items():
                if not 200 <= code < 300:
                    self.summary.non_2xx[code] += count
            self.summary.max_latency_s = max(self.summary.max_latency_s, slowest)
            self.summary.p99_latency_s = max(self.summary.p99_latency_s, p99)


def tick_report(logs: dict[str, str], start: float, end: float, summary: Summary) -> None:
    """Count each service's cron ticks in [start, end): missing ones and doubled ones."""
    runs: dict[str, Counter[int]] = {name: Counter() for name in SERVICES}
    for text in logs.values():
        for line in text.splitlines():
            if "Job running on: " not in line:
                continue
            stamp, _, rest = line.partition(" ")
            node = rest.split("Job running on: ", 1)[1].split(" ", 1)[0]
            service = next((s for s in SERVICES if node.startswith(s)), None)
            if service is None:
                continue
            at = datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
            step = int(SERVICES[service][1].lstrip("*/"))
            minute = int(at // 60) * 60
            runs[service][minute + int((at - minute) // step) * step] += 1
    for service, counter in runs.items():
        step = int(SERVICES[service][1].lstrip("*/"))
        expected = [
            minute + second
            for minute in range(int(start // 60) * 60, int(end) + 60, 60)
            for second in range(0, 60, step)
            if start <= minute + second < end
        ]
        summary.ticks_expected += len(expected)
        summary.ticks_missed += sum(1 for tick in expected if counter[tick] == 0)
        summary.ticks_twice += sum(1 for tick in expected if counter[tick] > 1)


def replace_all(cluster: Cluster, order: str, summary: Summary, per_service: int) -> None:
    """Replace the first `per_service` containers of each service one by one, in `order`."""
    for service in SERVICES:
        for old in cluster.containers(service)[:per_service]:
            if order == "ecs":
                new = cluster.scale(service, 3)
                cluster.wait_routed(service, new, READY_DEADLINE_S)
                summary.exit_codes.append(cluster.stop(old))
            else:
                summary.exit_codes.append(cluster.stop(old))
                new = cluster.scale(service, 2)
                cluster.wait_routed(service, new, READY_DEADLINE_S)
            summary.replaced.append(f"{service}:{old[:12]}->{','.join(c[:12] for c in new)}")


def wait_clustered(cluster: Cluster) -> None:
    """Until every service has 2 containers UP in HAProxy and each sees one peer."""
    deadline = time.monotonic() + READY_DEADLINE_S
    for service, (path, _) in SERVICES.items():
        cluster.wait_routed(service, cluster.containers(service), READY_DEADLINE_S)
        url = f"http://127.0.0.1:{cluster.http_port}{path.rstrip('/')}/cluster"
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                views = [httpx.get(url, timeout=3).json() for _ in range(4)]
                if all(len(view["nodes"]) == 1 for view in views):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} did not cluster")
            time.sleep(0.5)


async def measure(
    cluster: Cluster, order: str, rate: float, min_seconds: float, per_service: int
) -> Summary:
    summary = Summary(order)
    load = Load(cluster.http_port, rate, summary)
    loader = asyncio.create_task(load.run())
    started = time.time()
    monotonic = time.monotonic()
    await asyncio.sleep(3)  # load before the first replacement
    await asyncio.to_thread(replace_all, cluster, order, summary, per_service)
    await asyncio.to_thread(wait_clustered, cluster)
    remaining = min_seconds - (time.monotonic() - monotonic)
    await asyncio.sleep(max(3.0, remaining))
    load.stopping.set()
    await loader
    ended = time.time()
    summary.seconds = time.monotonic() - monotonic
    if load.latencies:  # the events' POSTs (a /wait lasts until its event, by design)
        summary.max_latency_s = max(summary.max_latency_s, *load.latencies)
    cluster.collect_logs()
    # Ticks whose runs fall inside the measured window (a run logs just after its tick).
    tick_report(cluster.logs, started + 1, ended - 2, summary)
    return summary


def prepare_images(tag: str) -> tuple[str, str]:
    """The stand-in bases (cached by tag) and the hi image, built offline."""
    python_base, haproxy_base = standin_images()
    build_wheels()
    build_image(tag, buildkit=False, base=python_base)
    return tag, haproxy_base


def run(
    orders: list[str],
    rate: float,
    min_seconds: float,
    per_service: int,
    workdir: Path,
    logs: Path | None = None,
) -> list[Summary]:
    image, haproxy_image = prepare_images("shoal-test/hi:rolling")
    summaries = []
    for order in orders:
        cluster = Cluster(f"shoalroll{os.getpid()}{order}", image, haproxy_image, workdir)
        try:
            cluster.up()
            wait_clustered(cluster)
            summary = asyncio.run(measure(cluster, order, rate, min_seconds, per_service))
        finally:
            if logs is not None:
                cluster.save_logs(logs)
            cluster.down()
        print(summary.text(), flush=True)
        summaries.append(summary)
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--order", choices=["ecs", "compose", "both"], default="both")
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second")
    parser.add_argument("--min-seconds", type=float, default=60.0)
    parser.add_argument("--per-service", type=int, default=2, help="containers to replace")
    parser.add_argument("--logs", type=Path, help="keep every container's output here")
    args = parser.parse_args()
    orders = ["ecs", "compose"] if args.order == "both" else [args.order]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shoal-rolling-") as tmp:
        summaries = run(orders, args.rate, args.min_seconds, args.per_service, Path(tmp), args.logs)
    sys.exit(0 if all(s.clean for s in summaries) else 1)


if __name__ == "__main__":
    main()
