"""The `hi` app: one shoal node and its HTTP face in one process (`.venv/bin/hi`).

Configured only by the contract's environment variables (see the README):
RELEASE_COOKIE, NODE_NAME, NODE_HOST, TOPOLOGY_TYPE, ..., and PORT for HTTP.

On SIGTERM/SIGINT the app drains through `shoal.asgi.serve` (see
`shoal.drain`): `/ready` turns 503 at once while every request is still served
for the lame duck (`SHOAL_LAME_DUCK_MS`), then the port closes and requests in
flight finish (a `/wait` still receives its event: the node is still in the
mesh) or get a retryable 503; only then does the node hand over its singletons
and leave the mesh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from hi.jobs import add_hi_job
from hi.pages import render_page
from shoal import ConfigError, MessageTooLarge, Node, logs
from shoal import loop as shoal_loop
from shoal.asgi import serve as serve_http
from shoal.drain import Drain

try:
    import prometheus_client  # noqa: F401  # the optional extra is installed

    from shoal.metrics import NodeMetrics
except ImportError:  # pragma: no cover - without shoal[metrics]
    NodeMetrics = None  # type: ignore[assignment,misc]

log = logging.getLogger("hi")

EVENTS_TOPIC = "hi.events"
MAX_BLOCK = 30.0  # seconds; bound of /debug/block (only with HI_DEBUG_FAULTS=1)
# Serve HTTP (/health included) after this long even if discovery is not done.
READY_BEFORE_HTTP_S = 10.0


def cluster_view(node: Node) -> dict[str, Any]:
    """The `/cluster` document: the contract's keys plus service and readiness."""
    status = node.status()
    singletons = status.get("singletons") or {}
    return {
        **status,
        "node": node.name,
        "service": node.basename,
        "nodes": sorted(node.nodes()),
        "ready": node.ready,
        # The contract: name -> holder node (or null); details stay available.
        "singletons": {
            name: value.get("holder") if isinstance(value, dict) else value
            for name, value in singletons.items()
        },
        "singleton_details": singletons,
        "jobs": status.get("jobs") or [],
    }


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it proves longer than `limit` bytes.

    Checked while it streams in (and from Content-Length, before reading), so
    an oversized body is never held in memory whole.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(node: Node, drain: Drain | None = None, max_body: int | None = None) -> FastAPI:
    """The HTTP app for a started (or starting) `node`.

    `/wait` lasts at most the drain's longest request (`SHOAL_MAX_REQUEST_MS`).
    `max_body` bounds request bodies (`HI_MAX_BODY_BYTES`); by default the
    node's frame limit, since a larger event could not be published anyway.
    """
    drain = drain or Drain()
    max_wait = drain.max_request
    body_limit = node.settings.max_frame_size if max_body is None else max_body
    app = FastAPI(title="hi", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "node": node.name}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready = node.ready and drain.serving
        draining = node.draining or not drain.serving
        state = "ready" if is_ready else ("draining" if draining else "starting")
        return JSONResponse({"status": state, "node": node.name}, 200 if is_ready else 503)

    async def cluster() -> dict[str, Any]:
        return cluster_view(node)

    async def wait(key: str, timeout: float = 10.0) -> JSONResponse:
        """Wait for the event `key` to be posted on any node of the cluster."""
        if not 0 < timeout <= max_wait:
            return JSONResponse({"detail": f"timeout must be in (0, {max_wait:g}]"}, 422)
        try:
            event = await node.wait_for(
                EVENTS_TOPIC, timeout, match=lambda e: isinstance(e, dict) and e.get("key") == key
            )
        except TimeoutError:
            return JSONResponse({"detail": f"no event {key!r} within {timeout:g} s"}, 504)
        return JSONResponse({"event": event, "received_on": node.name})

    async def event(key: str, request: Request) -> JSONResponse:
        """Publish the event `key` (optional JSON body as its data) to every node."""
        body = await read_body(request, body_limit)
        if body is None:
            detail = f"the body is larger than {body_limit} bytes (HI_MAX_BODY_BYTES)"
            return JSONResponse({"detail": detail}, 413)
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):
            return JSONResponse({"detail": "the body must be JSON (or empty)"}, 400)
        payload = {"key": key, "data": data, "from": node.name}
        try:
            await node.publish(EVENTS_TOPIC, payload)
        except MessageTooLarge as exc:
            return JSONResponse({"detail": f"the event is too large to publish: {exc}"}, 413)
        except TypeError as exc:
            return JSONResponse({"detail": str(exc)}, 400)
        return JSONResponse({"published": payload}, 202)

    node_metrics = NodeMetrics(node) if NodeMetrics is not None else None

    async def metrics() -> Response:
        """Prometheus text exposition (needs the shoal[metrics] extra)."""
        if node_metrics is None:
            return PlainTextResponse("install shoal[metrics] (prometheus-client)\n", 501)
        body, content_type = node_metrics.render()
        return Response(body, media_type=content_type)

    # Behind the load balancer, /krillin/* reaches krillin only: its page and
    # API live under that prefix too, so the page's own requests stay on krillin.
    for prefix in ("", "/krillin"):
        app.add_api_route(f"{prefix}/metrics", metrics, methods=["GET"])
        app.add_api_route(f"{prefix}/cluster", cluster, methods=["GET"])
        app.add_api_route(f"{prefix}/wait/{{key}}", wait, methods=["GET"])
        app.add_api_route(f"{prefix}/event/{{key}}", event, methods=["POST"])

    def page(route: str) -> HTMLResponse:
        return HTMLResponse(render_page(cluster_view(node), route))

    if os.environ.get("HI_DEBUG_FAULTS") == "1":

        @app.post("/debug/block")
        async def block(seconds: float = 1.0) -> JSONResponse:
            """Fault injection for the nemesis: block this node's event loop (sync sleep)."""
            if not 0 < seconds <= MAX_BLOCK:
                return JSONResponse({"detail": f"seconds must be in (0, {MAX_BLOCK:g}]"}, 422)
            log.warning("blocking the event loop for %.1f s (HI_DEBUG_FAULTS)", seconds)
            time.sleep(seconds)  # noqa: ASYNC251 (deliberately on the loop: that is the fault)
            return JSONResponse({"blocked": seconds, "node": node.name})

    @app.get("/", response_class=HTMLResponse)
    async def vegeta_page() -> HTMLResponse:
        return page("/")

    @app.get("/krillin", response_class=HTMLResponse)
    @app.get("/krillin/{rest:path}", response_class=HTMLResponse)
    async def krillin_page(rest: str = "") -> HTMLResponse:
        return page("/krillin")

    return app


async def serve(node: Node, port: int, drain: Drain, app: FastAPI | None = None) -> int:
    """Run the node and its HTTP server (`create_app(node, drain)` unless given) until a
    signal has drained both; the exit code. (The node keeps its jobs in Postgres itself
    when SHOAL_LEASE_DSN is set.)"""
    return await _serve(node, port, drain, app or create_app(node, drain))


async def _serve(node: Node, port: int, drain: Drain, app: FastAPI) -> int:
    try:
        await node.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    # A load balancer may route to a new address before its first check (HAProxy
    # does, on a DNS change): open HTTP once discovery has found the peers, so
    # no request lands on a node that is not in the mesh yet.
    with contextlib.suppress(TimeoutError):
        await node.wait_ready(READY_BEFORE_HTTP_S)
    return await serve_http(
        app,
        drain,
        on_stopped=node.stop,
        port=port,
        access_log=False,
        log_config=None,
        server_header=False,
    )


def configure_logging(env: dict[str, str] | os._Environ[str]) -> None:
    """Dated text lines on stderr, or JSON lines with SHOAL_LOG_FORMAT=json."""
    try:
        fmt = logs.log_format(env)
    except ConfigError as exc:
        logs.configure("text")
        log.error("configuration error: %s", exc)
        sys.exit(2)
    logs.configure(fmt)


def http_port(env: dict[str, str] | os._Environ[str]) -> int:
    text = env.get("PORT") or "4000"
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"PORT={text!r} is not a whole number.") from None
    if not 0 < port < 65536:
        raise ConfigError(f"PORT={port}: a port is between 1 and 65535.")
    return port


def max_body_bytes(env: dict[str, str] | os._Environ[str]) -> int | None:
    """`HI_MAX_BODY_BYTES`, or None for the default (the node's frame limit)."""
    text = env.get("HI_MAX_BODY_BYTES")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"HI_MAX_BODY_BYTES={text!r} is not a whole number.") from None
    if value < 0:
        raise ConfigError(f"HI_MAX_BODY_BYTES={value}: expected 0 or more bytes.")
    return value


def main() -> None:
    """Entry point of `.venv/bin/hi`: exit 2 on bad configuration, 1 on other failures."""
    configure_logging(os.environ)
    try:
        node = Node.from_env()
        port = http_port(os.environ)
        max_body = max_body_bytes(os.environ)
        drain = Drain.from_env(os.environ)
        add_hi_job(node, os.environ)
        shoal_loop.selected()  # SHOAL_EVENT_LOOP: uvloop where installed, asyncio otherwise
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)
    app = create_app(node, drain, max_body)
    sys.exit(shoal_loop.run(serve(node, port, drain, app)))


if __name__ == "__main__":
    main()
