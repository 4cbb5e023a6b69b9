"""Mesh traffic between real `hi` processes is encrypted and authenticated.

Three nodes A, B, C on loopback; iptables (DNAT, inside the test's own
network namespace) sends every mesh connection between A and B through a TCP
proxy that this test runs and that records the bytes. A payload published on
A reaches B, yet never appears in the recorded bytes. Then the proxy flips a
single bit in the stream: the receiving node drops that connection (and only
that one: C stays connected to both), and A and B reconnect afterwards.

Needs root for iptables (inside the test's own network namespaces), as in CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

A, B, C = "127.0.61.2", "127.0.61.3", "127.0.61.4"
PROXY = "127.0.61.100"
MESH_PORT = 4370
MARKER = "very-readable-marker-7f3a9c"


class RecordingProxy:
    """TCP proxy on PROXY:listen_port -> target; records bytes, can flip one bit."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.recorded = bytearray()
        self.flip_armed = threading.Event()
        self.flipped = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []

    def start(self, routes: dict[int, tuple[str, int]]) -> None:
        self._thread.start()
        for port, target in routes.items():
            future = asyncio.run_coroutine_threadsafe(self._listen(port, target), self.loop)
            self._servers.append(future.result(5))

    async def _listen(self, port: int, target: tuple[str, int]) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(*target, local_addr=(PROXY, 0))
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )

        return await asyncio.start_server(handle, PROXY, port)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.recorded += data
                if self.flip_armed.is_set() and len(data) > 8:
                    # A bit in the middle of what is, after the handshake, a record.
                    self.flip_armed.clear()
                    changed = bytearray(data)
                    changed[len(changed) // 2] ^= 0x10
                    data = bytes(changed)
                    self.flipped.set()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as group:
        yield group


def iptables(*args: str) -> None:
    subprocess.run(["iptables", "-t", "nat", *args], check=True, capture_output=True)


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root and iptables to divert mesh traffic through the proxy")
    rules = [
        ["-s", A, "-d", B, "--dport", str(MESH_PORT), "--to-destination", f"{PROXY}:5001"],
        ["-s", B, "-d", A, "--dport", str(MESH_PORT), "--to-destination", f"{PROXY}:5002"],
    ]
    added = []
    try:
        for src, a, dst, b, dport, port, to, dest in rules:
            rule = ["OUTPUT", "-p", "tcp", src, a, dst, b, dport, port, "-j", "DNAT", to, dest]
            iptables("-A", *rule)
            added.append(rule)
    except subprocess.CalledProcessError as exc:
        for rule in added:
            iptables("-D", *rule)
        pytest.skip(f"iptables DNAT is not available here: {exc.stderr!r}")
    recording = RecordingProxy()
    recording.start({5001: (B, MESH_PORT), 5002: (A, MESH_PORT)})
    try:
        yield recording
    finally:
        recording.stop()
        for rule in added:
            iptables("-D", *rule)


def test_published_payload_is_unreadable_and_a_flipped_bit_drops_only_that_connection(
    procs: Procs, proxy: RecordingProxy
) -> None:
    hosts = [A, B, C]
    env = {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list(hosts)}
    a, b, c = (HiNode.start(procs, h, env=env) for h in hosts)
    for node in (a, b, c):
        node.wait_ready()
    for node in (a, b, c):
        node.wait_nodes([n.name for n in (a, b, c) if n is not node])
    assert b"hello" in proxy.recorded, "the A-B connection goes through the proxy"

    # A publishes; B receives it through the proxy; the bytes never show it.
    received: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: received.append(b.get("/wait/secret?timeout=10", timeout=15))
    )
    waiter.start()
    try:
        for _ in range(20):  # B's waiter may subscribe a moment after the GET is sent
            response = httpx.post(f"{a.url}/event/secret", json={"note": MARKER}, timeout=2)
            assert response.status_code == 202
            if not waiter.is_alive():
                break
            waiter.join(0.25)
    finally:
        waiter.join(15)
    assert received and received[0].status_code == 200, received
    assert received[0].json()["event"]["data"] == {"note": MARKER}
    before = len(proxy.recorded)
    assert before > 500
    assert MARKER.encode() not in proxy.recorded

    # One flipped bit: that connection is dropped, C keeps both of its own.
    proxy.flip_armed.set()
    wait_until(proxy.flipped.is_set, 5, message="a bit flipped in transit")
    wait_until(
        lambda: "failed authentication" in a.proc.output() + b.proc.output(),
        5,
        message="the receiver reports the bad record",
    )
    for node in (a, b):
        node.wait_nodes([n.name for n in (a, b, c) if n is not node], timeout=10)
    assert "node down" not in c.proc.output(), "C's connections were not touched"
    for node, other in ((a, c), (b, c)):
        assert f"node down: {other.name}" not in node.proc.output()
