"""The control socket: how `shoal status`, `shoal ping`, `shoal remote` reach a running node.

A unix socket, mode 0600 inside a 0700 directory, so only the node's user (and
root) can open it; nothing here listens on the network. The protocol is
newline-delimited JSON, one request and one response per line:

    -> {"command": "ping", "args": ["hi@10.0.0.3"]}
    <- {"ok": true, "result": {"node": "hi@10.0.0.3", "rtt_ms": 0.41}}
    <- {"ok": false, "code": "unknown-command", "error": "..."}

`remote` switches the connection into a console session: the client sends
`{"line": "..."}` (or `{"interrupt": true}` for Ctrl-C) and gets
`{"output": "...", "more": false, "closed": false}` back, `more` meaning
"continue the statement" and `closed` that the session ended (`exit()`).
The code runs on the node's own event loop with `node` bound, so
top-level `await` works, like the Elixir release's `remote` and
`python -m asyncio`.

Add a command with `@command("name", "help")` on a function
`(node, args) -> result` (sync or async, result JSON-serialisable); raise
`CommandError` for a message the user should see.
"""

from __future__ import annotations

import ast
import asyncio
import code
import contextlib
import contextvars
import errno
import inspect
import io
import json
import logging
import os
import socket
import stat
import struct
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from shoal.jobdefs import parse_options
from shoal.messaging import RemoteError
from shoal.scheduler import SchedulerError

if TYPE_CHECKING:
    from shoal.config import Settings
    from shoal.jobs import ClusterJobs
    from shoal.scheduler import Scheduler

log = logging.getLogger("shoal.control")

# A request line longer than this is refused and the connection closed; no reply is longer
# either (a longer result is an error, longer console output is cut).
MAX_LINE = 1024 * 1024
# Console output kept when a reply would be too long: fits in MAX_LINE however JSON escapes it.
_OUTPUT_KEPT = MAX_LINE // 16
# A control command that takes longer than this fails instead of hanging the client.
COMMAND_TIMEOUT = 30.0


class ControlHost(Protocol):
    """What the control socket uses of its node: a `shoal.Node` is one."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def scheduler(self) -> Scheduler: ...
    @property
    def jobs(self) -> ClusterJobs: ...

    def nodes(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...

    async def ping(self, node: str, timeout: float = 5.0) -> float: ...

    async def connect(self, target: str) -> str: ...


Command = Callable[[ControlHost, list[str]], Any]


class CommandError(Exception):
    """A command failed in a way the user should be told about (no traceback)."""


class ControlError(OSError):
    """The control socket cannot be created or reached; the message says why."""


COMMANDS: dict[str, tuple[Command, str]] = {}


def command(name: str, help: str) -> Callable[[Command], Command]:
    """Register a control command under `name` (for every ControlServer)."""

    def register(func: Command) -> Command:
        COMMANDS[name] = (func, help)
        return func

    return register


# where the socket lives ------------------------------------------------------
def socket_dir() -> Path:
    """`$XDG_RUNTIME_DIR/shoal`, else `/tmp/shoal-<uid>`: per-user, never shared."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "shoal"
    return Path("/tmp") / f"shoal-{os.getuid()}"


def socket_path_for(node_name: str) -> Path:
    """The default control socket of the node called `node_name`."""
    return socket_dir() / f"{node_name.replace('/', '_')}.sock"


def node_socket_path(node: ControlHost) -> Path:
    """`settings.control_socket` (`SHOAL_CONTROL_SOCKET`) or the per-user default."""
    configured = node.settings.control_socket
    return Path(configured) if configured else socket_path_for(node.name)


def is_live(path: Path) -> bool:
    """True when something accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _private_dir(path: Path, create_mode: int = 0o700) -> None:
    """Create `path` 0700; refuse a directory someone else owns or others can open."""
    path.mkdir(mode=create_mode, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ControlError(
            errno.EPERM,
            f"{path} is not a directory owned by uid {os.getuid()} (owner: uid {info.st_uid}); "
            f"refusing to use it. Someone else may have created it: remove it (as root: "
            f"`rm -rf {path}`), or set XDG_RUNTIME_DIR or SHOAL_CONTROL_SOCKET to a place "
            "of your own",
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def check_trusted_dir(path: Path) -> None:
    """The client's check before it connects: the directory is ours and closed to others.

    Owned by us (or root), a real directory, and writable by nobody else, so
    no other user can have put a socket of theirs where we look for the node's
    (a sticky root directory such as /tmp is accepted: see check_server_uid).
    """
    try:
        info = path.lstat()
    except OSError as exc:
        raise ControlError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    uid = os.getuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, 0):
        raise ControlError(
            errno.EPERM,
            f"{path} is not a directory owned by you (uid {uid}) but by uid {info.st_uid}: "
            "another user may be impersonating the node; not connecting",
        )
    # A sticky root directory (/tmp) is fine: nobody can replace our files there,
    # and the server's uid is checked once connected.
    sticky_root = info.st_uid == 0 and info.st_mode & stat.S_ISVTX
    if info.st_mode & 0o022 and not sticky_root:
        raise ControlError(
            errno.EPERM,
            f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
            f"not connecting; `chmod 700 {path}` if it is yours",
        )


def check_server_uid(sock: socket.socket, path: Path) -> None:
    """SO_PEERCRED: the process at the other end runs as our own user."""
    if not hasattr(socket, "SO_PEERCRED"):
        return
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise ControlError(
            errno.EPERM,
            f"the process behind {path} runs as uid {uid}, not as you (uid {os.getuid()}); "
            "not talking to it",
        )


def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a node that died; refuse to replace a live one."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    if is_live(path):
        raise ControlError(
            errno.EADDRINUSE, f"{path} is in use by another running node (set SHOAL_CONTROL_SOCKET)"
        )
    path.unlink(missing_ok=True)


# the server -------------------------------------------------------------------
class ControlServer:
    """Serves the control protocol for one node on its unix socket."""

    def __init__(self, node: ControlHost, path: str | Path | None = None) -> None:
        self.node = node
        self.path = Path(path) if path is not None else node_socket_path(node)
        self.commands: dict[str, tuple[Command, str]] = dict(COMMANDS)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Create the socket (0600 in a 0700 directory) and accept clients."""
        if self.path.parent == socket_dir() or not self.path.parent.exists():
            _private_dir(self.path.parent)
        _clear_stale(self.path)
        old_umask = os.umask(0o177)  # the socket is never, even briefly, open to others
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        log.info("control socket %s (shoal status / shoal remote)", self.path)

    async def stop(self) -> None:
        """Close the socket and every session; remove the file if it is still ours."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        self._server = None
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            if not _peer_allowed(writer):
                return
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await _read_json(reader, writer)
            if request is None:
                return
            name = request.get("command")
            args = request.get("args", [])
            if not isinstance(name, str) or not isinstance(args, list):
                await _write(writer, _error("bad-request", 'expected {"command": str, "args": []}'))
                continue
            if name == "remote":
                await _write(writer, {"ok": True, "result": {"node": self.node.name}})
                await RemoteSession(self.node, reader, writer).run()
                return
            await _write(writer, await self._dispatch(name, [str(a) for a in args]))

    async def _dispatch(self, name: str, args: list[str]) -> dict[str, Any]:
        entry = self.commands.get(name)
        if entry is None:
            known = ", ".join(sorted([*self.commands, "remote"]))
            return _error("unknown-command", f"unknown command {name!r} (this node knows: {known})")
        func, _ = entry
        try:
            result = func(self.node, args)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, COMMAND_TIMEOUT)
        except CommandError as exc:
            return _error("failed", str(exc))
        except (TimeoutError, ConnectionError) as exc:
            return _error("failed", str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("control command %r failed", name)
            return _error("failed", f"{type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """Defence in depth behind the 0600 mode: only our own uid (or root) may talk to us."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid in (os.getuid(), 0):
        return True
    log.warning("control socket: refused a client running as uid %d", uid)
    return False


async def _read_json(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> dict[str, Any] | None:
    """The next request object; None at end of input or after a refused line."""
    try:
        line = await reader.readline()
    except ValueError:  # longer than MAX_LINE
        await _write(writer, _error("bad-request", f"request longer than {MAX_LINE} bytes"))
        return None
    if not line:
        return None
    try:
        request = json.loads(line)
    except ValueError:
        await _write(writer, _error("bad-request", "a request is one JSON object per line"))
        return None
    if not isinstance(request, dict):
        await _write(writer, _error("bad-request", "a request is one JSON object per line"))
        return None
    return request


async def _write(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    data = json.dumps(message, default=str).encode() + b"\n"
    if len(data) > MAX_LINE:  # the client reads at most MAX_LINE bytes per reply
        data = json.dumps(_shortened(message, len(data)), default=str).encode() + b"\n"
    writer.write(data)
    await writer.drain()


def _shortened(message: dict[str, Any], size: int) -> dict[str, Any]:
    """A reply too long for one line: console output cut with a note, otherwise an error."""
    if "output" not in message:
        return _error(
            "failed",
            f"the reply is {size} bytes, more than a control socket reply may be "
            f"({MAX_LINE}); ask for less",
        )
    output = str(message["output"])
    note = f"\n[output cut: {len(output) - _OUTPUT_KEPT} more characters not shown]\n"
    return {**message, "output": output[:_OUTPUT_KEPT] + note}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


# the built-in commands -----------------------------------------------------------
@command("status", "this node: name, peers, readiness, topology, cookie fingerprint")
def _status(node: ControlHost, args: list[str]) -> Any:
    return node.status()


@command("nodes", "connected peers, sorted")
def _nodes(node: ControlHost, args: list[str]) -> Any:
    return node.nodes()


@command("ping", "ping NODE: round trip to a connected peer")
async def _ping(node: ControlHost, args: list[str]) -> Any:
    target = _one_arg("ping", args)
    if target != node.name and target not in node.nodes():
        raise CommandError(f"{target} is not connected to {node.name} (try `shoal connect`)")
    rtt = await node.ping(target)
    return {"node": target, "rtt_ms": round(rtt * 1000, 3)}


@command("connect", "connect NODE: dial name@host, host or host:port and wait until it is up")
async def _connect(node: ControlHost, args: list[str]) -> Any:
    target = _one_arg("connect", args)
    try:
        name = await node.connect(target)
    except ValueError as exc:  # includes ConfigError from an unparsable address
        raise CommandError(str(exc)) from None
    return {"node": name}


@command("jobs", "cron jobs: schedule, last run, next run, where it ran")
def _jobs(node: ControlHost, args: list[str]) -> Any:
    return node.jobs.snapshot()


@command("run-job", "run-job NAME: run a job now (cluster jobs run on the current leader)")
async def _run_job(node: ControlHost, args: list[str]) -> Any:
    name = _one_arg("run-job", args, what="job name")
    try:
        return (await node.jobs.run_now(name)).to_wire()
    except (SchedulerError, RemoteError) as exc:
        raise CommandError(str(exc)) from None


@command(
    "jobs-add",
    "jobs-add NAME SCHEDULE TASK [KEY=VALUE ...]: define a job on every node "
    "(options: tz, overlap, timeout, misfire, run_strategy, day_match, max_attempts, backoff)",
)
async def _jobs_add(node: ControlHost, args: list[str]) -> Any:
    if len(args) < 3:
        raise CommandError("jobs-add takes NAME SCHEDULE TASK [KEY=VALUE ...]")
    name, schedule, task, *pairs = args
    try:
        options = parse_options(pairs)
        return (await node.jobs.add(name, schedule, task, **options)).to_wire()
    except (SchedulerError, ValueError) as exc:
        raise CommandError(str(exc)) from None


async def _jobs_change(node: ControlHost, verb: str, args: list[str]) -> Any:
    name = _one_arg(f"jobs-{verb}", args, what="job name")
    change = {"remove": node.jobs.remove, "pause": node.jobs.pause, "resume": node.jobs.resume}
    try:
        return (await change[verb](name)).to_wire()
    except SchedulerError as exc:
        raise CommandError(str(exc)) from None


@command("jobs-remove", "jobs-remove NAME: remove a run-time job from every node")
async def _jobs_remove(node: ControlHost, args: list[str]) -> Any:
    return await _jobs_change(node, "remove", args)


@command("jobs-pause", "jobs-pause NAME: stop a job ticking on every node")
async def _jobs_pause(node: ControlHost, args: list[str]) -> Any:
    return await _jobs_change(node, "pause", args)


@command("jobs-resume", "jobs-resume NAME: let a paused job tick again on every node")
async def _jobs_resume(node: ControlHost, args: list[str]) -> Any:
    return await _jobs_change(node, "resume", args)


@command("jobs-history", "jobs-history NAME [LIMIT]: the job's last runs on any node, newest first")
def _jobs_history(node: ControlHost, args: list[str]) -> Any:
    if not 1 <= len(args) <= 2 or (len(args) == 2 and not args[1].isdigit()):
        raise CommandError("jobs-history takes NAME [LIMIT]")
    limit = int(args[1]) if len(args) == 2 else 50
    try:
        return [run.to_wire() for run in node.jobs.runs(args[0], limit)]
    except SchedulerError as exc:
        raise CommandError(str(exc)) from None


def _one_arg(name: str, args: list[str], what: str = "node name") -> str:
    if len(args) != 1:
        raise CommandError(f"{name} takes exactly one {what}")
    return args[0]


# the remote console ---------------------------------------------------------------
# Output of code typed in a remote session goes to that session, also from tasks
# it starts; everything else in the process writes where it always did.
_session: contextvars.ContextVar[_Console | None] = contextvars.ContextVar(
    "shoal_session", default=None
)


class _Routed:
    """Stands in for sys.stdout/sys.stderr: the current session's buffer, else the original."""

    def __init__(self, original: TextIO) -> None:
        self.original = original

    def write(self, text: str) -> int:
        console = _session.get()
        if console is None:
            return self.original.write(text)
        console.write(text)
        return len(text)

    def flush(self) -> None:
        if _session.get() is None:
            self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _install_routing() -> None:
    """Route stdout/stderr and the REPL's displayhook per session (once per process)."""
    if sys.stdout is not None and not isinstance(sys.stdout, _Routed):
        sys.stdout = _Routed(sys.stdout)
    if sys.stderr is not None and not isinstance(sys.stderr, _Routed):
        sys.stderr = _Routed(sys.stderr)
    if getattr(sys.displayhook, "_shoal", False):
        return
    original = sys.displayhook

    def displayhook(value: object) -> None:
        console = _session.get()
        if console is None:
            original(value)
        elif value is not None:
            import builtins

            builtins._ = value  # type: ignore[attr-defined]
            console.write(repr(value) + "\n")

    displayhook._shoal = True  # type: ignore[attr-defined]
    sys.displayhook = displayhook


class _Console(code.InteractiveConsole):
    """Compiles like the stdlib asyncio REPL; running is left to the session (on the loop)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__(namespace, filename="<remote>")
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.compiled: types.CodeType | None = None
        self.output = io.StringIO()

    def runcode(self, code: types.CodeType) -> None:
        self.compiled = code

    def write(self, data: str) -> None:
        self.output.write(data)

    def take_output(self) -> str:
        text = self.output.getvalue()
        self.output = io.StringIO()
        return text


class RemoteSession:
    """One `shoal remote` client: lines in, output out, code run on the node's loop."""

    def __init__(
        self, node: ControlHost, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import shoal

        self.node = node
        self.reader = reader
        self.writer = writer
        namespace: dict[str, Any] = {
            "__name__": "__console__",
            "__builtins__": __builtins__,
            "asyncio": asyncio,
            "shoal": shoal,
            "node": node,
        }
        self.console = _Console(namespace)
        self._next: asyncio.Task[dict[str, Any] | None] | None = None

    async def run(self) -> None:
        _install_routing()
        log.info("remote console opened on %s", self.node.name)
        try:
            await self._write(self.banner(), more=False)
            while True:
                message = await self._receive()
                if message is None:
                    return
                if message.get("interrupt"):
                    self.console.resetbuffer()
                    await self._write("KeyboardInterrupt\n", more=False)
                    continue
                line = message.get("line")
                if not isinstance(line, str):
                    continue
                more = self.console.push(line)
                if self.console.compiled is not None:
                    compiled, self.console.compiled = self.console.compiled, None
                    if not await self._execute(compiled):
                        await self._write(self.console.take_output(), more=False, closed=True)
                        return
                await self._write(self.console.take_output(), more=more)
        finally:
            if self._next is not None:
                self._next.cancel()
            log.info("remote console closed on %s", self.node.name)

    def banner(self) -> str:
        return (
            f"Python {sys.version.split()[0]} asyncio console inside {self.node.name} "
            f"(pid {os.getpid()}).\n"
            "`node` is the running shoal.Node; `await` works at the top level.\n"
            "Code runs on the node's event loop: blocking calls stall the node. "
            "Ctrl-D (or exit()) leaves; the node keeps running.\n"
        )

    async def _receive(self) -> dict[str, Any] | None:
        if self._next is None:
            self._next = asyncio.ensure_future(_read_json(self.reader, self.writer))
        try:
            return await self._next
        finally:
            self._next = None

    async def _execute(self, compiled: types.CodeType) -> bool:
        """Run one statement; Ctrl-C from the client cancels it. False ends the session."""
        task = asyncio.ensure_future(self._run(compiled))
        while not task.done():
            if self._next is None:
                self._next = asyncio.ensure_future(_read_json(self.reader, self.writer))
            await asyncio.wait([task, self._next], return_when=asyncio.FIRST_COMPLETED)
            if self._next.done() and not task.done():
                message, self._next = self._next.result(), None
                if message is None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return False
                if message.get("interrupt"):
                    task.cancel()
        try:
            return task.result()
        except asyncio.CancelledError:
            self.console.write("KeyboardInterrupt\n")
            return True

    async def _run(self, compiled: types.CodeType) -> bool:
        _session.set(self.console)  # this task's (and its children's) output
        func = types.FunctionType(compiled, self.console.locals)
        try:
            result = func()
            if inspect.iscoroutine(result):
                await result
        except SystemExit:
            return False
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.console.showtraceback()
        return True

    async def _write(self, output: str, more: bool, closed: bool = False) -> None:
        await _write(self.writer, {"output": output, "more": more, "closed": closed})


# the client side (used by the CLI) ---------------------------------------------------
class ControlClient:
    """A blocking client for one control socket; one request per line."""

    def __init__(self, path: Path, timeout: float = COMMAND_TIMEOUT + 5) -> None:
        self.path = path
        # Nothing is sent before both checks pass: typed code may hold secrets.
        check_trusted_dir(path.parent)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            check_server_uid(self.sock, path)
        except OSError as exc:
            self.sock.close()
            if isinstance(exc, ControlError):
                raise
            raise ControlError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        self._file = self.sock.makefile("rb")

    def request(self, name: str, *args: str) -> dict[str, Any]:
        self.send({"command": name, "args": list(args)})
        return self.receive()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        line = self._file.readline(MAX_LINE + 1)
        if not line:
            raise ControlError(errno.ECONNRESET, f"the node closed {self.path}")
        if not line.endswith(b"\n"):
            raise ControlError(errno.EMSGSIZE, f"the node's reply is longer than {MAX_LINE} bytes")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ControlError(errno.EPROTO, "the node sent something that is not a reply")
        return reply

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_sockets(directory: Path | None = None) -> Iterator[Path]:
    """The sockets of running nodes in the per-user socket directory, by name."""
    directory = socket_dir() if directory is None else directory
    try:
        candidates = sorted(directory.glob("*.sock"))
    except OSError:
        return
    for path in candidates:
        if is_live(path):
            yield path
