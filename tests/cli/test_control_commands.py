"""What the `shoal` CLI gets from a node's control socket, driven in-process.

A real node (its own control server, on a real unix socket) answers the
commands behind `shoal status`, `nodes`, `ping`, `connect`, `jobs`, `run-job`,
`jobs add/pause/resume/remove/history` and `remote`; the client side
(`ControlClient`, the directory checks, `live_sockets`) is exercised against
it. The process-level tests in test_shoal_cli.py check the CLI on top of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal import Node, RunContext, Settings, control
from shoal.control import (
    COMMANDS,
    ControlClient,
    ControlError,
    ControlHost,
    ControlServer,
    check_trusted_dir,
    command,
    live_sockets,
    socket_dir,
    socket_path_for,
)
from tests.support.procs import async_wait_until

HOSTS = ("127.0.11.70", "127.0.11.71")
PORT = 4370  # every node on the same mesh port, as the contract says
COOKIE = "control-commands-cookie-5e4d3c2b1a09f8e7"
ONE_MIB = 1024 * 1024  # the documented bound on one request line
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@contextlib.contextmanager
def refused(code: int, message: str) -> Iterator[None]:
    """A ControlError with this errno and exactly this text: `shoal` prints the text, and the
    errno tells it "no node running" (ENOENT, ECONNREFUSED) from other failures."""
    with pytest.raises(ControlError) as raised:
        yield
    assert (raised.value.errno, raised.value.strerror) == (code, message)


@pytest.fixture(autouse=True)
def stdlib_displayhook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's first remote session installs the console's hook itself: one left by an
    earlier test would hide a broken install."""
    monkeypatch.setattr(sys, "displayhook", sys.__displayhook__)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="shc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings(host: str, run_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        cookie=COOKIE,
        host=host,
        port=PORT,
        topology="static",
        handshake_timeout=0.2,
        control_socket=str(run_dir / host / "node.sock"),
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def node(run_dir: Path) -> AsyncIterator[Node]:
    """A started node with its own control socket, and a job and a task of its code."""
    node = Node(settings(HOSTS[0], run_dir))

    @node.job("0 0 1 1 *", name="report", run_strategy="local")
    async def report(ctx: RunContext) -> None:
        pass

    @node.jobs.task("tidy")
    async def tidy(ctx: RunContext) -> None:
        pass

    await node.start()
    assert node.control is not None
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def peer(run_dir: Path) -> AsyncIterator[Node]:
    """A second started node that `node` does not know yet."""
    other = Node(settings(HOSTS[1], run_dir))
    await other.start()
    try:
        yield other
    finally:
        await other.stop()


class Conn:
    """One client connection: JSON lines out, JSON lines in, each read with a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=4 * ONE_MIB)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: Any) -> None:
        await self.send_raw(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        assert line, "the node closed the connection"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def closed(self) -> bool:
        """True when the node closes the connection (within a deadline)."""
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def ask(node: Node, name: str, *args: Any) -> dict[str, Any]:
    assert node.control is not None
    conn = await Conn.open(node.control.path)
    try:
        await conn.send({"command": name, "args": list(args)})
        return await conn.receive()
    finally:
        conn.close()


def failed(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False and reply["code"] == "failed", reply
    assert set(reply) == {"ok", "code", "error"}, reply
    return str(reply["error"])


def result(reply: dict[str, Any]) -> Any:
    assert reply["ok"] is True and set(reply) == {"ok", "result"}, reply
    return reply["result"]


# the commands -------------------------------------------------------------------------
async def test_status_and_nodes_describe_the_node_and_its_peers(node: Node, peer: Node) -> None:
    status = result(await ask(node, "status"))
    assert status["node"] == node.name and status["nodes"] == []
    assert status["topology"] == "static" and status["cookie"] == node.cookie_fingerprint
    assert [job["name"] for job in status["jobs"]] == ["report"]
    assert result(await ask(node, "nodes")) == []
    assert result(await ask(node, "connect", peer.name)) == {"node": peer.name}
    assert result(await ask(node, "nodes")) == [peer.name]
    assert result(await ask(node, "status"))["nodes"] == [peer.name]


async def test_ping_answers_for_a_peer_and_for_the_node_itself(node: Node, peer: Node) -> None:
    assert "not connected to" in failed(await ask(node, "ping", peer.name))
    result(await ask(node, "connect", peer.settings.host + ":" + str(peer.settings.port)))
    for target in (peer.name, node.name):
        answer = result(await ask(node, "ping", target))
        assert answer["node"] == target
        assert isinstance(answer["rtt_ms"], float) and 0 < answer["rtt_ms"] < 5000
        assert answer["rtt_ms"] == round(answer["rtt_ms"], 3)  # in ms, to the microsecond
    for args in ([], [peer.name, node.name]):
        assert failed(await ask(node, "ping", *args)) == "ping takes exactly one node name"


async def test_connect_reports_an_unreachable_or_unparsable_address(node: Node) -> None:
    nobody = f"hi@127.0.11.79:{free_port('127.0.11.79')}"
    assert failed(await ask(node, "connect", nobody)).startswith("could not connect to hi@")
    bad = failed(await ask(node, "connect", "hi@[::1"))
    assert "Error" not in bad.split(":")[0], bad  # the user's mistake, not a crash
    assert failed(await ask(node, "connect")) == "connect takes exactly one node name"
    assert result(await ask(node, "nodes")) == []


async def test_jobs_and_run_job(node: Node) -> None:
    (row,) = result(await ask(node, "jobs"))
    assert (row["name"], row["schedule"], row["defined"]) == ("report", "0 0 1 1 *", "code")
    ran = result(await ask(node, "run-job", "report"))
    assert (ran["job"], ran["node"], ran["status"]) == ("report", node.name, "ok")
    assert failed(await ask(node, "run-job", "nope")) == "no job named 'nope'"
    assert failed(await ask(node, "run-job")) == "run-job takes exactly one job name"


def active(node: Node, name: str) -> bool:
    (job,) = [job for job in node.scheduler.list_jobs() if job.name == name]
    return job.active


async def test_jobs_added_paused_resumed_and_removed(node: Node) -> None:
    added = result(await ask(node, "jobs-add", "extra", "0 0 1 1 *", "tidy", "max_attempts=2"))
    assert (added["name"], added["task"], added["active"]) == ("extra", "tidy", True)
    assert added["options"] == {"max_attempts": 2}
    assert "extra" in [row["name"] for row in result(await ask(node, "jobs"))]
    assert result(await ask(node, "jobs-pause", "extra"))["active"] is False
    assert active(node, "extra") is False
    assert result(await ask(node, "jobs-resume", "extra"))["active"] is True
    assert active(node, "extra") is True
    assert result(await ask(node, "jobs-remove", "extra"))["deleted"] is True
    assert "extra" not in node.scheduler
    # A job defined in code is paused and resumed the same way, but not removed.
    assert result(await ask(node, "jobs-pause", "report"))["active"] is False
    assert result(await ask(node, "jobs-resume", "report"))["active"] is True
    assert "defined in code" in failed(await ask(node, "jobs-remove", "report"))
    for verb in ("remove", "pause", "resume"):
        assert failed(await ask(node, f"jobs-{verb}", "nope")) == "no job named 'nope'"
        assert failed(await ask(node, f"jobs-{verb}")) == f"jobs-{verb} takes exactly one job name"


async def test_jobs_add_refuses_bad_definitions_with_the_reason(node: Node) -> None:
    usage = "jobs-add takes NAME SCHEDULE TASK [KEY=VALUE ...]"
    assert failed(await ask(node, "jobs-add", "x", "* * * * *")) == usage
    assert "no task named 'nope'" in failed(await ask(node, "jobs-add", "x", "* * * * *", "nope"))
    assert "KEY=VALUE" in failed(await ask(node, "jobs-add", "x", "* * * * *", "tidy", "color=red"))
    assert "'x'" in failed(await ask(node, "jobs-add", "x", "61 * * * *", "tidy"))
    assert "already exists" in failed(await ask(node, "jobs-add", "report", "* * * * *", "tidy"))
    assert "x" not in node.scheduler
    # The smallest valid request works: three arguments, no options.
    assert result(await ask(node, "jobs-add", "x", "* * * * *", "tidy"))["options"] == {}


async def test_jobs_history_lists_the_newest_runs_up_to_the_limit(node: Node) -> None:
    assert result(await ask(node, "jobs-history", "report")) == []
    for _ in range(52):
        await node.jobs.run_now("report")
    runs = result(await ask(node, "jobs-history", "report"))
    assert len(runs) == 50  # the default limit
    assert all(run["job"] == "report" and run["node"] == node.name for run in runs)
    starts = [run["started_at"] for run in runs]
    assert starts == sorted(starts, reverse=True)
    assert len(result(await ask(node, "jobs-history", "report", "2"))) == 2
    assert len(result(await ask(node, "jobs-history", "report", "1"))) == 1
    usage = "jobs-history takes NAME [LIMIT]"
    for args in ([], ["report", "two"], ["report", "2", "3"]):
        assert failed(await ask(node, "jobs-history", *args)) == usage, args
    assert failed(await ask(node, "jobs-history", "nope")) == "no job named 'nope'"


# the protocol ---------------------------------------------------------------------------
async def test_one_connection_serves_requests_until_the_client_closes(node: Node) -> None:
    assert node.control is not None
    conn = await Conn.open(node.control.path)
    try:
        await conn.send_raw(b'{"command": "nodes"}\n{"command": "status", "args": []}\n')
        assert result(await conn.receive()) == []
        assert result(await conn.receive())["node"] == node.name
        # A malformed request gets an error and the connection goes on.
        malformed: list[dict[str, Any]] = [{"command": 5}, {"command": "nodes", "args": "x"}]
        for request in [*malformed, {"args": []}]:
            await conn.send(request)
            reply = await conn.receive()
            assert reply == {
                "ok": False,
                "code": "bad-request",
                "error": 'expected {"command": str, "args": []}',
            }
        await conn.send({"command": "nodes"})
        assert result(await conn.receive()) == []
    finally:
        conn.close()


async def test_a_request_that_is_not_an_object_is_refused_and_the_connection_closed(
    node: Node,
) -> None:
    assert node.control is not None
    for line in (b"[1, 2]\n", b"not json\n", b'"nodes"\n'):
        conn = await Conn.open(node.control.path)
        try:
            await conn.send_raw(line)
            reply = await conn.receive()
            assert reply == {
                "ok": False,
                "code": "bad-request",
                "error": "a request is one JSON object per line",
            }
            assert await conn.closed()
        finally:
            conn.close()


async def test_a_request_line_is_bounded_at_one_mebibyte(node: Node) -> None:
    @command("echo-test", "echo the arguments back")
    def echo(_node: ControlHost, args: list[str]) -> list[str]:
        return args

    assert node.control is not None
    node.control.commands["echo-test"] = COMMANDS.pop("echo-test")
    envelope = len(json.dumps({"command": "echo-test", "args": [""]}).encode()) + 1
    fits = "x" * (ONE_MIB - envelope)
    reply = await ask(node, "echo-test", fits)
    assert reply == {"ok": True, "result": [fits]}
    # One byte more, and the node answers with the bound and hangs up.
    conn = await Conn.open(node.control.path)
    try:
        await conn.send({"command": "echo-test", "args": [fits + "xx"]})
        reply = await conn.receive()
        assert reply == {
            "ok": False,
            "code": "bad-request",
            "error": f"request longer than {ONE_MIB} bytes",
        }
        assert await conn.closed()
    finally:
        conn.close()
    # Arguments arrive as strings, whatever JSON type the client sent.
    assert result(await ask(node, "echo-test", 1, None, True)) == ["1", "None", "True"]
    assert result(await ask(node, "echo-test")) == []
    # No reply is longer than the bound either: the client reads no more.
    reply_envelope = len(json.dumps({"ok": True, "result": ""})) + 1
    node.control.commands["sized-test"] = (lambda _node, args: "x" * int(args[0]), "")
    longest = ONE_MIB - reply_envelope
    assert len(result(await ask(node, "sized-test", longest))) == longest
    too_long = failed(await ask(node, "sized-test", longest + 1))
    assert too_long == (
        f"the reply is {ONE_MIB + 1} bytes, more than a control socket reply may be "
        f"({ONE_MIB}); ask for less"
    )
    # A result JSON cannot carry is sent as text rather than dropping the connection.
    node.control.commands["path-test"] = (lambda _node, args: Path("/x", *args), "")
    assert result(await ask(node, "path-test", "y")) == "/x/y"


async def test_unknown_commands_and_failing_commands_are_answered_not_crashed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.control is not None
    reply = await ask(node, "no-such")
    assert reply["ok"] is False and reply["code"] == "unknown-command"
    known = ", ".join(sorted([*COMMANDS, "remote"]))
    assert reply["error"] == f"unknown command 'no-such' (this node knows: {known})"

    async def hangs(_node: ControlHost, _args: list[str]) -> None:
        await asyncio.Event().wait()

    def breaks(_node: ControlHost, args: list[str]) -> None:
        raise {"value": ValueError, "conn": ConnectionResetError, "time": TimeoutError}[args[0]](
            *args[1:]
        )

    async def breaks_later(_node: ControlHost, args: list[str]) -> None:
        await asyncio.sleep(0)
        breaks(_node, args)

    node.control.commands.update({"hangs": (hangs, ""), "breaks": (breaks, "")})
    node.control.commands["breaks-later"] = (breaks_later, "")
    for name in ("breaks", "breaks-later"):
        assert failed(await ask(node, name, "value", "boom")) == "ValueError: boom"
        assert failed(await ask(node, name, "conn", "gone")) == "gone"
        assert failed(await ask(node, name, "time")) == "TimeoutError"
    monkeypatch.setattr(control, "COMMAND_TIMEOUT", 0.2)
    assert failed(await ask(node, "hangs")) == "TimeoutError"
    assert result(await ask(node, "nodes")) == []  # the server goes on


# the socket's life ------------------------------------------------------------------------
async def test_stop_closes_sessions_and_removes_only_its_own_socket(
    node: Node, run_dir: Path
) -> None:
    path = run_dir / "own" / "node.sock"
    first = ControlServer(node, path)
    await first.start()
    conn = await Conn.open(path)
    await conn.send({"command": "remote"})
    assert result(await conn.receive()) == {"node": node.name}
    await conn.receive()  # the banner
    path.unlink()  # someone removed the file, and a second server took the path
    second = ControlServer(node, path)
    await second.start()
    try:
        await first.stop()
        assert await conn.closed(), "an open session outlived its server"
        assert path.exists() and stat.S_ISSOCK(path.stat().st_mode)
        assert result(await ask_path(path, "nodes")) == []
        await first.stop()  # twice is fine
    finally:
        conn.close()
        await second.stop()
    assert not path.exists()
    await ControlServer(node, path).stop()  # never started: nothing to do
    third = ControlServer(node, path)
    await third.start()
    path.unlink()  # removed under a running server: stop still ends it quietly
    await third.stop()


async def test_a_finished_connection_leaves_nothing_behind(node: Node) -> None:
    assert node.control is not None
    for _ in range(3):
        assert result(await ask(node, "nodes")) == []
    server = node.control
    await async_wait_until(lambda: not server._sessions, timeout=5, message="sessions ended")


async def ask_path(path: Path, name: str) -> dict[str, Any]:
    conn = await Conn.open(path)
    try:
        await conn.send({"command": name})
        return await conn.receive()
    finally:
        conn.close()


async def test_a_directory_of_the_users_choosing_keeps_its_mode(node: Node, run_dir: Path) -> None:
    """SHOAL_CONTROL_SOCKET in an existing directory: the node does not chmod it. In a new
    one: the directories are made, 0700."""
    chosen = run_dir / "chosen"
    chosen.mkdir()
    os.chmod(chosen, 0o750)
    server = ControlServer(node, chosen / "node.sock")
    await server.start()
    try:
        assert stat.S_IMODE(chosen.stat().st_mode) == 0o750
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    finally:
        await server.stop()
    deep = ControlServer(node, run_dir / "new" / "deeper" / "node.sock")
    await deep.start()
    try:
        assert stat.S_IMODE(deep.path.parent.stat().st_mode) == 0o700
        assert result(await ask_path(deep.path, "nodes")) == []
    finally:
        await deep.stop()


async def test_a_node_listens_where_it_is_configured_or_in_the_per_user_place(
    node: Node, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.control is not None
    assert node.control.path == Path(str(node.settings.control_socket))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    default = Node(settings(HOSTS[1], run_dir, control_socket=None))
    await default.start()
    try:
        assert default.control is not None
        assert default.control.path == run_dir / "shoal" / f"{default.name}.sock"
        assert result(await ask(default, "status"))["node"] == default.name
    finally:
        await default.stop()


async def test_the_per_user_directory_is_created_0700_and_checked(
    node: Node, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    assert socket_dir() == run_dir / "shoal"
    assert socket_path_for("odd/name@h") == run_dir / "shoal" / "odd_name@h.sock"  # no subdir
    server = ControlServer(node, socket_dir() / "n.sock")
    await server.start()
    try:
        info = socket_dir().stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert list(live_sockets()) == [server.path]
    finally:
        await server.stop()
    (socket_dir() / "file.sock").write_text("not a socket")
    file = socket_dir() / "file.sock"
    with refused(errno.EEXIST, f"{file} exists and is not a socket; not replacing it"):
        await ControlServer(node, file).start()
    # A symlink planted where the directory should be is not followed.
    shutil.rmtree(socket_dir())
    (run_dir / "elsewhere").mkdir(mode=0o700)
    socket_dir().symlink_to(run_dir / "elsewhere")
    uid = os.getuid()
    with refused(
        errno.EPERM,
        f"{socket_dir()} is not a directory owned by uid {uid} (owner: uid {uid}); refusing to "
        f"use it. Someone else may have created it: remove it (as root: `rm -rf {socket_dir()}`"
        "), or set XDG_RUNTIME_DIR or SHOAL_CONTROL_SOCKET to a place of your own",
    ):
        await ControlServer(node, socket_dir() / "n.sock").start()


async def test_a_socket_a_running_node_listens_on_is_not_taken_over(node: Node) -> None:
    assert node.control is not None
    path = node.control.path
    message = f"{path} is in use by another running node (set SHOAL_CONTROL_SOCKET)"
    with refused(errno.EADDRINUSE, message):
        await ControlServer(node, path).start()
    assert result(await ask(node, "nodes")) == []


# the client side ----------------------------------------------------------------------------
async def test_the_client_talks_to_the_node(node: Node) -> None:
    assert node.control is not None
    path = node.control.path

    def talk() -> tuple[dict[str, Any], dict[str, Any]]:
        with ControlClient(path) as client:
            return client.request("nodes"), client.request("ping", node.name)

    nodes, ping = await asyncio.to_thread(talk)
    assert nodes == {"ok": True, "result": []}
    assert ping["ok"] is True and ping["result"]["node"] == node.name


async def test_the_client_refuses_a_directory_others_could_have_planted(run_dir: Path) -> None:
    missing = run_dir / "missing"
    with refused(errno.ENOENT, f"cannot open {missing}: No such file or directory"):
        check_trusted_dir(missing)
    for mode in (0o770, 0o702):
        os.chmod(run_dir, mode)
        with refused(
            errno.EPERM,
            f"{run_dir} is writable by other users (mode {mode:o}): not connecting; "
            f"`chmod 700 {run_dir}` if it is yours",
        ):
            check_trusted_dir(run_dir)
    for mode in (0o700, 0o755):
        os.chmod(run_dir, mode)
        check_trusted_dir(run_dir)
    # A sticky directory of root's, like /tmp, is accepted (the server's uid is checked).
    check_trusted_dir(Path("/tmp"))
    uid = os.getuid()
    (run_dir / "file").write_text("")
    with refused(errno.EPERM, planted(run_dir / "file", uid)):
        check_trusted_dir(run_dir / "file")
    if uid == 0:  # as root: a directory another user owns
        os.chown(run_dir, NOBODY, NOBODY)
        with refused(errno.EPERM, planted(run_dir, NOBODY)):
            check_trusted_dir(run_dir)


def planted(path: Path, owner: int) -> str:
    return (
        f"{path} is not a directory owned by you (uid {os.getuid()}) but by uid {owner}: "
        "another user may be impersonating the node; not connecting"
    )


# The system's python, which any user can run (the venv's may sit in a private directory).
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SERVER_AS_NOBODY = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
listener.listen()
print("listening", flush=True)
conn, _ = listener.accept()
conn.settimeout(10)
got = b""
while chunk := conn.recv(4096):
    got += chunk
print("received", len(got), flush=True)
"""


@needs_root
async def test_the_client_refuses_a_socket_served_by_another_user(run_dir: Path) -> None:
    """In a shared sticky directory (as /tmp is) another user can listen where we look: the
    server's uid stops the client, before it sends a byte."""
    os.chmod(run_dir, 0o755)
    shared = run_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = shared / "n.sock"
    python = PYTHON
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run as another user"
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python]
    server = await asyncio.create_subprocess_exec(
        *argv, "-c", SERVER_AS_NOBODY, str(path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), 10) == b"listening\n"
        message = (
            f"the process behind {path} runs as uid {NOBODY}, not as you (uid {os.getuid()}); "
            "not talking to it"
        )
        with refused(errno.EPERM, message):
            await asyncio.to_thread(ControlClient, path)
        assert await asyncio.wait_for(server.stdout.readline(), 10) == b"received 0\n"
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


def serve_once(path: Path, answer: bytes | None) -> threading.Thread:
    """A stand-in server on a real socket: reads one request, writes `answer` and hangs up
    (None: waits up to 5 s for the client to hang up)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        with listener:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                if answer is None:
                    with contextlib.suppress(TimeoutError):
                        conn.recv(1)
                    return
                conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


NOT_A_REPLY = (errno.EPROTO, "the node sent something that is not a reply")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", (errno.ECONNRESET, "the node closed {path}")),
        (b"[1]\n", NOT_A_REPLY),
        (b"7\n", NOT_A_REPLY),
        (
            b'{"ok": "' + b"x" * ONE_MIB + b'"}\n',
            (errno.EMSGSIZE, f"the node's reply is longer than {ONE_MIB} bytes"),
        ),
        (  # 1 MiB of JSON and its newline are read; one byte more is not
            b'{"ok": "' + b"x" * (ONE_MIB + 2 - len(b'{"ok": ""}\n')) + b'"}\n',
            (errno.EMSGSIZE, f"the node's reply is longer than {ONE_MIB} bytes"),
        ),
    ],
)
def test_the_client_reports_a_node_that_hangs_up_or_answers_nonsense(
    run_dir: Path, answer: bytes, error: tuple[int, str]
) -> None:
    path = run_dir / "s.sock"
    thread = serve_once(path, answer)
    with ControlClient(path, timeout=5) as client:
        with refused(error[0], error[1].format(path=path)):
            client.request("status")
    thread.join(5)


def test_the_client_accepts_a_reply_of_exactly_the_bound(run_dir: Path) -> None:
    envelope = b'{"ok": true, "result": ""}\n'
    longest = b'{"ok": true, "result": "' + b"x" * (ONE_MIB - len(envelope)) + b'"}\n'
    assert len(longest) == ONE_MIB
    thread = serve_once(run_dir / "s.sock", longest)
    with ControlClient(run_dir / "s.sock", timeout=5) as client:
        assert len(client.request("status")["result"]) == ONE_MIB - len(envelope)
    thread.join(5)


def test_the_client_gives_up_on_a_node_that_does_not_answer(run_dir: Path) -> None:
    thread = serve_once(run_dir / "s.sock", None)  # reads, never answers (for 5 s)
    with ControlClient(run_dir / "s.sock", timeout=0.3) as client:
        with pytest.raises(TimeoutError):
            client.request("status")
    thread.join(10)


def test_a_node_that_accepts_nobody_does_not_hang_the_listing(run_dir: Path) -> None:
    """`shoal` lists the running nodes by connecting to each socket: a hung node whose
    backlog is full is left out after a second, not waited for."""
    path = run_dir / "hung.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        for _ in range(64):  # fill the backlog: the next connect would block
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
        else:
            pytest.fail("the backlog never filled")
        found: list[list[Path]] = []
        lister = threading.Thread(target=lambda: found.append(list(live_sockets(run_dir))))
        lister.start()
        lister.join(5)
        assert not lister.is_alive(), "listing the sockets hangs on a node that accepts nobody"
        assert found == [[]]
    finally:
        listener.close()  # also frees a lister still waiting
        for client in queued:
            client.close()


def test_the_client_reports_a_socket_nobody_listens_on(run_dir: Path) -> None:
    missing = run_dir / "s.sock"
    with refused(errno.ENOENT, f"cannot open {missing}: No such file or directory"):
        ControlClient(missing)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(run_dir / "dead.sock"))
    dead.close()
    with refused(errno.ECONNREFUSED, f"cannot open {run_dir / 'dead.sock'}: Connection refused"):
        ControlClient(run_dir / "dead.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(run_dir / "live.sock"))
    live.listen()
    try:
        assert list(live_sockets(run_dir)) == [run_dir / "live.sock"]
    finally:
        live.close()
    assert list(live_sockets(run_dir / "missing")) == []


# the remote console ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def remote(node: Node) -> AsyncIterator[Conn]:
    """A `shoal remote` session, past its banner. Opened inside the test itself: pytest puts
    its own sys.stdout back between a test's phases, over the session's routing."""
    assert node.control is not None
    conn = await Conn.open(node.control.path)
    await conn.send({"command": "remote"})
    assert result(await conn.receive()) == {"node": node.name}
    banner = await conn.receive()
    assert banner["more"] is False and banner["closed"] is False
    lines = banner["output"].splitlines()
    assert lines[0] == (
        f"Python {sys.version.split()[0]} asyncio console inside {node.name} (pid {os.getpid()})."
    )
    assert lines[1] == "`node` is the running shoal.Node; `await` works at the top level."
    assert lines[2] == (
        "Code runs on the node's event loop: blocking calls stall the node. "
        "Ctrl-D (or exit()) leaves; the node keeps running."
    )
    try:
        yield conn
    finally:
        conn.close()


async def typed(conn: Conn, line: str) -> dict[str, Any]:
    await conn.send({"line": line})
    return await conn.receive()


async def test_remote_runs_code_on_the_node_and_shows_results(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    async with remote(node) as console:
        await _remote_runs_code(console, node)
        print("the node's own output")  # outside the session: where it always went
        print("the node's own error", file=sys.stderr)
    captured = capsys.readouterr()  # and nothing of the session
    assert (captured.out, captured.err) == ("the node's own output\n", "the node's own error\n")


async def test_remote_shows_values_on_a_node_without_stdout(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon may have no sys.stdout at all: values still show in the session."""
    monkeypatch.setattr(sys, "stdout", None)
    async with remote(node) as console:
        assert (await typed(console, "6 * 7"))["output"] == "42\n"
        assert (await typed(console, "_ + 1"))["output"] == "43\n"
        assert (await typed(console, "None"))["output"] == ""


async def _remote_runs_code(console: Conn, node: Node) -> None:
    assert await typed(console, "node.name") == {
        "output": repr(node.name) + "\n",
        "more": False,
        "closed": False,
    }
    assert (await typed(console, "_ + '!'"))["output"] == repr(node.name + "!") + "\n"
    assert (await typed(console, "None"))["output"] == ""
    assert (await typed(console, "await asyncio.sleep(0, 'slept')"))["output"] == "'slept'\n"
    assert (await typed(console, "print('out'); import sys; _ = sys.stderr.write('err\\n')"))[
        "output"
    ] == "out\nerr\n"
    # A block needs more lines; an empty line runs it.
    assert await typed(console, "for i in range(2):") == {
        "output": "",
        "more": True,
        "closed": False,
    }
    assert (await typed(console, "    print(i)"))["more"] is True
    assert await typed(console, "") == {"output": "0\n1\n", "more": False, "closed": False}
    # What the stdlib REPL gives: the namespace, write()'s count, the stream's attributes.
    assert (await typed(console, "__name__, shoal.__name__"))[
        "output"
    ] == "('__console__', 'shoal')\n"
    assert (await typed(console, "sys.stdout.write('abc')"))["output"] == "abc3\n"
    assert (await typed(console, "sys.stdout.writable()"))["output"] == "True\n"
    # Output of a task the session started also comes to the session.
    await typed(console, "t = asyncio.ensure_future(asyncio.sleep(0)); t.add_done_callback(print)")
    assert "Task finished" in (await typed(console, "await asyncio.sleep(0.01)"))["output"]


async def test_remote_errors_are_shown_and_the_session_goes_on(node: Node) -> None:
    async with remote(node) as console:
        await _remote_errors(console)


async def _remote_errors(console: Conn) -> None:
    shown = (await typed(console, "1 / 0"))["output"]
    assert "Traceback" in shown and "ZeroDivisionError: division by zero" in shown
    assert 'File "<remote>", line 1' in shown
    # Output longer than a reply may be is cut, with a note, and the session goes on.
    long = (await typed(console, "'x' * 2_000_000"))["output"]
    kept = ONE_MIB // 16
    cut = 2_000_003 - kept  # the repr's quotes and the newline count too
    assert long == "'" + "x" * (kept - 1) + f"\n[output cut: {cut} more characters not shown]\n"
    assert "SyntaxError" in (await typed(console, "1 +"))["output"]
    await console.send({"line": 7})  # not a line: ignored
    await console.send({"other": True})
    assert (await typed(console, "40 + 2"))["output"] == "42\n"


async def test_remote_interrupt_at_the_prompt_drops_the_unfinished_block(node: Node) -> None:
    async with remote(node) as console:
        await _remote_interrupt(console)


async def _remote_interrupt(console: Conn) -> None:
    assert (await typed(console, "if True:"))["more"] is True
    await console.send({"interrupt": True})
    assert await console.receive() == {
        "output": "KeyboardInterrupt\n",
        "more": False,
        "closed": False,
    }
    assert (await typed(console, "'fresh'"))["output"] == "'fresh'\n"


async def test_remote_exit_and_hang_up_end_the_session(node: Node) -> None:
    async with remote(node) as console:
        assert await typed(console, "raise SystemExit") == {
            "output": "",
            "more": False,
            "closed": True,
        }
        assert await console.closed()
    routed, routed_err, hook = sys.stdout, sys.stderr, sys.displayhook
    for stream in (routed, routed_err):
        assert isinstance(stream, control._Routed)
        assert not isinstance(stream.original, control._Routed)
    # Hanging up while code runs cancels that code.
    async with remote(node) as conn:
        await _hang_up_while_running(conn, node)
    # Sessions share one routing of the process's streams: no chain grows per session.
    assert (sys.stdout, sys.stderr, sys.displayhook) == (routed, routed_err, hook)
    # A request that is not one, while code runs: refused, the session ends, the code stops.
    async with remote(node) as conn:
        await conn.send({"line": "node.held = asyncio.get_running_loop().create_future()"})
        await conn.receive()
        await conn.send({"line": "await node.held"})
        await conn.send_raw(b"not json\n")
        assert await conn.receive() == {
            "ok": False,
            "code": "bad-request",
            "error": "a request is one JSON object per line",
        }
        assert await conn.receive() == {"output": "", "more": False, "closed": True}
        assert await conn.closed()
        held = node.held  # type: ignore[attr-defined]
        await async_wait_until(held.cancelled, timeout=5, message="the running code cancelled")


async def _hang_up_while_running(conn: Conn, node: Node) -> None:
    await conn.send({"line": "node.held = asyncio.get_running_loop().create_future()"})
    await conn.receive()
    await conn.send({"line": "await node.held"})
    conn.writer.write_eof()
    held = node.held  # type: ignore[attr-defined]
    await async_wait_until(held.cancelled, timeout=5, message="the running code cancelled")


async def test_hanging_up_while_code_runs_ends_the_session_after_that_code_has_stopped(
    node: Node,
) -> None:
    """The session's last message carries what the cancelled code's cleanup printed: the
    session ends once that code has stopped, not while it still runs."""
    async with remote(node) as conn:
        block = ["async def slow():", "    try:", "        await asyncio.sleep(60)"]
        block += ["    finally:", "        print('cleaned up')"]
        for line in block:
            assert (await typed(conn, line))["more"] is True
        assert await typed(conn, "") == {"output": "", "more": False, "closed": False}
        await conn.send({"line": "await slow()"})
        conn.writer.write_eof()
        assert await conn.receive() == {"output": "cleaned up\n", "more": False, "closed": True}
        assert await conn.closed()


async def test_remote_refuses_a_request_that_is_not_one_and_closes(node: Node) -> None:
    async with remote(node) as console:
        await console.send_raw(b"[]\n")
        assert await console.receive() == {
            "ok": False,
            "code": "bad-request",
            "error": "a request is one JSON object per line",
        }
        assert await console.closed()
