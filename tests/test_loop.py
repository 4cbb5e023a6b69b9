"""`shoal.loop`: which event loop runs a node, chosen by SHOAL_EVENT_LOOP."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

import shoal
from shoal import ConfigError, Node, Settings
from shoal import loop as shoal_loop
from shoal.config import TLSFiles

uvloop = pytest.importorskip("uvloop")


def test_auto_picks_uvloop_when_installed_and_asyncio_when_asked() -> None:
    assert shoal_loop.selected({}) == "uvloop"
    assert shoal_loop.selected({"SHOAL_EVENT_LOOP": "auto"}) == "uvloop"
    assert shoal_loop.selected({"SHOAL_EVENT_LOOP": "asyncio"}) == "asyncio"
    assert shoal_loop.selected({"SHOAL_EVENT_LOOP": " UVLOOP "}) == "uvloop"


def test_an_unknown_loop_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="SHOAL_EVENT_LOOP='trio' is unknown"):
        shoal_loop.selected({"SHOAL_EVENT_LOOP": "trio"})


def test_tls_settings_make_auto_pick_asyncio_and_refuse_uvloop() -> None:
    env = {"SHOAL_TLS_CERT": "/x.crt"}
    assert shoal_loop.selected(env) == "asyncio"
    with pytest.raises(ConfigError, match="pause_reading"):
        shoal_loop.selected({**env, "SHOAL_EVENT_LOOP": "uvloop"})


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_run_uses_the_selected_loop(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    monkeypatch.setenv("SHOAL_EVENT_LOOP", choice)

    async def which() -> str:
        return shoal_loop.name()

    assert shoal_loop.run(which()) == choice


def test_a_tls_node_refuses_to_start_on_uvloop() -> None:
    settings = Settings(
        cookie="a-cookie-that-is-long-enough-0123456789",
        host="127.0.0.1",
        port=4370,
        topology="static",
        tls=TLSFiles("/no/cert", "/no/key", "/no/ca"),
    )

    async def start() -> None:
        node = Node(settings)
        try:
            await node.start()
        finally:
            await node.stop()

    with (
        pytest.raises(ConfigError, match="asyncio's event loop"),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(start())


def test_a_loop_that_cannot_be_made_leaves_no_coroutine_never_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`shoal.run(node, main())` whose loop is refused before it starts: the ConfigError
    alone, not also "coroutine 'serve'/'main' was never awaited" warnings."""
    monkeypatch.setenv("SHOAL_TLS_CERT", "/x.crt")
    monkeypatch.setenv("SHOAL_EVENT_LOOP", "uvloop")  # refused with TLS, before any loop runs
    node = Node(
        Settings(
            cookie="a-cookie-that-is-long-enough-0123456789",
            host="127.0.0.1",
            topology="static",
        )
    )

    async def main() -> None:
        pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="SHOAL_EVENT_LOOP"):
            shoal.run(node, main())
        with pytest.raises(ConfigError, match="SHOAL_EVENT_LOOP"):
            shoal.run(main())
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


class FakeClock:
    """`shoal.loop`'s clock, moved by hand: the busy-poll window without timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


async def loop_iterations(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_busy_poll_polls_until_the_window_after_the_last_poke_has_passed(
    monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    monkeypatch.setenv("SHOAL_EVENT_LOOP", choice)
    clock = FakeClock()
    monkeypatch.setattr(shoal_loop, "time", clock)

    async def scenario() -> list[bool]:
        busy = shoal_loop.BusyPoll(0.001)
        seen = [busy.polling]
        busy.poke()
        await loop_iterations()
        seen.append(busy.polling)  # within the window
        clock.now += 0.0008
        busy.poke()  # moves the window's end
        clock.now += 0.0008
        await loop_iterations()
        seen.append(busy.polling)  # 1.6 ms after the first poke, 0.8 after the last
        clock.now += 0.0003
        await loop_iterations()
        seen.append(busy.polling)  # the window has passed: the loop may sleep
        busy.poke()
        await loop_iterations()
        seen.append(busy.polling)  # and a poke starts it again
        return seen

    assert shoal_loop.run(scenario()) == [False, True, True, False, True]


def test_a_busy_poll_window_of_zero_never_polls() -> None:
    async def scenario() -> bool:
        busy = shoal_loop.BusyPoll(0.0)
        busy.poke()
        await loop_iterations()
        return busy.polling

    assert shoal_loop.run(scenario()) is False
