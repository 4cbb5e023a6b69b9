"""Runs a two-node app (the README's quick start) as real processes and checks what a
user is promised: the nodes meet, call, publish and wait_for, run one singleton and
one job, and on SIGTERM (then SIGINT) leave cleanly, exit 0 and print no traceback.
"""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

from tests.support.procs import Proc, Procs, wait_until

HOSTS = ("127.0.96.2", "127.0.96.3")


def check_two_node_app(python: str, app: Path, procs: Procs, cookie: str | None = None) -> None:
    env = {
        "RELEASE_COOKIE": cookie or secrets.token_hex(32),
        "NODE_NAME": "app",
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": ",".join(f"app@{host}" for host in HOSTS),
    }
    a, b = (
        procs.start([python, str(app)], env={**env, "NODE_HOST": host}, cwd=app.parent, name=host)
        for host in HOSTS
    )
    nodes = {HOSTS[0]: a, HOSTS[1]: b}

    def dump() -> str:
        return procs.dump()

    for host, proc in nodes.items():
        other = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
        _wait(proc, f"hello vegeta, from app@{other}", dump)  # a call to its peer
        _wait(proc, "tick from app@", dump)  # published by the singleton's holder
    _wait_any((a, b), "job report ran on app@", dump, timeout=30)

    b.signal(signal.SIGTERM)
    assert b.wait(60) == 0, dump()
    _wait(a, f"MembershipEvent(kind='down', node='app@{HOSTS[1]}', reason='leaving')", dump)
    a.signal(signal.SIGINT)
    assert a.wait(60) == 0, dump()
    for proc in (a, b):
        assert "Traceback" not in proc.output(), dump()


def _wait(proc: Proc, text: str, dump: object, timeout: float = 60) -> None:
    wait_until(lambda: text in proc.output() or not proc.alive(), timeout, message=f"{text!r}")
    assert text in proc.output(), (
        f"{text!r} not printed by {proc!r}:\n{dump() if callable(dump) else ''}"
    )


def _wait_any(procs: tuple[Proc, ...], text: str, dump: object, timeout: float) -> None:
    wait_until(lambda: any(text in p.output() for p in procs), timeout, message=f"{text!r}")
