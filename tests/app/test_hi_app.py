"""The `hi` app as deployments and users see it: real processes, HTTP only.

Loopback aliases 127.0.10.x belong to this module (other test modules use
other ranges, so concurrent runs do not collide on the mesh port).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.hi import COOKIE, HI, HiNode, hosts_list
from tests.support.procs import Procs, async_wait_until, wait_until


def start_pair(procs: Procs, hosts: list[str], basename: str = "hi") -> tuple[HiNode, HiNode]:
    env = {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list(hosts, basename)}
    a, b = (HiNode.start(procs, host, basename=basename, env=env) for host in hosts)
    for node in (a, b):
        node.wait_ready()
    a.wait_nodes([b.name])
    b.wait_nodes([a.name])
    return a, b


def test_health_ready_and_cluster_json_of_two_nodes(procs: Procs) -> None:
    a, b = start_pair(procs, ["127.0.10.2", "127.0.10.3"])

    assert a.get("/health").status_code == 200
    assert a.get("/ready").status_code == 200
    cluster = a.cluster()
    assert cluster["node"] == "hi@127.0.10.2"
    assert cluster["nodes"] == ["hi@127.0.10.3"]
    assert cluster["service"] == "hi"
    assert cluster["ready"] is True
    assert cluster["cookie"].startswith("sha256:")
    assert isinstance(cluster["singletons"], dict)
    assert isinstance(cluster["jobs"], list)
    assert b.cluster()["nodes"] == ["hi@127.0.10.2"]
    # The cookie itself never shows, neither in the API nor in the logs.
    assert COOKIE not in a.get("/cluster").text + a.get("/").text + a.proc.output()


def test_pages_show_self_peers_and_service(procs: Procs) -> None:
    a, _ = start_pair(procs, ["127.0.10.4", "127.0.10.5"], basename="krillin")

    for path in ("/", "/krillin", "/krillin/", "/krillin/some/page"):
        response = a.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert "krillin@127.0.10.4" in page  # self
        assert "krillin@127.0.10.5" in page  # its peer
        assert "service <b>krillin</b>" in page
    # The page refreshes from its own route, so behind the load balancer the
    # krillin page keeps talking to krillin.
    assert a.get("/krillin/cluster").json()["node"] == a.name


async def test_a_request_on_one_node_gets_the_event_posted_on_another(procs: Procs) -> None:
    a, b = start_pair(procs, ["127.0.10.6", "127.0.10.7"])

    async with httpx.AsyncClient(timeout=15) as client:
        waiting = asyncio.create_task(client.get(f"{a.url}/wait/order-42?timeout=10"))

        async def post_until_delivered() -> bool:
            # The waiter subscribes when its request arrives; post until it got one.
            response = await client.post(f"{b.url}/event/order-42", json={"paid": True})
            assert response.status_code == 202
            await asyncio.wait([waiting], timeout=0.2)
            return waiting.done()

        await async_wait_until(post_until_delivered, timeout=10, message="event delivered")
        response = await waiting

    assert response.status_code == 200
    body = response.json()
    assert body["received_on"] == a.name
    assert body["event"] == {"key": "order-42", "data": {"paid": True}, "from": b.name}


def test_wait_without_an_event_times_out_with_504(procs: Procs) -> None:
    (node,) = [HiNode.start(procs, "127.0.10.8", env={"TOPOLOGY_TYPE": "static"})]
    node.wait_ready()
    response = httpx.get(f"{node.url}/wait/nothing?timeout=0.2", timeout=5)
    assert response.status_code == 504
    assert "nothing" in response.json()["detail"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELEASE_COOKIE": ""}, "RELEASE_COOKIE is not set"),
        ({"SHOAL_HOSTS": "hi@bad host"}, "SHOAL_HOSTS"),
        ({"PORT": "http"}, "PORT='http'"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(env: dict[str, str], message: str) -> None:
    full_env = {
        **os.environ,
        "RELEASE_COOKIE": COOKIE,
        "NODE_HOST": "127.0.10.9",
        "TOPOLOGY_TYPE": "static",
        **env,
    }
    result = subprocess.run(
        [HI], env=full_env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_promptly_and_the_peer_drops_the_node(procs: Procs) -> None:
    a, b = start_pair(procs, ["127.0.10.10", "127.0.10.11"])

    started = time.monotonic()
    b.proc.signal(signal.SIGTERM)
    wait_until(lambda: a.nodes() == [], timeout=2, message="peer dropped the stopped node")
    assert b.proc.wait(5) == 0
    assert time.monotonic() - started < 3
    assert "leaving the cluster" in b.proc.output()


def test_start_to_ready_and_idle_memory(procs: Procs) -> None:
    """The targets (issue 12): ready within 0.5 s and idle under 45 MB; measured 0.35-0.44 s
    of CPU and 44.8 MB with Starlette directly (FastAPI and pydantic were 17 MB and half of
    the start), so the bounds are 0.75 s of CPU and 48 MB. Time is the CPU time the process
    used until ready, so a busy machine (which stretches wall time) does not skew it; wall
    time gets a loose bound only to catch a hang."""
    started = time.monotonic()
    node = HiNode.start(procs, "127.0.10.12", env={"TOPOLOGY_TYPE": "static"})
    node.wait_ready()
    start_to_ready = time.monotonic() - started
    proc = Path(f"/proc/{node.proc.pid}")
    if not proc.exists():
        pytest.skip("needs /proc to read CPU time and RSS")
    fields = (proc / "stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    rss_kb = next(
        int(line.split()[1])
        for line in (proc / "status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    mb = rss_kb / 1024
    print(f"start-to-ready {start_to_ready:.2f} s wall, {cpu:.2f} s CPU, RSS {mb:.1f} MB")
    assert cpu < 0.75
    assert rss_kb < 48 * 1024
    assert start_to_ready < 15
