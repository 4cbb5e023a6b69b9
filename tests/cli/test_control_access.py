"""Who may use the control socket: another user is kept out twice (the file modes, and the
peer-uid check behind them), and a socket directory found with the wrong mode or owner is
fixed or refused. Needs root (to act as another user), as in CI."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal import Node, Settings
from shoal.control import ControlError, ControlServer, socket_path_for
from tests.support.hi import COOKIE

HOST = "127.0.11.60"
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

# A client that runs as another user: prints the reply, or the error it got.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(b'{"command": "nodes"}\\n')
    print("reply:", s.recv(4096).decode() or "<closed>")
except OSError as exc:
    print("error:", type(exc).__name__)
"""


def as_nobody(path: Path) -> str:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run a client as another user"
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    done = subprocess.run(
        [*argv, python, "-c", CLIENT, str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(open_dir: Path) -> AsyncIterator[Node]:
    settings = Settings(
        cookie=COOKIE,
        host=HOST,
        port=free_port(),
        topology="static",
        control_socket=str(open_dir / "own" / "node.sock"),
    )
    node = Node(settings)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@needs_root
async def test_another_user_is_refused_by_the_modes_and_by_the_peer_uid_check(
    node: Node, open_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = ControlServer(node, open_dir / "node.sock")
    await server.start()
    try:
        # The 0600 socket keeps the other user out at connect().
        out = await asyncio.to_thread(as_nobody, server.path)
        assert out == "error: PermissionError", out
        # With the mode loosened by mistake, the peer-uid check still refuses: no reply.
        server.path.chmod(0o666)
        out = await asyncio.to_thread(as_nobody, server.path)
        assert out in (
            "reply: <closed>",
            "error: ConnectionResetError",
            "error: BrokenPipeError",
        ), out
        assert f"refused a client running as uid {NOBODY}" in caplog.text
    finally:
        await server.stop()


async def test_a_socket_directory_open_to_others_is_made_0700(
    node: Node, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_dir))
    path = socket_path_for(node.name)
    path.parent.mkdir(mode=0o755)
    path.parent.chmod(0o777)  # as found: readable and writable by everyone
    server = ControlServer(node, path)
    await server.start()
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        await server.stop()


@needs_root
async def test_a_socket_directory_owned_by_another_user_is_refused(
    node: Node, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_dir))
    path = socket_path_for(node.name)
    path.parent.mkdir(mode=0o700)
    os.chown(path.parent, NOBODY, NOBODY)  # someone else prepared it
    with pytest.raises(ControlError, match="not a directory owned by uid"):
        await ControlServer(node, path).start()
    assert not path.exists()
