"""Small networks of Linux network namespaces, for faults loopback cannot show.

Each `Network` is a bridge in its own namespace plus N host namespaces, each
wired to the bridge by a veth pair, with an address in 10.251.<k>.0/24 that
exists only inside these namespaces. Nothing is changed in the root
namespace: no interface, address or route is added there. Needs root.

    pytestmark = [pytest.mark.netns, requires_netns]

    def test_partition(tmp_path):
        with Network(3) as net:
            a, b, c = net.hosts
            proc = a.popen([sys.executable, "-m", "hi.app"], env={"NODE_HOST": a.address},
                           stdout=open(tmp_path / "a.log", "wb"), stderr=subprocess.STDOUT)
            ...
            c.cut()     # link down on c's bridge port: c's packets go nowhere
            c.heal()

Processes started with `Host.popen` are stopped by PID (SIGTERM, then SIGKILL)
when the network closes; then the namespaces are deleted. Every command has a
timeout.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import pytest

COMMAND_TIMEOUT = 10.0
_sequence = itertools.count()
_open_networks: set[Network] = set()


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create Linux network namespaces (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) to create network namespaces"
    probe = f"shoalprobe{os.getpid()}"
    try:
        added = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, timeout=COMMAND_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_TIMEOUT)
    return None


requires_netns = pytest.mark.skipif(
    netns_unavailable_reason() is not None,
    reason=str(netns_unavailable_reason()),
)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` with a deadline; raises with ip's own error text on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


class Host:
    """One network namespace with `eth0` on the bridge and `lo` up."""

    interface = "eth0"

    def __init__(self, network: Network, index: int, address: str) -> None:
        self.network = network
        self.index = index
        self.name = f"{network.prefix}-h{index}"
        self.address = address
        self.bridge_port = f"vh{index}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def popen(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside this host; `env` is added to `os.environ`.

        `ip netns exec` execs the command, so the returned PID is the command's
        own; it runs in a new session and is stopped when the network closes.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        process: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], env=full_env, **popen_kwargs
        )
        self.processes.append(process)
        return process

    def run(
        self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host and return its output."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {result.stderr.strip()}")
        return result

    def cut(self) -> None:
        """Pull the cable: the bridge side of our veth goes down; nothing gets in or out."""
        ip("-n", self.network.bridge_ns, "link", "set", self.bridge_port, "down")

    def heal(self) -> None:
        """Plug the cable back in."""
        ip("-n", self.network.bridge_ns, "link", "set", self.bridge_port, "up")

    def stop_processes(self, timeout: float = 5.0) -> None:
        """SIGTERM every process started here, SIGKILL those still alive at the deadline."""
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address}>"


class Network:
    """A bridge namespace and `size` host namespaces on 10.251.<k>.0/24."""

    def __init__(self, size: int = 2, *, multicast_route: bool = True) -> None:
        if not 1 <= size <= 200:
            raise ValueError("a test network has 1 to 200 hosts")
        seq = next(_sequence)
        self.prefix = f"shoal{os.getpid()}n{seq}"
        self.bridge_ns = f"{self.prefix}-br"
        third = (os.getpid() + seq) % 250 + 1
        self.subnet = ipaddress.ip_network(f"10.251.{third}.0/24")
        self.multicast_route = multicast_route
        self.hosts = [Host(self, i, f"10.251.{third}.{10 + i}") for i in range(size)]
        self._namespaces: list[str] = []

    def start(self) -> Network:
        _open_networks.add(self)
        try:
            self._add_namespace(self.bridge_ns)
            # Snooping off: with no IGMP querier on this wire, plain flooding is
            # what a simple switch (and a docker bridge) does with multicast.
            ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for host in self.hosts:
                self._add_namespace(host.name)
                ip(
                    "-n",
                    self.bridge_ns,
                    "link",
                    "add",
                    host.bridge_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    host.interface,
                    "netns",
                    host.name,
                )
                ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "master", "br0", "up")
                ip(
                    "-n",
                    host.name,
                    "addr",
                    "add",
                    f"{host.address}/{self.subnet.prefixlen}",
                    "dev",
                    host.interface,
                )
                ip("-n", host.name, "link", "set", host.interface, "up")
                if self.multicast_route:
                    ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", host.interface)
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop our processes (by PID), then delete our namespaces. Safe to call twice."""
        for host in self.hosts:
            host.stop_processes()
        for name in reversed(self._namespaces):
            ip("netns", "del", name, check=False)
        self._namespaces = []
        _open_networks.discard(self)

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _close_leftovers() -> None:
    """A test run killed mid-test (KeyboardInterrupt) still removes its namespaces."""
    for network in list(_open_networks):
        network.close()
