"""`POST /event/{key}` bounds its body while it streams in: 413, never a whole read."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from hi.app import create_app, max_body_bytes

from shoal import ConfigError, Node, Settings
from tests.support.hi import COOKIE

HOST = "127.0.10.51"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(Settings(cookie=COOKIE, host=HOST, port=free_port(HOST), topology="static"))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def client_for(node: Node, max_body: int | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node, max_body=max_body))
    return httpx.AsyncClient(transport=transport, base_url="http://hi")


async def test_a_body_over_the_limit_gets_413_from_its_content_length(node: Node) -> None:
    async with client_for(node, max_body=1000) as client:
        response = await client.post("/event/k", content=b'"' + b"x" * 999 + b'"')
        assert response.status_code == 413
        assert "1000 bytes (HI_MAX_BODY_BYTES)" in response.json()["detail"]
        fits = await client.post("/event/k", content=b'"' + b"x" * 998 + b'"')
        assert fits.status_code == 202


async def test_a_streamed_body_is_refused_once_it_passes_the_limit(node: Node) -> None:
    read = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        nonlocal read
        for _ in range(1000):  # 1 MB if it were read to the end
            read += 1
            yield b" " * 1000

    async with client_for(node, max_body=10_000) as client:
        response = await client.post("/event/k", content=chunks())
    assert response.status_code == 413
    assert read < 1000  # the ASGI transport reads the request body as the app asks for it


async def test_the_default_limit_is_the_frame_limit_and_an_event_that_does_not_fit_gets_413(
    node: Node,
) -> None:
    async with client_for(node) as client:
        over = await client.post("/event/k", content=b"1" * (node.settings.max_frame_size + 1))
        assert over.status_code == 413
    # A body under HI_MAX_BODY_BYTES whose event is too large for a frame (floats grow
    # from 4 bytes of JSON to 9 of msgpack) is refused as such, not with a 500.
    body = b"[" + b"0.5," * 100_000 + b"0.5]"
    async with client_for(node, max_body=len(body)) as client:
        response = await client.post("/event/k", content=body)
    assert response.status_code == 413
    assert "too large to publish" in response.json()["detail"]


def test_hi_max_body_bytes_is_validated() -> None:
    assert max_body_bytes({}) is None
    assert max_body_bytes({"HI_MAX_BODY_BYTES": "2048"}) == 2048
    for bad in ("lots", "-1"):
        with pytest.raises(ConfigError, match="HI_MAX_BODY_BYTES"):
            max_body_bytes({"HI_MAX_BODY_BYTES": bad})
