"""The shared test helpers themselves: processes, waits, and namespace networks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.netns import Network, requires_netns
from tests.support.procs import Procs, WaitTimeout, async_wait_until, wait_until


def test_wait_until_returns_the_value_or_fails_at_the_deadline() -> None:
    start = time.monotonic()
    assert wait_until(lambda: time.monotonic() - start > 0.1 and "done", timeout=2) == "done"
    with pytest.raises(WaitTimeout, match="never"):
        wait_until(lambda: 1 / 0, timeout=0.1, message="never")


async def test_async_wait_until_accepts_coroutines() -> None:
    async def ready() -> bool:
        return True

    assert await async_wait_until(ready, timeout=1) is True
    with pytest.raises(WaitTimeout):
        await async_wait_until(lambda: False, timeout=0.1)


def test_procs_stop_what_they_started_even_when_it_ignores_sigterm() -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up', flush=True); time.sleep(60)"
    )
    with Procs(stop_timeout=0.3) as procs:
        proc = procs.start_python(["-c", stubborn])
        wait_until(lambda: "up" in proc.output(), timeout=10, message="child started")
        log_dir = procs.log_dir
    assert not proc.alive()
    assert proc.returncode == -9
    assert not log_dir.exists()


@pytest.mark.netns
@requires_netns
def test_network_hosts_reach_each_other_until_cut() -> None:
    server = (
        "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 7000)); s.listen();"
        "print('listening', flush=True)\n"
        "while True: s.accept()[0].close()"
    )
    client = (
        "import socket, sys\n"
        "try: socket.create_connection((sys.argv[1], 7000), timeout=1).close(); print('ok')\n"
        "except OSError as e: print('fail', e)"
    )
    with Network(2) as net:
        a, b = net.hosts
        listener = b.popen([sys.executable, "-c", server, b.address], stdout=subprocess.PIPE)
        assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
        assert a.run([sys.executable, "-c", client, b.address]).stdout.strip() == "ok"
        b.cut()
        assert a.run([sys.executable, "-c", client, b.address]).stdout.startswith("fail")
        b.heal()
        wait_until(
            lambda: a.run([sys.executable, "-c", client, b.address]).stdout.strip() == "ok",
            timeout=10,
            message="reachable again after heal",
        )
        names = [h.name for h in net.hosts] + [net.bridge_ns]
    assert listener.poll() is not None, "processes are stopped when the network closes"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in left for name in names), "namespaces are deleted"
