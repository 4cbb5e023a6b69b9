"""Several nodes per host, for real: `uvicorn --workers` on two hosts (network namespaces).

Host A runs `uvicorn --workers 4`, host B `uvicorn --workers 2`, one shoal node
per worker process (tests/support/worker_app.py), SHOAL_NODES_PER_HOST=4 on
all; they must form one 6-node mesh under gossip (multicast beacons carry each
worker's port), static (SHOAL_HOSTS lists the two hosts only) and dns (a real
DNS server on a third host answers the two addresses): a host stands for the
ports SHOAL_PORT..SHOAL_PORT+3, which the nodes probe.

The classic deployment (one node per host, no SHOAL_NODES_PER_HOST) keeps its
names and its one port, also when the hosts run the same worker app.

Join time (launch of both uvicorns until every worker sees the other five, and
from the last worker's node listening until then) is printed:
`pytest -s tests/cluster/test_nodes_per_host_netns.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hi import COOKIE
from tests.support.netns import Host, Network, requires_netns
from tests.support.procs import wait_until

pytestmark = [pytest.mark.netns, requires_netns]

REPO = Path(__file__).resolve().parents[2]
DNS_NAME = "hi.workers.local"
JOIN_DEADLINE_S = 45.0  # mostly six interpreters importing on a loaded machine


class Workers:
    """The uvicorn of one host and the views its workers write."""

    def __init__(self, host: Host, count: int, state_dir: Path, env: dict[str, str]) -> None:
        self.host = host
        self.count = count
        self.state_dir = state_dir
        state_dir.mkdir()
        log = open(state_dir.parent / f"{host.name}.log", "wb")  # closed in stop()
        self.log = log
        self.process = host.popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.support.worker_app:app",
                "--workers",
                str(count),
                "--host",
                host.address,
                "--port",
                "8000",
                "--log-level",
                "warning",
            ],
            env={**env, "NODE_HOST": host.address, "WORKER_STATE_DIR": str(state_dir)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def views(self) -> list[dict[str, Any]]:
        views = []
        for path in self.state_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                views.append(json.loads(path.read_text()))
        return views

    def output(self) -> str:
        return (self.state_dir.parent / f"{self.host.name}.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM uvicorn (it stops its workers); then SIGKILL, by PID, any worker left."""
        self.host.stop_processes(timeout=15)
        for view in self.views():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(view["pid"]), signal.SIGKILL)
        self.log.close()


@contextlib.contextmanager
def workers(*groups: tuple[Host, int], env: dict[str, str], tmp: Path) -> Iterator[list[Workers]]:
    started: list[Workers] = []
    try:
        for host, count in groups:
            started.append(Workers(host, count, tmp / host.name, env))
        yield started
    finally:
        for group in started:
            group.stop()


def dns_env(nameserver: Host, *hosts: Host) -> dict[str, str]:
    """Start a real DNS server on `nameserver` answering the hosts' addresses; its settings."""
    server = nameserver.popen(
        [sys.executable, "-m", "tests.support.dns_server", nameserver.address, DNS_NAME]
        + [host.address for host in hosts],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    port = server.stdout.readline().decode().split()[-1]  # "port N", once it serves
    return {
        "SHOAL_DNS_SERVER": f"{nameserver.address}:{port}",
        "SERVICE_DISCOVERY_ENDPOINT": DNS_NAME,
    }


def all_joined(groups: list[Workers], peers: int) -> list[dict[str, Any]] | str | None:
    """Every worker's view once each sees `peers` peers; a message if a uvicorn exited."""
    for group in groups:
        if group.process.poll() is not None:
            return f"uvicorn on {group.host} exited:\n{group.output()}"
    views = [view for group in groups for view in group.views()]
    expected = sum(group.count for group in groups)
    if len(views) == expected and all(len(view["nodes"]) == peers for view in views):
        return views
    return None


def wait_joined(groups: list[Workers], peers: int, message: str) -> list[dict[str, Any]]:
    result = wait_until(lambda: all_joined(groups, peers), JOIN_DEADLINE_S, 0.1, message)
    assert not isinstance(result, str), result
    return result


@pytest.mark.parametrize("topology", ["gossip", "static", "dns"])
def test_four_workers_on_one_host_and_two_on_another_form_one_mesh(
    topology: str, tmp_path: Path
) -> None:
    with Network(3) as net:
        a, b, nameserver = net.hosts
        env = {
            "RELEASE_COOKIE": COOKIE,
            "NODE_NAME": "hi",
            "TOPOLOGY_TYPE": topology,
            "SHOAL_NODES_PER_HOST": "4",
            "WORKER_EXPECT_PEERS": "5",
        }
        if topology == "static":
            env["SHOAL_HOSTS"] = f"{a.address},{b.address}"
        if topology == "dns":
            env.update(dns_env(nameserver, a, b))
        launched = time.time()
        with workers((a, 4), (b, 2), env=env, tmp=tmp_path) as groups:
            views = wait_joined(groups, 5, f"6-node mesh under {topology}")
            names = sorted(view["name"] for view in views)
            assert names == sorted(
                [
                    f"hi@{a.address}",
                    f"hi@{a.address}:4371",
                    f"hi@{a.address}:4372",
                    f"hi@{a.address}:4373",
                    f"hi@{b.address}",
                    f"hi@{b.address}:4371",
                ]
            )
            for view in views:
                assert sorted([*view["nodes"], view["name"]]) == names
            join = max(view["full_at"] for view in views) - launched
            last_listening = max(view["listening_at"] for view in views) - launched
            print(
                f"\n{topology}: 4 + 2 workers joined one mesh {join:.2f} s after launch "
                f"(the last node listened at {last_listening:.2f} s: "
                f"{join - last_listening:.2f} s from there to a full mesh)"
            )


@pytest.mark.parametrize("topology", ["static", "dns"])
def test_one_node_per_host_keeps_its_names_and_its_one_port(topology: str, tmp_path: Path) -> None:
    """No SHOAL_NODES_PER_HOST: names are `hi@host`, the mesh listens on SHOAL_PORT only and
    dials no other port; discovery leaves the node's own address out, as it always did."""
    with Network(3) as net:
        a, b, nameserver = net.hosts
        env = {"RELEASE_COOKIE": COOKIE, "TOPOLOGY_TYPE": topology, "WORKER_EXPECT_PEERS": "1"}
        if topology == "static":
            env["SHOAL_HOSTS"] = f"hi@{a.address},hi@{b.address}"
        else:
            env.update(dns_env(nameserver, a, b))
        with workers((a, 1), (b, 1), env=env, tmp=tmp_path) as groups:
            views = wait_joined(groups, 1, "a pair")
            assert sorted((v["name"], v["port"]) for v in views) == [
                (f"hi@{a.address}", 4370),
                (f"hi@{b.address}", 4370),
            ]
            for host in (a, b):
                listening = host.run(["ss", "-Hltn"]).stdout
                mesh = [line for line in listening.split("\n") if ":437" in line]
                assert len(mesh) == 1 and f"{host.address}:4370" in mesh[0], listening
                # One mesh connection, between the two SHOAL_PORTs' nodes.
                established = host.run(["ss", "-Htn", "state", "established"]).stdout
                mesh = [line for line in established.split("\n") if ":4370" in line]
                assert len(mesh) == 1, established
