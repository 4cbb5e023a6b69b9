"""Start real processes for multi-node tests, wait for conditions, and always clean up.

    with Procs() as procs:                      # or the `procs` fixture
        node = procs.start_python(["-m", "hi.app"], env={"NODE_HOST": "127.0.0.2"})
        wait_until(lambda: "listening" in node.output(), timeout=10, message="node start")
        node.terminate()                        # SIGTERM, then SIGKILL after a deadline

Every process gets its own session (signals to the test runner do not reach
it), its output goes to a log file (a full pipe never blocks it), and it is
stopped by PID when the `Procs` closes, even if the test failed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true before its deadline."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call `predicate` until it returns something truthy (returned) or `timeout` s pass.

    Exceptions from the predicate count as "not yet"; the last one is shown in
    the timeout error.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:
            last_error, result = exc, None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"{message} not met within {timeout} s{detail}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """`wait_until` for async tests; `predicate` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await asyncio.wait_for(result, max(0.01, deadline - time.monotonic()))
        except Exception as exc:
            last_error, result = exc, None
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"{message} not met within {timeout} s{detail}")
        await asyncio.sleep(interval)


class Proc:
    """One started process: its Popen, its log file, and a bounded stop."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.popen = popen
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self, timeout: float = 5.0) -> int:
        """SIGKILL and reap."""
        if self.alive():
            self.signal(signal.SIGKILL)
        return self.popen.wait(timeout)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"


class Procs:
    """Starts processes and stops every one of them (by PID) on `close()`."""

    def __init__(self, log_dir: Path | None = None, stop_timeout: float = 5.0) -> None:
        self.stop_timeout = stop_timeout
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="shoal-procs-")) if log_dir is None else log_dir
        self.procs: list[Proc] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str | None = None,
        **popen_kwargs: Any,
    ) -> Proc:
        """Start `argv`; `env` is added to (not replacing) `os.environ`."""
        name = name or f"{Path(argv[0]).name}-{len(self.procs)}"
        log_path = self.log_dir / f"{len(self.procs):02d}-{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen_kwargs,
            )
        proc = Proc(popen, log_path, name)
        self.procs.append(proc)
        return proc

    def start_python(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str | None = None,
    ) -> Proc:
        """Start this interpreter (the venv's) with `args`, e.g. `["-m", "hi.app"]`."""
        return self.start([sys.executable, *args], env=env, cwd=cwd, name=name or "python")

    def adopt(self, popen: subprocess.Popen[bytes], log_path: Path, name: str) -> Proc:
        """Track a process started elsewhere (e.g. in a network namespace) for cleanup."""
        proc = Proc(popen, log_path, name)
        self.procs.append(proc)
        return proc

    def close(self, timeout: float | None = None) -> None:
        """Stop everything started here, newest first: SIGTERM, then SIGKILL by PID.

        `timeout` (default `stop_timeout`) is the grace period for all of them together.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        for proc in reversed(self.procs):
            if proc.alive():
                proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._own_dir:
            for path in self.log_dir.glob("*"):
                path.unlink(missing_ok=True)
            self.log_dir.rmdir()

    def dump(self) -> str:
        """All outputs, for a failing test's report."""
        return "\n".join(f"--- {p!r}\n{p.output()}" for p in self.procs)

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
