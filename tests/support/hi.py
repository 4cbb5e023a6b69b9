"""Real `hi` node processes for multi-node tests, driven through the contract only.

    with Procs() as procs:
        a = HiNode.start(procs, "127.0.40.2", env={"TOPOLOGY_TYPE": "static", ...})
        a.wait_ready()
        assert a.cluster()["nodes"] == [...]

Each node gets its own loopback alias (NODE_HOST) and a free HTTP port, as the
README's local cluster does.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import Proc, Procs, wait_until

HI = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hi")
COOKIE = "test-cookie-0123456789abcdef-9f8e7d6c"


_TAKEN: set[int] = set()


def free_port(host: str = "0.0.0.0") -> int:
    """A port free on `host` and on all addresses (hi's HTTP server binds 0.0.0.0), taken
    below the kernel's ephemeral range (32768 and up), so that no outgoing connection can
    grab it between this probe and the node's bind (a flake the flake hunt found)."""
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _TAKEN:
            continue
        try:
            for address in {host, "0.0.0.0"}:
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port found in 20000-32000")


def hosts_list(hosts: list[str], basename: str = "hi") -> str:
    return ",".join(f"{basename}@{h}" for h in hosts)


@dataclass
class HiNode:
    proc: Proc
    host: str
    port: int
    basename: str

    @property
    def name(self) -> str:
        return f"{self.basename}@{self.host}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        procs: Procs,
        host: str,
        *,
        basename: str = "hi",
        env: Mapping[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> HiNode:
        port = free_port(host)
        full_env = {
            "RELEASE_COOKIE": COOKIE,
            "NODE_NAME": basename,
            "NODE_HOST": host,
            "PORT": str(port),
            # In the Procs' own directory, which is removed with it (also after a SIGKILL).
            "SHOAL_CONTROL_SOCKET": str(procs.log_dir / f"{host}.sock"),
            # No load balancer in front of test nodes: SIGTERM needs no lame duck.
            "SHOAL_LAME_DUCK_MS": "0",
            **(env or {}),
        }
        proc = procs.start(argv or [HI], env=full_env, name=f"{basename}@{host}")
        return cls(proc, host, port, basename)

    def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def cluster(self) -> dict[str, Any]:
        response = self.get("/cluster")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def nodes(self) -> list[str]:
        return list(self.cluster()["nodes"])

    def ready(self) -> bool:
        try:
            return self.get("/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        def check() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"{self.name} exited:\n{self.proc.output()}")
            return self.ready()

        wait_until(check, timeout, message=f"{self.name} ready")

    def wait_nodes(self, expected: list[str], timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.nodes() == sorted(expected),
            timeout,
            message=f"{self.name} sees {sorted(expected)}",
        )


def time_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    """Seconds until `predicate` holds, measured by polling; fails after `timeout`."""
    started = time.monotonic()
    wait_until(predicate, timeout, interval=interval)
    return time.monotonic() - started


@dataclass
class NetnsHiNode:
    """A `hi` node inside a network-namespace host, queried with curl from inside it."""

    host: Any  # tests.support.netns.Host
    process: Any  # subprocess.Popen[bytes]
    log_path: Path
    basename: str = "hi"
    port: int = 4000

    @property
    def name(self) -> str:
        return f"{self.basename}@{self.host.address}"

    @classmethod
    def start(
        cls, host: Any, log_dir: Path, *, basename: str = "hi", env: Mapping[str, str] | None = None
    ) -> NetnsHiNode:
        log_path = log_dir / f"{host.name}.log"
        full_env = {
            "RELEASE_COOKIE": COOKIE,
            "NODE_NAME": basename,
            "NODE_HOST": host.address,
            "PORT": "4000",
            "SHOAL_CONTROL_SOCKET": str(log_dir / f"{host.name}.sock"),
            **(env or {}),
        }
        with open(log_path, "wb") as log:
            process = host.popen([HI], env=full_env, stdout=log, stderr=subprocess.STDOUT)
        return cls(host, process, log_path, basename)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str) -> Any:
        result = self.host.run(
            ["curl", "-sf", "--max-time", "2", f"http://{self.host.address}:{self.port}{path}"],
            check=False,
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def nodes(self) -> list[str] | None:
        data = self.get_json("/cluster")
        return None if data is None else list(data["nodes"])

    def wait_ready(self, timeout: float = 20.0) -> None:
        def check() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.output()}")
            return (
                self.get_json("/cluster") is not None
                and self.host.run(
                    [
                        "curl",
                        "-sf",
                        "--max-time",
                        "2",
                        f"http://{self.host.address}:{self.port}/ready",
                    ],
                    check=False,
                ).returncode
                == 0
            )

        wait_until(check, timeout, interval=0.1, message=f"{self.name} ready")
