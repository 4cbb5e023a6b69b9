"""The image's entry point, on two network-namespace hosts, clusters by gossip.

Each namespace stands in for one compose container: its own address on a
shared bridge, a default route (as Docker gives a container; it leads
nowhere here) and a multicast route. Each runs the Dockerfile's exact
ENTRYPOINT/CMD with the Dockerfile's ENV and the compose file's environment
for `vegeta`, both read from those files, so this test follows them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.deploy_helpers import (
    IMAGE_HOME,
    IMAGE_VENV,
    REPO,
    compose_environment,
    dockerfile_stages,
    image_command,
    image_env,
)

pytestmark = pytest.mark.netns

SUBNET = "10.251.0"  # exists only inside the namespaces this test creates
GATEWAY = f"{SUBNET}.1"
COOKIE = "netns-test-cookie-5f1c0a9e7d3b2a61"
DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEADLINE_S = 60.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Host:
    namespace: str
    address: str


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Two hosts on a bridge that lives in a third namespace; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    tag = f"shoal{os.getpid()}"
    bridge_ns = f"{tag}-br"
    made: list[str] = []
    try:
        for ns in (bridge_ns, f"{tag}-a", f"{tag}-b"):
            ip("netns", "add", ns)
            made.append(ns)
        # No uplink and no forwarding in the bridge namespace: nothing leaves it.
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", bridge_ns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        result = []
        for index, ns in enumerate(made[1:], start=2):
            port = f"p{index}"
            ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                bridge_ns,
            )
            ip("-n", bridge_ns, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET}.{index}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "default", "via", GATEWAY)
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            result.append(Host(ns, address))
        yield result
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def node_environment(home: Path) -> dict[str, str]:
    """What the container would see: the image's ENV, then compose's `environment`."""
    runtime = dockerfile_stages()[-1]
    env = {
        key: value.replace(IMAGE_VENV, str(REPO / ".venv")).replace(IMAGE_HOME, str(home))
        for key, value in image_env(runtime, DOCKER_DEFAULT_PATH).items()
    }
    env.update(compose_environment("vegeta", {"RELEASE_COOKIE": COOKIE}))
    env["HOME"] = str(home)
    return env


def probe(host: Host, path: str) -> tuple[int, str]:
    """GET a node's HTTP endpoint from inside its own namespace (status, body)."""
    script = (
        "import sys,urllib.request,urllib.error\n"
        "try:\n"
        f"    r=urllib.request.urlopen('http://127.0.0.1:4000{path}',timeout=2)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
        "except OSError:\n"
        "    print(0)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", host.namespace, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    status, _, body = out.partition("\n")
    return int(status or 0), body


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the node drains), then SIGKILL if it outlives the ECS stop timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_entrypoint_nodes_become_ready_and_join_by_gossip(
    hosts: list[Host], tmp_path: Path
) -> None:
    if importlib.util.find_spec("hi") is None:
        pytest.skip("the hi app is not installed in this environment yet")
    command = image_command(dockerfile_stages()[-1])
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for host in hosts:
            home = tmp_path / host.namespace
            home.mkdir()
            log = home / "node.log"
            logs.append(log)
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", host.namespace, *command],
                        env=node_environment(home),
                        cwd=home,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

        names = {h.address: f"vegeta-service-dbz@{h.address}" for h in hosts}
        deadline = time.monotonic() + DEADLINE_S
        state: dict[str, tuple[int, object, object]] = {}
        while time.monotonic() < deadline:
            for process, log in zip(processes, logs, strict=True):
                assert process.poll() is None, f"node exited: {log.read_text()[-3000:]}"
            state = {}
            for host in hosts:
                ready, _ = probe(host, "/ready")
                status, body = probe(host, "/cluster")
                cluster = json.loads(body) if status == 200 and body.strip() else {}
                state[host.address] = (ready, cluster.get("node"), cluster.get("nodes"))
            joined = all(
                ready == 200
                and node == names[address]
                and nodes == sorted(name for a, name in names.items() if a != address)
                for address, (ready, node, nodes) in state.items()
            )
            if joined:
                break
            time.sleep(0.25)
        else:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs)
            pytest.fail(f"nodes did not join within {DEADLINE_S} s: {state}\n{tails}")

        # What an operator does in an ECS exec session: same image environment.
        first, second = hosts
        home = tmp_path / first.namespace
        listed = subprocess.run(
            ["ip", "netns", "exec", first.namespace, "shoal", "nodes"],
            env=node_environment(home),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert names[second.address] in listed.stdout
    finally:
        for process in processes:
            stop(process)
    for log in logs:
        assert COOKIE not in log.read_text(), "the cookie must never reach a log"
