"""SIGTERM drains: readiness fails, the lame duck serves, requests in flight finish
or get a retryable 503, then the node leaves and exits 0. Real processes, real HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from shoal import ConfigError
from shoal.drain import Drain
from tests.support.hi import HiNode
from tests.support.procs import Procs, wait_until

# --- the timeout chain ------------------------------------------------------------------


def test_timeout_chain_keep_alive_above_idle_above_longest_request() -> None:
    for drain in (Drain(), Drain(lame_duck=0, max_request=1), Drain.from_env({})):
        assert drain.keep_alive > drain.idle_timeout > drain.max_request
        assert drain.shutdown_time >= drain.lame_duck + drain.max_request


def test_defaults_outlast_haproxy_checks() -> None:
    """haproxy.cfg takes a node out within fall x inter + timeout check = 3 s."""
    assert Drain.from_env({}).lame_duck == 5.0
    assert Drain.from_env({"SHOAL_LAME_DUCK_MS": "0"}).lame_duck == 0.0
    assert Drain.from_env({"SHOAL_MAX_REQUEST_MS": "2500"}).max_request == 2.5


@pytest.mark.parametrize(
    "env",
    [{"SHOAL_LAME_DUCK_MS": "soon"}, {"SHOAL_LAME_DUCK_MS": "-1"}, {"SHOAL_MAX_REQUEST_MS": "0"}],
)
def test_bad_settings_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Drain.from_env(env)


# --- the hi app ------------------------------------------------------------------------


def test_hi_serves_through_the_lame_duck_and_delivers_a_held_wait(procs: Procs) -> None:
    node = HiNode.start(
        procs,
        "127.0.61.2",
        env={
            "TOPOLOGY_TYPE": "static",
            "SHOAL_LAME_DUCK_MS": "1500",
            "SHOAL_MAX_REQUEST_MS": "8000",
        },
    )
    node.wait_ready()
    held: dict[str, httpx.Response] = {}
    waiter = threading.Thread(
        target=lambda: held.setdefault("r", node.get("/wait/k1?timeout=8", timeout=15))
    )
    waiter.start()
    time.sleep(0.2)  # let the /wait reach the server (nothing to poll for it)
    signalled = time.monotonic()
    node.proc.signal(signal.SIGTERM)
    # Readiness fails at once; everything else is still served, with Connection: close.
    wait_until(lambda: node.get("/ready").status_code == 503, 1.0, message="/ready 503")
    page = node.get("/")
    assert page.status_code == 200
    assert page.headers["connection"] == "close"
    assert time.monotonic() - signalled < 1.5, "checked within the lame duck"
    # The event for the held /wait arrives after the port has closed for new requests:
    # the node is still in the mesh until its requests in flight are done.
    wait_until(lambda: not _accepts(node), 5.0, message="port closed after the lame duck")
    assert time.monotonic() - signalled >= 1.4
    assert node.proc.alive()
    other = HiNode.start(
        procs,
        "127.0.61.3",
        env={"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": "hi@127.0.61.2"},
    )
    other.wait_ready()
    wait_until(lambda: other.nodes() == [node.name], 5.0, message="peer connected")
    posted = httpx.post(other.url + "/event/k1", timeout=5)
    assert posted.status_code == 202
    waiter.join(15)
    assert held["r"].status_code == 200, held["r"].text
    assert held["r"].json()["event"]["key"] == "k1"
    assert node.proc.wait(10) == 0
    output = node.proc.output()
    assert "Traceback" not in output and "timeout graceful shutdown" not in output


def _accepts(node: HiNode) -> bool:
    try:
        with socket.create_connection((node.host, node.port), timeout=0.5):
            return True
    except OSError:
        return False


# --- any ASGI app through shoal.asgi.serve ---------------------------------------------

SLOW_APP = textwrap.dedent(
    """
    import asyncio, sys
    from shoal.asgi import serve
    from shoal.drain import Drain

    async def app(scope, receive, send):
        await asyncio.sleep(float(scope["path"].strip("/") or 0))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    port = int(sys.argv[1])
    sys.exit(asyncio.run(serve(app, Drain.from_env(), host="127.0.0.1", port=port)))
    """
)


def test_a_request_outliving_the_drain_gets_503_with_retry_after(
    procs: Procs, tmp_path: Path
) -> None:
    script = tmp_path / "slow_app.py"
    script.write_text(SLOW_APP)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = procs.start(
        [sys.executable, str(script), str(port)],
        env={"SHOAL_LAME_DUCK_MS": "300", "SHOAL_MAX_REQUEST_MS": "1000"},
        name="slow-app",
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _get(url + "/0") == 200, 10.0, message="slow app up")
    answers: dict[str, httpx.Response] = {}
    threads = [
        threading.Thread(
            target=lambda p=path: answers.setdefault(p, httpx.get(url + p, timeout=20))
        )
        for path in ("/30", "/0.5")
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # both requests reach the app
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    # The short one finished in flight; the long one was cut with a retryable 503.
    assert answers["/0.5"].status_code == 200
    cut = answers["/30"]
    assert cut.status_code == 503
    assert cut.headers["retry-after"] == "1"
    assert cut.headers["connection"] == "close"
    assert 1.2 <= time.monotonic() - signalled < 5.0
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.output()


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_a_second_signal_stops_at_once(procs: Procs, tmp_path: Path) -> None:
    script = tmp_path / "slow_app.py"
    script.write_text(SLOW_APP)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = procs.start(
        [sys.executable, str(script), str(port)],
        env={"SHOAL_LAME_DUCK_MS": "30000"},
        name="slow-app",
    )
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/0") == 200, 10.0, message="up")
    proc.signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.signal(signal.SIGTERM)
    try:
        assert proc.wait(5) in (0, 1)
    except subprocess.TimeoutExpired:
        pytest.fail("a second SIGTERM must end the lame duck")
