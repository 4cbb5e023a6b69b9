"""Sync functions the app gives shoal (singletons, jobs) run in threads, and however many
of them block, the others (and asyncio.to_thread, which Cloud Map polling uses) still run."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

from shoal import Node, SingletonContext
from tests.mesh.conftest import NodeFactory
from tests.support.procs import async_wait_until

# asyncio's default executor: min(32, CPUs + 4) threads.
DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


async def test_sync_singletons_do_not_starve_each_other_nor_jobs_nor_to_thread(
    make_node: NodeFactory,
) -> None:
    node: Node = await make_node()
    running: set[str] = set()
    stop = threading.Event()

    def hold(ctx: SingletonContext) -> None:  # a sync singleton runs as long as it holds
        running.add(ctx.name)
        while ctx.is_valid() and not stop.wait(0.05):
            pass

    # Before: each took one of the default executor's threads for good, so the ones
    # after those never started, nor did a sync job or anything else sent to a thread.
    names = [f"worker-{i}" for i in range(DEFAULT_EXECUTOR_THREADS + 2)]
    ran_job = threading.Event()
    try:
        for name in names:
            node.add_singleton(name, hold, mode="mesh")
        await async_wait_until(
            lambda: running == set(names),
            timeout=10,
            message=f"all {len(names)} sync singletons running",
        )
        node.scheduler.add_job("0 0 1 1 *", ran_job.set, name="report")
        result = await asyncio.wait_for(node.scheduler.run_now("report"), 10)
        assert result.status == "ok" and ran_job.is_set()
        assert await asyncio.wait_for(asyncio.to_thread(time.monotonic), 10) > 0
    finally:
        stop.set()


async def test_blocked_sync_jobs_do_not_starve_to_thread(make_node: NodeFactory) -> None:
    node: Node = await make_node()
    started: set[str] = set()
    stop = threading.Event()

    def blocking(name: str) -> Callable[[], None]:
        def block() -> None:
            started.add(name)
            stop.wait(30)

        return block

    names = [f"export-{i}" for i in range(DEFAULT_EXECUTOR_THREADS)]
    for name in names:
        node.scheduler.add_job("0 0 1 1 *", blocking(name), name=name, run_strategy="local")
    runs = [asyncio.ensure_future(node.scheduler.run_now(name)) for name in names]
    try:
        await async_wait_until(lambda: started == set(names), timeout=10, message="all running")
        # Before, the jobs held every thread of the default executor: this waited for them.
        assert await asyncio.wait_for(asyncio.to_thread(time.monotonic), 10) > 0
    finally:
        stop.set()
        for result in await asyncio.gather(*runs):
            assert result.status == "ok"
