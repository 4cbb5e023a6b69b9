"""Another local user cannot stand in for a node's control socket.

Real processes, three users: the attacker (uid 65534) pre-creates the victim's
socket directory with mode 0777 and listens there, recording every byte; the
victim (uid 65533) then starts a `hi` node and runs `shoal status` and
`shoal remote` (typing a line that prints the cookie). The node refuses the
directory, says how to fix it and still starts; the client refuses to talk,
and the attacker receives nothing. A socket in a shared sticky directory (as
/tmp is) gets past the directory check, and then the server's uid
(SO_PEERCRED) is what stops the client.

Needs root (to switch users with setpriv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hi import COOKIE, HI, HiNode
from tests.support.procs import Procs, wait_until

VICTIM, ATTACKER = 65533, 65534
SHOAL = str(Path(HI).with_name("shoal"))
HOST = "127.0.12.2"

# The attacker's fake node: answers like a node would, and records what it gets.
FAKE_SERVER = r"""
import json, os, socket, sys
path, capture = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            with open(capture, "ab") as f:
                f.write(data)
            reply = {"ok": True, "result": {"node": "fake", "output": "", "more": False}}
            conn.sendall(json.dumps(reply).encode() + b"\n")
"""


def as_user(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned sticky directory every user can write, like /tmp."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as two other local users")
    path = Path(tempfile.mkdtemp(prefix="shoal-attack-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as group:
        yield group


def victim_env(runtime: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "XDG_"))}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOME=str(runtime), RELEASE_COOKIE=COOKIE)
    return env


def start_fake_server(procs: Procs, socket_path: Path, capture: Path) -> None:
    capture.touch()
    capture.chmod(0o666)
    fake = procs.start(
        as_user(ATTACKER, sys.executable, "-c", FAKE_SERVER, str(socket_path), str(capture)),
        env=dict(os.environ),
        name="attacker",
    )
    wait_until(lambda: "listening" in fake.output(), 10, message="attacker listening")


def test_a_directory_planted_by_another_user_is_refused_by_node_and_client(
    procs: Procs, shared_dir: Path
) -> None:
    planted = shared_dir / "shoal"  # the victim's default socket directory
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, ATTACKER, ATTACKER)
    capture = shared_dir / "captured"
    start_fake_server(procs, planted / f"hi@{HOST}.sock", capture)
    os.chown(planted / f"hi@{HOST}.sock", ATTACKER, ATTACKER)

    # The node refuses the directory, says how to fix it, and still starts.
    env = {**victim_env(shared_dir), "NODE_HOST": HOST, "PORT": "4000", "TOPOLOGY_TYPE": "static"}
    node = HiNode(procs.start(as_user(VICTIM, HI), env=env, name="victim"), HOST, 4000, "hi")
    node.wait_ready()
    output = node.proc.output()
    assert "refusing to use it" in output and f"rm -rf {planted}" in output, output

    # The client refuses too, before sending a byte: status, and remote with a secret typed.
    status = subprocess.run(
        as_user(VICTIM, SHOAL, "status"),
        env=victim_env(shared_dir),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode != 0
    assert "not a directory owned by you" in status.stderr, status.stderr
    remote = subprocess.run(
        as_user(VICTIM, SHOAL, "remote", "--node", f"hi@{HOST}"),
        env=victim_env(shared_dir),
        input='print(os.environ["RELEASE_COOKIE"])\n',
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert remote.returncode != 0
    assert "not a directory owned by you" in remote.stderr, remote.stderr
    assert capture.read_bytes() == b"", "the attacker received something"
    assert COOKIE not in remote.stdout + status.stdout


def test_a_socket_of_another_user_in_a_shared_directory_is_refused_by_its_uid(
    procs: Procs, shared_dir: Path
) -> None:
    capture = shared_dir / "captured"
    socket_path = shared_dir / "node.sock"  # e.g. SHOAL_CONTROL_SOCKET=/tmp/node.sock
    start_fake_server(procs, socket_path, capture)
    for argv, stdin in (
        (["status", "--socket", str(socket_path)], None),
        (["remote", "--socket", str(socket_path)], 'print(os.environ["RELEASE_COOKIE"])\n'),
    ):
        result = subprocess.run(
            as_user(VICTIM, SHOAL, *argv),
            env=victim_env(shared_dir),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert f"runs as uid {ATTACKER}, not as you (uid {VICTIM})" in result.stderr
    assert capture.read_bytes() == b"", "the attacker received something"
