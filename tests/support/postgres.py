"""A real, throwaway Postgres server for lease-mode tests.

Debian's server binaries (`/usr/lib/postgresql/*/bin`) in a temporary data
directory, listening on 127.0.0.1 at a free port. Postgres refuses to run as
root, so as root it runs as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PostgresServer:
    dsn: str
    port: int
    process: subprocess.Popen[bytes]


def postgres_bindir() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(candidates[-1]) if candidates else None


def unavailable_reason() -> str | None:
    """Why a Postgres server cannot be started here, or None if it can."""
    if postgres_bindir() is None:
        return "Postgres server binaries not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_postgres(timeout: float = 30.0, netns: Any = None) -> Iterator[PostgresServer]:
    """A server on 127.0.0.1, or on `netns.address` inside a `tests.support.netns.Host`."""
    bindir = postgres_bindir()
    assert bindir is not None, unavailable_reason()
    workdir = tempfile.mkdtemp(prefix="shoal-pg-")
    os.chmod(workdir, 0o755)
    datadir = os.path.join(workdir, "data")
    user = pwd.getpwuid(os.geteuid()).pw_name
    run_as: str | None = None
    if os.geteuid() == 0:
        user = run_as = "postgres"
        os.makedirs(datadir, mode=0o700)
        shutil.chown(workdir, "postgres")
        shutil.chown(datadir, "postgres")
    port = _free_port() if netns is None else 5432
    listen = "127.0.0.1" if netns is None else str(netns.address)
    subprocess.run(
        [f"{bindir}/initdb", "-D", datadir, "-A", "trust", "-U", user, "--no-sync"],
        check=True,
        user=run_as,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if netns is not None:  # clients come from the other namespace hosts
        with open(os.path.join(datadir, "pg_hba.conf"), "a") as hba:
            hba.write(f"host all all {netns.network.subnet} trust\n")
    server = [
        f"{bindir}/postgres",
        "-D",
        datadir,
        "-p",
        str(port),
        "-h",
        listen,
        "-k",
        workdir,
        "-c",
        "fsync=off",
        "-c",
        "max_connections=200",
    ]
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if netns is None:
        process = subprocess.Popen(server, user=run_as, cwd=workdir, **quiet)
    else:
        # `ip netns exec` and `setpriv` both exec: the PID is the server's own.
        drop = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        process = netns.popen([*(drop if run_as else []), *server], cwd=workdir, **quiet)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                # pg_isready, not a TCP connect: the port opens before the server
                # accepts logins ("the database system is starting up").
                isready = [f"{bindir}/pg_isready", "-q", "-h", listen, "-p", str(port)]
                if netns is None:
                    subprocess.run(isready, check=True, timeout=5)
                else:
                    netns.run(isready)
                break
            except (OSError, RuntimeError, subprocess.SubprocessError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Postgres did not start") from None
                time.sleep(0.05)
        yield PostgresServer(f"postgresql://{user}@{listen}:{port}/postgres", port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
