"""`scripts/run`, the README's main command: four nodes up, two clusters, clean Ctrl-C.

Loopback aliases 127.0.12.2-5 belong to this module.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx

from tests.support.hi import free_port
from tests.support.procs import Procs, wait_until

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ["127.0.12.2", "127.0.12.3", "127.0.12.4", "127.0.12.5"]
SERVICES = ["vegeta", "vegeta", "krillin", "krillin"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_scripts_run_starts_two_clusters_and_stops_on_ctrl_c(procs: Procs) -> None:
    ports = [free_port("0.0.0.0") for _ in HOSTS]
    env = {k: "" for k in ("RELEASE_COOKIE", "SHOAL_CONTROL_SOCKET")}
    run = procs.start(
        [
            str(ROOT / "scripts" / "run"),
            "--hosts",
            ",".join(HOSTS),
            "--ports",
            ",".join(map(str, ports)),
            "--mesh-port",
            str(free_port()),
        ],
        env=env,
        name="scripts-run",
    )
    children: list[int] = []
    try:
        banner = wait_until(
            lambda: "Ctrl-C stops the cluster" in run.output() and run.output(),
            timeout=180,  # the first run may install into .venv
            message="scripts/run banner",
        )
        assert "generated for this run" in banner
        assert re.search(r"cookie sha256:[0-9a-f]{8}", banner)
        rows = re.findall(r"(vegeta|krillin)\s+(http://\S+)\s+node (\S+)\s+pid (\d+)", banner)
        assert [(service, name) for service, _, name, _ in rows] == [
            (service, f"{service}@{host}") for service, host in zip(SERVICES, HOSTS, strict=True)
        ]
        children = [int(pid) for *_, pid in rows]
        for (service, url, name, _), port in zip(rows, ports, strict=True):
            assert f":{port}/" in url
            assert httpx.get(url, timeout=5).status_code == 200
            cluster = httpx.get(url.removesuffix("krillin") + "cluster", timeout=5).json()
            siblings = [n for s, _, n, _ in rows if s == service and n != name]
            assert cluster["node"] == name
            assert cluster["nodes"] == siblings
        # Each node's log lines reach the terminal prefixed with its name.
        assert re.search(r"^krillin@127\.0\.12\.5\s+\| .*listening", banner, re.MULTILINE)

        run.signal(signal.SIGINT)
        assert run.wait(20) == 0
        assert not [pid for pid in children if alive(pid)]
        assert "all nodes stopped" in run.output()
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
