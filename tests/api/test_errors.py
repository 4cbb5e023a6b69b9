"""One way to fail: a handler that raises gives RemoteError, on a peer or on this node;
timeouts say what timed out; run_now has one result type."""

from __future__ import annotations

import asyncio
import importlib
import sys
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from shoal import (
    CallTimeout,
    ConfigError,
    JobNotFound,
    Node,
    RemoteError,
    RunContext,
    RunResult,
    Settings,
    WaitTimeout,
)
from tests.mesh.conftest import NodeFactory, peer_of


async def pair(make_node: NodeFactory) -> tuple[Any, Any]:
    a = await make_node()
    b = await make_node(peers=[peer_of(a)])
    await a.wait_for_nodes(1, timeout=10)
    await b.wait_for_nodes(1, timeout=10)
    return a, b


def fails(payload: Any, _sender: str) -> Any:
    raise ValueError(f"bad payload {payload!r}")


async def fails_async(payload: Any, _sender: str) -> Any:
    raise KeyError(payload)


async def test_a_handler_error_is_a_remote_error_with_its_type_on_a_peer_and_locally(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    b.register("fails", fails)
    b.register("fails_async", fails_async)
    for caller in (a, b):  # a peer's call and a local call raise the same way
        with pytest.raises(RemoteError) as raised:
            await caller.call(b.name, "fails", 7)
        assert raised.value.type_name == "ValueError"
        assert raised.value.message == "bad payload 7"
        assert str(raised.value) == "ValueError: bad payload 7"
        with pytest.raises(RemoteError) as raised:
            await caller.call(b.name, "fails_async", "k")
        assert (raised.value.type_name, str(raised.value)) == ("KeyError", "KeyError: 'k'")
        with pytest.raises(RemoteError) as raised:
            await caller.call(b.name, "missing", None)
        assert raised.value.type_name == "NoHandler"
        assert f"no handler named 'missing' on {b.name}" in str(raised.value)
    # Locally, the original exception is kept as the cause.
    with pytest.raises(RemoteError) as raised:
        await b.call(b.name, "fails", 1)
    assert isinstance(raised.value.__cause__, ValueError)


async def test_a_remote_error_from_an_older_node_is_a_plain_message() -> None:
    old = RemoteError.from_wire("ValueError: boom")
    assert (old.type_name, str(old)) == ("RemoteError", "RemoteError: ValueError: boom")
    new = RemoteError.from_wire(["ValueError", "boom"])
    assert (new.type_name, new.message) == ("ValueError", "boom")


async def test_a_local_call_that_times_out_raises_call_timeout(make_node: NodeFactory) -> None:
    a = await make_node()

    async def slow(_payload: Any, _sender: str) -> None:
        await asyncio.sleep(5)

    a.register("slow", slow)
    with pytest.raises(CallTimeout, match=r"'slow' on .* did not reply within 0.2 s"):
        await a.call(a.name, "slow", None, timeout=0.2)


async def test_wait_for_and_wait_for_nodes_say_what_timed_out(make_node: NodeFactory) -> None:
    a = await make_node()
    with pytest.raises(WaitTimeout, match=r"no message on topic 'orders' matched within 0.2 s"):
        await a.wait_for("orders", timeout=0.2)
    with pytest.raises(TimeoutError, match=r"0 of 2 peers connected to .* within 0.2 s: none"):
        await a.wait_for_nodes(2, timeout=0.2)


async def test_wait_for_nodes_returns_once_enough_peers_are_connected(
    make_node: NodeFactory,
) -> None:
    a = await make_node()
    waiting = asyncio.ensure_future(a.wait_for_nodes(2, timeout=15))
    b = await make_node(peers=[peer_of(a)])
    await asyncio.sleep(0)
    assert not waiting.done()  # one peer is not two
    c = await make_node(peers=[peer_of(a)])
    assert sorted(await waiting) == sorted([b.name, c.name])
    with pytest.raises(WaitTimeout, match=r"2 of 3 peers"):
        await a.wait_for_nodes(3, timeout=0.2)


async def test_run_now_returns_a_run_result_here_and_on_a_peer(make_node: NodeFactory) -> None:
    a, b = await pair(make_node)
    for node in (a, b):

        @node.job("0 0 1 1 *", name="report", run_strategy="local")
        async def report(ctx: RunContext) -> None:
            assert ctx.job == "report"

    here = await a.jobs.run_now("report")
    there = await a.jobs.run_on(b.name, "report", timeout=5)
    assert isinstance(here, RunResult) and isinstance(there, RunResult)
    assert (here.node, here.status) == (a.name, "ok")
    assert (there.node, there.status) == (b.name, "ok")
    assert type(await a.scheduler.run_now("report")) is type(here)  # the scheduler's type
    with pytest.raises(JobNotFound):
        await a.jobs.run_now("nope")
    with pytest.raises(RemoteError) as raised:
        await a.jobs.run_on(b.name, "nope", timeout=5)
    assert raised.value.type_name == "JobNotFound"


async def test_a_lease_dsn_without_asyncpg_fails_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrying cannot install the `lease` extra: the node must not start and serve while
    it never runs a singleton or a cluster job, saying why only in its log (off by default)."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if shoal[lease] was not installed
    settings = Settings(
        cookie="test-cookie-errors-asyncpg-5e4d3c2b1a09f8e7",
        host="127.0.0.1",
        topology="static",
        lease_dsn="postgresql://nobody@127.0.0.1:1/none",
    )
    node = Node(settings)
    try:
        with pytest.raises(ConfigError, match=r"SHOAL_LEASE_DSN .*shoal\[lease\]"):
            await node.start()
        assert node.mesh is None and not node.listening
    finally:
        await node.stop()


async def test_wait_for_nodes_says_when_handshakes_failed_for_the_cookie(
    make_node: NodeFactory,
) -> None:
    """A mistyped cookie shows only in the log, which apps do not see unless they configure
    logging: the timeout names the failed handshakes."""
    a = await make_node()
    b = await make_node(peers=[peer_of(a)], cookie="another-cookie-for-this-test-9f8e7d6c5b4a3")
    for node in (a, b):
        with pytest.raises(
            WaitTimeout,
            match=r"0 of 1 peers .*: none; failed handshakes since start: cookie \d+ "
            r"\(a different RELEASE_COOKIE\?\)",
        ):
            await node.wait_for_nodes(1, timeout=2.5)


def test_the_web_helpers_without_the_web_extra_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if shoal[web] was not installed
    monkeypatch.delitem(sys.modules, "shoal.asgi", raising=False)
    with pytest.raises(ImportError, match=r"shoal\.asgi needs uvicorn: pip install 'shoal\[web\]'"):
        importlib.import_module("shoal.asgi")


def test_metrics_without_the_metrics_extra_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.metrics import NodeMetrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    settings = Settings(cookie="test-cookie-errors-metrics-6f5e4d3c2b1a0918", topology="static")
    with pytest.raises(ImportError, match=r"prometheus-client: pip install 'shoal\[metrics\]'"):
        NodeMetrics(Node(settings))


@pytest.mark.parametrize("timeout", [float("nan"), 0, -1.0, True, "5"])
async def test_a_timeout_that_cannot_bound_the_wait_is_refused_at_once(
    make_node: NodeFactory, timeout: float
) -> None:
    a, b = await pair(make_node)

    async def slow(_payload: Any, _sender: str) -> None:
        await asyncio.sleep(30)

    b.register("slow", slow)
    waits = {
        "call": lambda: a.call(b.name, "slow", None, timeout=timeout),
        "wait_for": lambda: a.wait_for("orders", timeout=timeout),
        "wait_for_nodes": lambda: a.wait_for_nodes(2, timeout=timeout),
        "wait_ready": lambda: a.wait_ready(timeout=timeout),
    }
    for wait in waits.values():
        # A NaN deadline never fires: without the check, the call and wait_for hang.
        with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds"):
            async with asyncio.timeout(5):
                await wait()


async def test_a_timeout_of_any_real_number_type_is_seconds(make_node: NodeFactory) -> None:
    a, b = await pair(make_node)
    for timeout in (5, Fraction(9, 2), Decimal(5)):  # before: a Fraction was refused
        if isinstance(timeout, Decimal):  # no numbers.Real: floats do not add to it
            with pytest.raises(ValueError, match=r"positive number of seconds, got Decimal"):
                await a.call(b.name, "shoal.ping", None, timeout=timeout)
            continue
        assert await a.call(b.name, "shoal.ping", None, timeout=timeout) == "pong"
        assert await a.wait_for_nodes(1, timeout=timeout) == [b.name]


async def test_starting_a_started_node_is_refused_and_it_keeps_serving(
    make_node: NodeFactory,
) -> None:
    a, b = await pair(make_node)
    with pytest.raises(RuntimeError, match=r"is already started"):
        await a.start()
    assert await b.call(a.name, "shoal.ping", None, timeout=5) == "pong"
    assert await a.call(b.name, "shoal.ping", None, timeout=5) == "pong"


async def test_starting_a_stopped_node_is_refused(make_node: NodeFactory) -> None:
    a = await make_node()
    await a.stop()
    # Started again, it served while draining for good: never ready, never a holder.
    with pytest.raises(RuntimeError, match=r"a Node starts once: make a new Node\(settings\)"):
        await a.start()
    assert a.mesh is None and not a.listening


async def test_a_start_that_failed_on_a_taken_port_can_be_retried(
    make_node: NodeFactory, hosts: Any
) -> None:
    from tests.mesh.conftest import Proposals, settings_for

    a = await make_node()
    # A second node on the same address and port: its start fails (the port is a's).
    b = Node(settings_for(a.settings.host), Proposals())
    try:
        with pytest.raises(OSError):
            await b.start()
        assert b.mesh is None and b.messaging.mesh is None and not b.listening
        await a.stop()
        # Before, the failed start left its Mesh behind: the retry was refused as "already
        # started", and the node could never start.
        await b.start()
        await b.wait_ready(5)
        assert b.listening and await b.call(b.name, "shoal.ping", None) == "pong"
    finally:
        await b.stop()
