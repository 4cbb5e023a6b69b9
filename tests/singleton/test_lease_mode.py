"""Lease-mode singletons on a real Postgres: a lost lease or database stops the holder."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from shoal import Node, Peer
from shoal.singleton import SingletonContext
from tests.singleton.test_singletons import Recorder, make_node, stopper
from tests.support.postgres import PostgresServer, running_postgres, unavailable_reason
from tests.support.procs import async_wait_until

__all__ = ["stopper"]  # the fixture, imported for the tests here

pg_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(pg_reason is not None, reason=str(pg_reason))


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """One server for the tests here (each uses its own singleton name): starting one is
    most of a lease test's time, and mutation runs repeat these tests per mutant."""
    with running_postgres() as server:
        yield server


def recording(rec: Recorder, contexts: list[SingletonContext], name: str) -> Any:
    inner = rec.func(name)

    async def run(ctx: SingletonContext) -> None:
        contexts.append(ctx)
        await inner(ctx)

    return run


async def test_a_holder_whose_lease_was_taken_stops_and_the_new_holder_has_a_higher_token(
    stopper: list[Node], pg: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease ended under the holder (as after a database failover): at its next renewal
    the holder stops its task and `is_valid()` turns False; the other node acquires it with
    the next fencing token."""
    caplog.set_level(logging.INFO, "shoal.singleton")
    rec, contexts = Recorder(), []
    peers = [Peer("hi", h, 4371) for h in ("127.0.87.2", "127.0.87.3")]
    nodes = [make_node(p.host, peers, lease_dsn=pg.dsn, lease_ttl=0.6)[0] for p in peers]
    for node in nodes:
        node.add_singleton("taken", recording(rec, contexts, node.name), mode="lease")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 5.0)
    (first,) = rec.running
    old = contexts[0]
    assert old.mode == "lease" and old.token == 1 and old.is_valid()
    conn = await asyncpg.connect(pg.dsn)
    try:
        expire = "UPDATE shoal_leases SET expires_at = now() - interval '1 second' WHERE name = $1"
        await conn.execute(expire, "taken")
    finally:
        await conn.close()
    await async_wait_until(lambda: first in rec.cancelled, 2.0, message="the holder stopped")
    assert not old.is_valid()
    assert f"stopping on {first} (lease lost)" in caplog.text  # at its renewal, not later
    await async_wait_until(lambda: len(rec.running) == 1, 3.0)
    assert [token for _, token in rec.starts][-1] > old.token


async def test_lease_takeovers_increase_the_fencing_token(
    stopper: list[Node], pg: PostgresServer
) -> None:
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.76.2", "127.0.76.3")]
    nodes = [make_node(p.host, peers, lease_dsn=pg.dsn, lease_ttl=1.0)[0] for p in peers]
    for node in nodes:
        node.add_singleton("handover", rec.func(node.name), mode="lease")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 5.0)
    (first,) = rec.running
    await next(n for n in nodes if n.name == first).stop()  # releases the lease
    await async_wait_until(lambda: len(rec.running) == 1 and first not in rec.running, 3.0)
    assert [token for _, token in rec.starts] == [1, 2]


async def test_a_lease_holder_renews_and_keeps_it_over_several_ttls(
    stopper: list[Node], pg: PostgresServer
) -> None:
    rec = Recorder()
    peers = [Peer("hi", h, 4371) for h in ("127.0.82.2", "127.0.82.3")]
    nodes = [make_node(p.host, peers, lease_dsn=pg.dsn, lease_ttl=0.6)[0] for p in peers]
    for node in nodes:
        node.add_singleton("renewed", rec.func(node.name), mode="lease")
        stopper.append(node)
    for node in nodes:
        await node.start()
    await async_wait_until(lambda: len(rec.running) == 1, 5.0)
    (holder_name,) = rec.running
    holder = next(n for n in nodes if n.name == holder_name)
    backend = holder.singletons.lease_backend
    assert backend is not None
    renewed: list[bool] = []
    renew = backend.renew

    async def counting(name: str, owner: str, token: int, ttl: float) -> bool:
        ok = await renew(name, owner, token, ttl)
        renewed.append(ok)
        return ok

    backend.renew = counting  # type: ignore[method-assign]
    # Six renewals (every ttl/3) span three lease lengths: without them it would expire.
    await async_wait_until(lambda: len(renewed) >= 6, 5.0, message="six renewals")
    assert all(renewed), renewed
    assert rec.running == {holder_name} and rec.starts == [(holder_name, 1)]


def server_processes(pg: PostgresServer) -> list[int]:
    """The server's postmaster and its children (a backend serves each connection)."""
    children = subprocess.run(
        ["pgrep", "-P", str(pg.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [pg.process.pid, *map(int, children)]


@pytest.mark.parametrize("fault", ["shut down", "hung"])
async def test_a_holder_that_cannot_reach_the_database_stops_before_its_lease_ends(
    stopper: list[Node], fault: str
) -> None:
    """Postgres goes away or hangs: the holder cannot renew, and stops its task before the
    lease it last renewed can expire (another node could take it then)."""
    rec, contexts = Recorder(), []
    ttl = 1.0
    with running_postgres() as pg:  # its own server: this test stops it
        node, _ = make_node("127.0.88.2", [], lease_dsn=pg.dsn, lease_ttl=ttl)
        node.add_singleton("s", recording(rec, contexts, node.name), mode="lease")
        stopper.append(node)
        await node.start()
        await async_wait_until(lambda: len(rec.running) == 1, 5.0)
        ctx = contexts[0]
        await async_wait_until(ctx.is_valid, 1.0)
        backend = node.singletons.lease_backend
        assert backend is not None
        renewed: list[float] = []
        renew = backend.renew

        async def timed(name: str, owner: str, token: int, ttl: float) -> bool:
            asked = time.monotonic()
            ok = await renew(name, owner, token, ttl)
            renewed.append(asked)
            return ok

        backend.renew = timed  # type: ignore[method-assign]
        await async_wait_until(lambda: renewed, 2.0, message="a renewal")
        stopped = server_processes(pg) if fault == "hung" else []
        try:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            if fault == "shut down":
                pg.process.send_signal(signal.SIGINT)  # fast shutdown: clients are cut off
            await async_wait_until(lambda: rec.cancelled == [node.name], 3.0)
            # Within the lease last renewed, less the drain bound (plus one 0.1 s check).
            assert time.monotonic() - renewed[-1] < ttl - node.singletons.drain_bound("lease") + 0.2
            assert not ctx.is_valid()
            assert rec.running == set() and len(rec.starts) == 1
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        await node.stop()
