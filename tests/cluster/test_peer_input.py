"""What peers send cannot forge log lines or make a node dial at will (real `hi` processes).

* A HELLO whose name carries a newline and ANSI codes (a forged `node up`
  line) is refused by the handshake; the node's log shows no forged line.
* A peer holding the cookie sends MEMBERS frames with 2,000 fake members:
  some on other ports (never dialed: the mesh port only), most at addresses
  whose SYNs this test drops (iptables), so every dial hangs until its connect
  timeout. The node's open file descriptors stay bounded (64 dials at once),
  where before they grew with the list (1,789 descriptors for 1,778 members).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from shoal import wire
from shoal.config import Peer, Settings
from shoal.node import Node
from tests.support.hi import COOKIE, HiNode, hosts_list
from tests.support.procs import Procs, async_wait_until, wait_until

H = "127.0.63.2"
ATTACKER = "127.0.63.3"
BLACKHOLE = "127.0.64.0/24"  # SYNs to these are dropped: dials hang


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as group:
        yield group


def test_a_forged_name_in_hello_never_reaches_the_log(procs: Procs) -> None:
    node = HiNode.start(procs, H, env={"TOPOLOGY_TYPE": "static"})
    node.wait_ready()
    # One "@", as a node name has: only the newline and the escape code give it away.
    forged = "x\n12:00:00.000 INFO    shoal.mesh: node up: evil (accepted)\x1b[2K@6.6.6.6"
    hello = wire.Hello(wire.PROTOCOL_VERSION, forged, 4370, b"i" * 8, b"n" * 32, None)
    with socket.create_connection((H, 4370), timeout=5) as raw:
        raw.sendall(wire.encode_frame(hello.to_wire()))
        try:
            assert raw.recv(4096) == b"", "dropped without an answer"
        except ConnectionResetError:
            pass
    wait_until(lambda: "malformed node name" in node.proc.output(), 5, message="refusal logged")
    output = node.proc.output()
    assert "node up: evil" not in output and "\x1b" not in output


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_members_from_a_peer_are_dialed_within_the_policy(procs: Procs) -> None:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root and iptables to make dials hang")
    rule = ["OUTPUT", "-p", "tcp", "-d", BLACKHOLE, "--syn", "-j", "DROP"]
    try:
        subprocess.run(["iptables", "-A", *rule], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"iptables is not available here: {exc.stderr!r}")
    try:
        env = {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list([H])}
        node = HiNode.start(procs, H, env=env)
        node.wait_ready()
        peak, baseline = asyncio.run(flood_members(node))
    finally:
        subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)
    print(f"open descriptors: baseline {baseline}, peak {peak}")
    assert peak <= baseline + 64 + 16, f"{peak} descriptors open (baseline {baseline})"


async def flood_members(node: HiNode) -> tuple[int, int]:
    # Another port on a listening address: must never be dialed.
    other_port = socket.create_server((H, 0))
    other_port.setblocking(False)
    attacker = Node(
        Settings(cookie=COOKIE, host=ATTACKER, port=4370, topology="static"),
        _Once([Peer("hi", H, 4370)]),
    )
    await attacker.start()
    try:
        await async_wait_until(lambda: node.name in attacker.nodes(), 10, message="connected")
        baseline = open_fds(node.proc.pid)
        members = [
            [f"hi@127.0.64.{i % 250 + 1}", f"127.0.64.{i % 250 + 1}", 4370] for i in range(250)
        ]
        members += [[f"hi@{H}", H, other_port.getsockname()[1]]] * 10
        fake = [
            [f"hi@10.{i // 250}.{i % 250}.1", f"10.{i // 250}.{i % 250}.1", 4370]
            for i in range(1740)
        ]
        conn = attacker.mesh.connection_to(node.name)  # type: ignore[union-attr]
        peak = baseline
        for _ in range(6):  # several frames, as a peer announcing changes would
            conn.send([wire.MEMBERS, members + fake])
            for _ in range(10):
                await asyncio.sleep(0.05)
                peak = max(peak, open_fds(node.proc.pid))
        try:
            other_port.accept()
            raise AssertionError("a member on another port was dialed")
        except BlockingIOError:
            pass
        assert node.name in attacker.nodes(), "the node stayed up and connected"
        return peak, baseline
    finally:
        await attacker.stop()
        other_port.close()


class _Once:
    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers

    async def run(self, propose: object) -> None:
        propose(self.peers)  # type: ignore[operator]
        await asyncio.Event().wait()
