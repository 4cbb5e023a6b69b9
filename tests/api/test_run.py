"""`shoal.run(node, app)` in a real process: a signal drains and exits 0; a second
signal stops at once; an app that fails stops the node and exits with its error."""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.procs import Proc, Procs, wait_until

HOST = "127.0.97.2"
ENV = {
    "RELEASE_COOKIE": "test-cookie-run-helper-1f2e3d4c5b6a7980",
    "NODE_NAME": "solo",
    "NODE_HOST": HOST,
    "TOPOLOGY_TYPE": "static",
    "SHOAL_DRAIN_TIMEOUT_MS": "20000",
}

APP = textwrap.dedent(
    """
    import asyncio, sys
    import shoal

    node = shoal.Node.from_env()
    mode = sys.argv[1]

    @node.singleton("slow_to_stop")
    async def slow_to_stop(ctx: shoal.SingletonContext) -> None:
        print("holding", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            if mode == "slow":
                print("draining slowly", flush=True)
                await asyncio.sleep(60)  # within SHOAL_DRAIN_TIMEOUT_MS: stop() waits

    async def main() -> None:
        await node.wait_ready(10)
        print("main ran", flush=True)
        if mode == "fail":
            raise RuntimeError("the app failed")

    def stopping() -> None:
        print("node stopping", flush=True)

    node.on_stop(stopping)
    shoal.run(node, main())
    print("run returned", flush=True)
    """
)


def start(procs: Procs, tmp_path: Path, mode: str) -> Proc:
    app = tmp_path / "app.py"
    app.write_text(APP)
    return procs.start_python([str(app), mode], env=ENV, name=mode)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_node_and_exits_0(signum: int, tmp_path: Path) -> None:
    with Procs() as procs:
        proc = start(procs, tmp_path, "plain")
        wait_until(lambda: "main ran" in proc.output(), 30, message="main ran")
        proc.signal(signum)
        assert proc.wait(30) == 0, proc.output()
        out = proc.output()
        assert "node stopping" in out and "run returned" in out, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    with Procs() as procs:
        proc = start(procs, tmp_path, "slow")
        wait_until(lambda: "holding" in proc.output(), 30, message="the singleton runs")
        proc.signal(signal.SIGTERM)
        wait_until(lambda: "draining slowly" in proc.output(), 30, message="drain")
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM, proc.output()
        assert "Traceback" not in proc.output()


def test_an_app_that_fails_stops_the_node_and_raises(tmp_path: Path) -> None:
    with Procs() as procs:
        proc = start(procs, tmp_path, "fail")
        assert proc.wait(30) == 1, proc.output()
        out = proc.output()
        assert "RuntimeError: the app failed" in out and "node stopping" in out, out
        assert "run returned" not in out


async def test_nested_signal_handlers_give_the_signal_back_to_the_outer_block() -> None:
    """`shoal.asgi.serve` inside `shoal.run`: uvicorn's drain gets the signals while it
    runs, and the runner has its handler back afterwards (not the default: exit 143)."""
    import asyncio
    import os

    from shoal.loop import signal_handlers

    got: list[tuple[str, int]] = []
    arrived = asyncio.Event()

    def record(who: str) -> Callable[[int], None]:
        def on_signal(signum: int) -> None:
            got.append((who, signum))
            arrived.set()

        return on_signal

    async def signal_self() -> None:
        # Without a handler this would end the test run: fail cleanly instead.
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "no handler left"
        arrived.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            await arrived.wait()

    with signal_handlers(record("outer")):
        with signal_handlers(record("inner")):
            await signal_self()
        await signal_self()
    assert got == [("inner", signal.SIGTERM), ("outer", signal.SIGTERM)]
