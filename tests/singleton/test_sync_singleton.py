"""A sync singleton function runs in a worker thread: it may block without stalling its node."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from shoal import Node, Settings
from shoal.singleton import SingletonContext
from tests.support.hi import COOKIE
from tests.support.procs import async_wait_until

HOST = "127.0.10.52"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def test_a_sync_singleton_runs_in_a_thread_until_it_is_no_longer_valid() -> None:
    node = Node(Settings(cookie=COOKIE, host=HOST, port=free_port(HOST), topology="static"))
    seen: list[tuple[str, bool]] = []
    finished = threading.Event()

    def consume(ctx: SingletonContext) -> None:  # blocking code, as a user would write it
        while ctx.is_valid():
            seen.append((threading.current_thread().name, ctx.is_valid()))
            time.sleep(0.05)
        finished.set()

    node.add_singleton("consumer", consume)
    await node.start()
    try:
        await async_wait_until(lambda: len(seen) >= 3, timeout=10, message="it runs")
        assert seen[0][0] != threading.current_thread().name
        started = time.monotonic()
        await node.ping(node.name)  # the loop is free while the function blocks
        assert time.monotonic() - started < 0.5
    finally:
        await node.stop()
    # Stopping the node released the singleton: is_valid() turned False in the thread.
    await async_wait_until(finished.is_set, timeout=5, message="the function returned")


async def test_a_sync_singleton_may_return_an_awaitable_which_runs_on_the_loop() -> None:
    node = Node(Settings(cookie=COOKIE, host=HOST, port=free_port(HOST), topology="static"))
    ran: list[str] = []

    async def on_the_loop(ctx: SingletonContext) -> None:
        ran.append(ctx.name)
        await asyncio.Event().wait()

    node.add_singleton("later", lambda ctx: on_the_loop(ctx))
    await node.start()
    try:
        await async_wait_until(lambda: ran == ["later"], timeout=5, message="awaited")
    finally:
        await node.stop()
