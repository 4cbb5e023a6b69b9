"""The control socket in-process: permissions, stale files, the protocol's limits."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import Node, Settings
from shoal.control import COMMANDS, MAX_LINE, ControlError, ControlServer, command, socket_path_for

HOST = "127.0.11.50"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    settings = Settings(
        cookie="control-test-cookie-7c6b5a4938271605",
        host=HOST,
        port=free_port(),
        topology="static",
        control_socket=str(tmp_path / "run" / "node.sock"),
    )
    node = Node(settings)
    await node.start()
    # These tests drive their own ControlServer on the configured path.
    assert node.control is not None
    await node.control.stop()
    node.control = None
    try:
        yield node
    finally:
        await node.stop()


async def ask(path: Path, request: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=4 * MAX_LINE)
    try:
        writer.write(request)
        await writer.drain()
        reply: dict[str, object] = json.loads(await asyncio.wait_for(reader.readline(), 5))
        return reply
    finally:
        writer.close()


async def test_socket_is_0600_in_a_0700_directory_and_removed_on_stop(node: Node) -> None:
    server = ControlServer(node)
    await server.start()
    try:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(server.path.stat().st_mode)
        assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    finally:
        await server.stop()
    assert not server.path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(node: Node) -> None:
    first = ControlServer(node)
    first.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(first.path))  # a socket file nobody listens on: a node that died
    stale.close()
    await first.start()
    try:
        assert (await ask(first.path, b'{"command": "nodes"}\n')) == {"ok": True, "result": []}
        with pytest.raises(ControlError, match="in use by another running node"):
            await ControlServer(node).start()
    finally:
        await first.stop()


async def test_default_path_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert socket_path_for("hi@10.0.0.2") == tmp_path / "shoal" / "hi@10.0.0.2.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_path_for("hi@10.0.0.2") == Path(f"/tmp/shoal-{os.getuid()}/hi@10.0.0.2.sock")


async def test_bad_requests_get_clear_errors(node: Node) -> None:
    server = ControlServer(node)
    await server.start()
    try:
        unknown = await ask(server.path, b'{"command": "no-such"}\n')
        assert unknown["ok"] is False and unknown["code"] == "unknown-command"
        assert "status" in str(unknown["error"])
        garbage = await ask(server.path, b"not json\n")
        assert garbage["code"] == "bad-request"
        huge = await ask(server.path, b'{"command": "' + b"x" * (MAX_LINE + 10) + b'"}\n')
        assert huge["code"] == "bad-request" and "longer than" in str(huge["error"])
        bad_ping = await ask(server.path, b'{"command": "ping", "args": ["x@127.0.11.99"]}\n')
        assert bad_ping["ok"] is False and "not connected" in str(bad_ping["error"])
    finally:
        await server.stop()


async def test_commands_can_be_added(node: Node) -> None:
    @command("echo-test", "echo the arguments back")
    async def echo(_node: Node, args: list[str]) -> list[str]:
        return args

    server = ControlServer(node)
    await server.start()
    try:
        reply = await ask(server.path, b'{"command": "echo-test", "args": ["a", "b"]}\n')
        assert reply == {"ok": True, "result": ["a", "b"]}
    finally:
        await server.stop()
        COMMANDS.pop("echo-test")


async def test_remote_session_interrupt_cancels_running_code(node: Node) -> None:
    server = ControlServer(node)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(server.path))

    async def send(message: dict[str, object]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()

    async def receive() -> dict[str, object]:
        reply: dict[str, object] = json.loads(await asyncio.wait_for(reader.readline(), 5))
        return reply

    try:
        await send({"command": "remote"})
        assert (await receive())["result"] == {"node": node.name}
        assert "asyncio console" in str((await receive())["output"])
        await send({"line": "await asyncio.sleep(3600)"})
        await send({"interrupt": True})  # Ctrl-C while it runs
        assert (await receive())["output"] == "KeyboardInterrupt\n"
        await send({"line": "print('still', 'here')"})
        assert (await receive())["output"] == "still here\n"
        await send({"line": "exit()"})
        assert (await receive())["closed"] is True
    finally:
        writer.close()
        await server.stop()
