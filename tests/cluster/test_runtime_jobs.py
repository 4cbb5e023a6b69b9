"""Run-time jobs and run history across real in-process nodes, without a database: a job
added, paused, resumed or removed on one node reaches every node (a late joiner too), and
every node shows every node's runs.

Loopback aliases 127.0.66.x belong to this module.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from shoal.config import Peer
from shoal.node import Node
from shoal.scheduler import InvalidJob, JobExists, JobNotFound, RunContext
from tests.mesh.conftest import Proposals, settings_for
from tests.support.procs import async_wait_until

_HOSTS = itertools.cycle(f"127.0.66.{i}" for i in range(2, 250))
Ran = list[tuple[str, str, Any]]  # (job, node, tick)


def peer(host: str) -> Peer:
    return Peer("hi", host, 4370)


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[..., Awaitable[tuple[list[Node], Ran]]]]:
    """`await cluster(n)`: n connected nodes, each with the task "record"."""
    nodes: list[Node] = []
    ran: Ran = []

    async def make(count: int, join: list[Node] | None = None) -> tuple[list[Node], Ran]:
        hosts = [next(_HOSTS) for _ in range(count)]
        others = [peer(n.settings.host) for n in join or []]
        made = []
        for host in hosts:
            node = Node(settings_for(host), Proposals([*others, *(peer(h) for h in hosts)]))

            @node.jobs.task("record")
            def record(ctx: RunContext) -> None:
                ran.append((ctx.job, ctx.node, ctx.tick))

            nodes.append(node)
            made.append(node)
            await node.start()
        everyone = [*(join or []), *made]
        for node in everyone:
            want = sorted(n.name for n in everyone if n is not node)
            await async_wait_until(lambda node=node, want=want: node.nodes() == want, 10.0)
        return made, ran

    yield make
    for node in reversed(nodes):
        await node.stop()


def row(node: Node, name: str) -> dict[str, Any] | None:
    return next((r for r in node.jobs.snapshot() if r["name"] == name), None)


async def test_a_job_added_on_one_node_runs_once_per_tick_and_every_node_sees_it(
    cluster: Callable[..., Awaitable[tuple[list[Node], Ran]]],
) -> None:
    nodes, ran = await cluster(3)
    a, b, c = nodes
    await b.jobs.add("every-second", "* * * * * *", "record", misfire="run_once")
    await async_wait_until(lambda: all(row(n, "every-second") for n in nodes), 5.0)
    for node in nodes:
        r = row(node, "every-second")
        assert r is not None and r["defined"] == "runtime" and r["task"] == "record"
    await async_wait_until(lambda: len(ran) >= 3, 6.0)
    ticks = [tick for job, _, tick in ran if job == "every-second"]
    assert len(ticks) == len(set(ticks))  # once per cluster, not once per node

    # Every node knows every run, whichever node ran it.
    def everyone_has_the_runs() -> bool:
        wanted = {tick for job, _, tick in ran if job == "every-second"}
        return all(wanted <= {r.tick for r in n.jobs.runs("every-second")} for n in nodes)

    await async_wait_until(everyone_has_the_runs, 5.0)
    (latest, *_) = c.jobs.runs("every-second")
    assert latest.status == "ok" and latest.attempts == 1 and latest.node in [n.name for n in nodes]

    with pytest.raises(JobExists):
        await a.jobs.add("every-second", "* * * * * *", "record")
    with pytest.raises(InvalidJob, match="no task"):
        await a.jobs.add("other", "* * * * * *", "missing")
    with pytest.raises(InvalidJob):
        await a.jobs.add("other", "not cron", "record")
    with pytest.raises(InvalidJob):
        await a.jobs.add("other", "* * * * * *", "record", max_attempts=0)
    assert row(a, "other") is None

    await c.jobs.pause("every-second")
    await async_wait_until(
        lambda: all(not (row(n, "every-second") or {}).get("active", True) for n in nodes), 5.0
    )
    paused_at, until = len(ran), time.monotonic() + 2.2  # two ticks pass while paused
    await async_wait_until(lambda: time.monotonic() >= until, 3.0, interval=0.1)
    assert len(ran) <= paused_at + 1  # at most a run already in flight
    await a.jobs.resume("every-second")
    await async_wait_until(lambda: len(ran) >= paused_at + 2, 5.0)

    await a.jobs.remove("every-second")
    await async_wait_until(lambda: all(row(n, "every-second") is None for n in nodes), 5.0)
    with pytest.raises(JobNotFound):
        await b.jobs.remove("every-second")


async def test_a_node_that_joins_later_learns_the_jobs_and_their_history(
    cluster: Callable[..., Awaitable[tuple[list[Node], Ran]]],
) -> None:
    (a, b), _ = await cluster(2)
    await a.jobs.add("kept", "* * * * * *", "record")
    await a.jobs.add("gone", "0 0 1 1 *", "record")
    await async_wait_until(lambda: row(b, "gone") is not None, 5.0)
    await b.jobs.remove("gone")
    await a.jobs.pause("kept")  # paused after its first runs
    await a.jobs.resume("kept")
    await async_wait_until(lambda: len(a.jobs.runs("kept")) >= 1, 5.0)

    (c,), _ = await cluster(1, join=[a, b])
    await async_wait_until(lambda: row(c, "kept") is not None, 5.0)
    assert row(c, "gone") is None  # the removal travelled, not only the addition
    await async_wait_until(lambda: len(c.jobs.runs("kept")) >= 1, 5.0)


async def test_a_job_defined_in_code_pauses_everywhere_but_cannot_be_removed(
    cluster: Callable[..., Awaitable[tuple[list[Node], Ran]]],
) -> None:
    (a, b), _ = await cluster(2)
    for node in (a, b):
        node.scheduler.add_job("@daily", lambda: None, name="coded")
    await b.jobs.pause("coded")
    await async_wait_until(lambda: not a.scheduler.find_job("coded").active, 5.0)
    with pytest.raises(InvalidJob, match="defined in code"):
        await a.jobs.remove("coded")
    await a.jobs.resume("coded")
    await async_wait_until(lambda: b.scheduler.find_job("coded").active, 5.0)
    with pytest.raises(JobExists):  # a run-time job cannot replace it either
        await a.jobs.add("coded", "* * * * * *", "record")
