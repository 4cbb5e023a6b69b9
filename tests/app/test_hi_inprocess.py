"""The `hi` app in-process: readiness through a node's life, and escaping on the page."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from hi.app import create_app
from hi.pages import render_page

from shoal import Node, Settings
from tests.support.hi import COOKIE


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def test_ready_is_503_until_the_node_is_ready_and_again_while_draining() -> None:
    host = "127.0.10.50"
    node = Node(
        Settings(
            cookie="inprocess-test-cookie-5e4d3c2b1a09f8e7",
            host=host,
            port=free_port(host),
            topology="static",
        )
    )
    transport = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://hi") as client:
        before = await client.get("/ready")
        assert (before.status_code, before.json()["status"]) == (503, "starting")
        assert (await client.get("/health")).status_code == 200
        await node.start()
        try:
            await node.wait_ready(5)
            assert (await client.get("/ready")).status_code == 200
            node.draining = True  # what the first moment of node.stop() does
            draining = await client.get("/ready")
            assert (draining.status_code, draining.json()["status"]) == (503, "draining")
        finally:
            await node.stop()


def test_page_escapes_everything_it_shows() -> None:
    evil = "<script>alert(1)</script>"
    page = render_page(
        {
            "node": evil,
            "service": evil,
            "nodes": [evil],
            "cookie": evil,
            "singletons": {evil: evil},
            "jobs": [
                {
                    "name": evil,
                    "last_run": {"on": evil},
                    "history": [{"job": evil, "node": evil, "error": evil, "duration": 0.1}],
                }
            ],
        },
        route="/krillin",
    )
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_the_loop_blocking_endpoint_exists_only_with_hi_debug_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = Node(Settings(cookie=COOKIE, host="127.0.10.51", port=4370, topology="static"))
    monkeypatch.delenv("HI_DEBUG_FAULTS", raising=False)
    plain = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=plain, base_url="http://hi") as client:
        assert (await client.post("/debug/block?seconds=0.01")).status_code in (404, 405)
    monkeypatch.setenv("HI_DEBUG_FAULTS", "1")
    debug = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=debug, base_url="http://hi") as client:
        started = time.monotonic()
        reply = await client.post("/debug/block?seconds=0.2")
        assert reply.status_code == 200 and time.monotonic() - started >= 0.2
        assert (await client.post("/debug/block?seconds=31")).status_code == 422
