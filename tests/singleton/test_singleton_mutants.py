"""Singleton behaviour the mutation run found unguarded (in-process nodes on loopback, so a
mutant of `shoal.singleton` is seen by mutmut): async callable objects, log fields, the
bookkeeping of background tasks, one revalidation at a time, the lease-mode error text."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal import Node, Peer
from shoal.logs import JsonFormatter
from shoal.singleton import SingletonContext
from tests.singleton.test_singletons import make_node
from tests.support.procs import async_wait_until


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        await node.stop()


async def test_a_callable_object_with_async_call_runs_on_the_loop(nodes: list[Node]) -> None:
    """An object whose `__call__` is `async def` is awaited on the loop like an `async def`
    function: it needs no worker thread to start (they may all be held by blocking sync
    singletons or the app's own calls), and `ctx.is_valid()` answers at once."""
    seen: list[tuple[int, bool, float]] = []

    class Worker:
        async def __call__(self, ctx: SingletonContext) -> None:
            asked = time.monotonic()
            valid = ctx.is_valid()
            seen.append((threading.get_ident(), valid, time.monotonic() - asked))
            await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))  # this test's loop
    node, _ = make_node("127.0.93.2", [])
    nodes.append(node)
    await node.start()  # (it derives the cookie's key in a worker thread)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10.0)

    busy = loop.run_in_executor(None, hold)  # the only worker thread, held
    try:
        await async_wait_until(held.is_set, 5.0, message="the worker is held")
        node.add_singleton("obj", Worker())  # a started node claims it at once
        await async_wait_until(lambda: seen, 5.0, message="the object ran, no thread free")
    finally:
        release.set()
        await busy
    ((thread, valid, took),) = seen
    assert thread == threading.get_ident()
    assert valid is True and took < 0.5, (valid, took)


async def test_an_awaitable_returned_by_a_sync_singleton_checks_validity_at_once(
    nodes: list[Node],
) -> None:
    """`lambda ctx: worker(ctx)`: the awaitable a sync function returns runs on the loop
    (documented), with the context made for the thread; its `is_valid()` must answer at
    once there too, not wait on the loop it runs on (5 s blocked, then False)."""
    seen: list[tuple[bool, float]] = []

    async def worker(ctx: SingletonContext) -> None:
        asked = time.monotonic()
        seen.append((ctx.is_valid(), time.monotonic() - asked))
        await asyncio.Event().wait()

    node, _ = make_node("127.0.93.3", [])
    node.add_singleton("later", lambda ctx: worker(ctx))
    nodes.append(node)
    await node.start()
    await async_wait_until(lambda: seen, 10.0, message="the awaitable ran")
    ((valid, took),) = seen
    assert valid is True and took < 0.5, (valid, took)


class _JsonLines(logging.Handler):
    """Formats each record as it is emitted (in the task that logs), as a real handler does."""

    def __init__(self) -> None:
        super().__init__()
        self.formatter_ = JsonFormatter()
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.formatter_.format(record)))


async def test_log_lines_of_a_singleton_task_carry_its_name_and_token(nodes: list[Node]) -> None:
    """The log contract (shoal.logs): a singleton's task binds `singleton` and `token`, so
    the app's own lines inside it (async, or sync in its thread) carry both."""
    app_log = logging.getLogger("tests.singleton.app")
    handler = _JsonLines()
    app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    tokens: dict[str, int] = {}

    async def async_task(ctx: SingletonContext) -> None:
        tokens[ctx.name] = ctx.token
        app_log.info("async work")
        await asyncio.Event().wait()

    def sync_task(ctx: SingletonContext) -> None:
        tokens[ctx.name] = ctx.token
        app_log.info("sync work")

    node, _ = make_node("127.0.93.4", [])
    node.add_singleton("logs-async", async_task)
    node.add_singleton("logs-sync", sync_task)
    nodes.append(node)
    try:
        await node.start()
        await async_wait_until(lambda: len(handler.lines) >= 2, 5.0, message="two log lines")
    finally:
        app_log.removeHandler(handler)
    by_message = {line["message"]: line for line in handler.lines}
    for message, name in (("async work", "logs-async"), ("sync work", "logs-sync")):
        line = by_message[message]
        assert line.get("singleton") == name and line.get("token") == tokens[name] == 1, line
        assert line.get("node") == node.name, line


async def test_finished_background_tasks_are_not_kept(
    nodes: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    """A quorum holder renews its confirmation every heartbeat, each renewal in a task of
    its own: the node keeps a reference only until the task ends (no leak in a node that
    runs for months), and the loop reports no error when one ends."""
    timing = {"heartbeat_interval": 0.05, "failure_timeout": 0.3, "expected_nodes": 1}
    node, _ = make_node("127.0.93.5", [], **timing)
    running = asyncio.Event()

    async def hold(ctx: SingletonContext) -> None:
        running.set()
        await asyncio.Event().wait()

    node.add_singleton("q", hold, mode="quorum")
    nodes.append(node)
    await node.start()
    await asyncio.wait_for(running.wait(), 5.0)
    manager = node.singletons
    original = manager._renew
    renewed = 0

    async def counting(item):  # type: ignore[no-untyped-def]
        nonlocal renewed
        await original(item)
        renewed += 1

    manager._renew = counting  # type: ignore[method-assign]
    try:
        await async_wait_until(lambda: renewed >= 10, 10.0, message="ten renewals")
    finally:
        del manager._renew
    assert node.singletons.is_holder("q")

    def finished_but_kept() -> list[asyncio.Task[Any]]:
        return [task for task in manager._tasks if task.done()]

    # A task that has just finished is dropped by its done callback, which the loop runs
    # a step later: a leak is a finished task that stays, so wait for none to be kept.
    await async_wait_until(
        lambda: not finished_but_kept(), 2.0, message=f"finished tasks dropped ({renewed} renewals)"
    )
    assert "Exception in callback" not in caplog.text


async def test_only_one_background_revalidation_runs_at_a_time(nodes: list[Node]) -> None:
    """After a stall the node revalidates in the background, bounded by the failure timeout
    when a peer was lost meanwhile; the 0.1 s re-checks during that wait start no second
    revalidation (each would poll the peers every 50 ms until the same deadline)."""
    peers = [Peer("hi", h, 4371) for h in ("127.0.93.6", "127.0.93.7")]
    timing = {"heartbeat_interval": 0.1, "failure_timeout": 0.6}
    (a, gate_a), (b, gate_b) = (make_node(p.host, peers, **timing) for p in peers)
    running = asyncio.Event()

    async def hold(ctx: SingletonContext) -> None:
        running.set()
        await asyncio.Event().wait()

    a.add_singleton("s", hold)
    nodes.extend([a, b])
    await a.start()
    await b.start()
    await async_wait_until(lambda: a.nodes() == [b.name] and running.is_set(), 5.0)
    manager = a.singletons
    original_revalidate, original_reconcile = manager.revalidate, manager._reconcile
    in_flight, most, passes_during, passes_after = 0, 0, 0, 0
    done = asyncio.Event()

    async def counting_revalidate() -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await original_revalidate()
        finally:
            in_flight -= 1
            done.set()

    def counting_reconcile() -> None:
        nonlocal passes_during, passes_after
        passes_during += in_flight > 0
        passes_after += done.is_set()
        original_reconcile()

    manager.revalidate = counting_revalidate  # type: ignore[method-assign]
    manager._reconcile = counting_reconcile  # type: ignore[method-assign]
    try:
        gate_a.peers = gate_b.peers = []  # the peer lost in the stall stays away
        time.sleep(1.0)  # noqa: ASYNC251 (the fault under test: a blocked loop)
        await asyncio.wait_for(done.wait(), 5.0)
        # Re-checks after it ended: none starts another one.
        await async_wait_until(lambda: passes_after >= 3, 5.0, message="three re-checks")
    finally:
        del manager.revalidate, manager._reconcile
    # A witness that the check loop ran while the revalidation waited for the lost peer.
    assert passes_during >= 3, passes_during
    assert most == 1, f"{most} revalidations at once"


async def test_lease_mode_without_a_dsn_names_the_setting() -> None:
    """The error a user sees when a lease-mode singleton has no database configured."""
    node, _ = make_node("127.0.93.8", [])
    with pytest.raises(ValueError) as raised:
        node.add_singleton("u", lambda ctx: None, mode="lease")
    assert str(raised.value) == "lease mode needs SHOAL_LEASE_DSN (a Postgres DSN)"
