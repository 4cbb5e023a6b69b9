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

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

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


class QueryError(ValueError):
    """A query parameter is missing or not a number: 422, in FastAPI's error shape."""

    def __init__(self, name: str, kind: str, text: str | None) -> None:
        super().__init__(name)
        self.name, self.kind, self.text = name, kind, text

    def detail(self) -> list[dict[str, Any]]:
        if self.text is None:
            return [{"type": "missing", "loc": ["query", self.name], "msg": "Field required"}]
        msg = {
            "float": "Input should be a valid number, unable to parse string as a number",
            "int": "Input should be a valid integer, unable to parse string as an integer",
        }[self.kind]
        return [
            {
                "type": f"{self.kind}_parsing",
                "loc": ["query", self.name],
                "msg": msg,
                "input": self.text,
            }
        ]


_MISSING: Any = object()


def query_float(request: Request, name: str, default: float = _MISSING) -> float:
    """The query parameter `name` as a number; QueryError (422) when absent or malformed."""
    text = request.query_params.get(name)
    if text is None:
        if default is _MISSING:
            raise QueryError(name, "float", None)
        return default
    try:
        return float(text)
    except ValueError:
        raise QueryError(name, "float", text) from None


def query_int(request: Request, name: str) -> int:
    """The query parameter `name` as a whole number; QueryError (422) otherwise."""
    text = request.query_params.get(name)
    if text is None:
        raise QueryError(name, "int", None)
    try:
        return int(text)
    except ValueError:
        raise QueryError(name, "int", text) from None


def query_str(request: Request, name: str) -> str:
    """The query parameter `name`; QueryError (422) when absent."""
    text = request.query_params.get(name)
    if text is None:
        raise QueryError(name, "str", None)
    return text


async def _query_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueryError)
    return JSONResponse({"detail": exc.detail()}, 422)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """{"detail": ...} as JSON, as FastAPI answers a 404 or 405."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


def create_app(node: Node, drain: Drain | None = None, max_body: int | None = None) -> Starlette:
    """The HTTP app for a started (or starting) `node`.

    `/wait` lasts at most the drain's longest request (`SHOAL_MAX_REQUEST_MS`).
    `max_body` bounds request bodies (`HI_MAX_BODY_BYTES`); by default the
    node's frame limit, since a larger event could not be published anyway.

    Starlette directly (FastAPI is built on it): FastAPI and pydantic would
    cost `hi` about 17 MB of memory and half of its start for six routes.
    Answers are the same: JSON errors with a `detail`, 422 for a bad query.
    """
    drain = drain or Drain()
    max_wait = drain.max_request
    body_limit = node.settings.max_frame_size if max_body is None else max_body

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "node": node.name})

    async def ready(_request: Request) -> JSONResponse:
        is_ready = node.ready and drain.serving
        draining = node.draining or not drain.serving
        state = "ready" if is_ready else ("draining" if draining else "starting")
        return JSONResponse({"status": state, "node": node.name}, 200 if is_ready else 503)

    async def cluster(_request: Request) -> JSONResponse:
        return JSONResponse(cluster_view(node))

    async def wait(request: Request) -> JSONResponse:
        """Wait for the event `key` to be posted on any node of the cluster."""
        key = request.path_params["key"]
        timeout = query_float(request, "timeout", 10.0)
        if not 0 < timeout <= max_wait:
            return JSONResponse({"detail": f"timeout must be in (0, {max_wait:g}]"}, 422)
        try:
            event = await node.wait_for(
                EVENTS_TOPIC, timeout, match=lambda e: isinstance(e, dict) and e.get("key") == key
            )
        except TimeoutError:
            return JSONResponse({"detail": f"no event {key!r} within {timeout:g} s"}, 504)
        return JSONResponse({"event": event, "received_on": node.name})

    async def event(request: Request) -> JSONResponse:
        """Publish the event `key` (optional JSON body as its data) to every node."""
        key = request.path_params["key"]
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

    async def metrics(_request: Request) -> Response:
        """Prometheus text exposition (needs the shoal[metrics] extra)."""
        if node_metrics is None:
            return PlainTextResponse("install shoal[metrics] (prometheus-client)\n", 501)
        body, content_type = node_metrics.render()
        return Response(body, media_type=content_type)

    routes = [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
    # Behind the load balancer, /krillin/* reaches krillin only: its page and
    # API live under that prefix too, so the page's own requests stay on krillin.
    for prefix in ("", "/krillin"):
        routes += [
            Route(f"{prefix}/metrics", metrics, methods=["GET"]),
            Route(f"{prefix}/cluster", cluster, methods=["GET"]),
            Route(f"{prefix}/wait/{{key}}", wait, methods=["GET"]),
            Route(f"{prefix}/event/{{key}}", event, methods=["POST"]),
        ]

    def page(route: str) -> HTMLResponse:
        return HTMLResponse(render_page(cluster_view(node), route))

    if os.environ.get("HI_DEBUG_FAULTS") == "1":

        async def block(request: Request) -> JSONResponse:
            """Fault injection for the nemesis: block this node's event loop (sync sleep)."""
            seconds = query_float(request, "seconds", 1.0)
            if not 0 < seconds <= MAX_BLOCK:
                return JSONResponse({"detail": f"seconds must be in (0, {MAX_BLOCK:g}]"}, 422)
            log.warning("blocking the event loop for %.1f s (HI_DEBUG_FAULTS)", seconds)
            time.sleep(seconds)  # noqa: ASYNC251 (deliberately on the loop: that is the fault)
            return JSONResponse({"blocked": seconds, "node": node.name})

        routes.append(Route("/debug/block", block, methods=["POST"]))

    async def vegeta_page(_request: Request) -> HTMLResponse:
        return page("/")

    async def krillin_page(_request: Request) -> HTMLResponse:
        return page("/krillin")

    routes += [
        Route("/", vegeta_page, methods=["GET"]),
        Route("/krillin", krillin_page, methods=["GET"]),
        Route("/krillin/{rest:path}", krillin_page, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={QueryError: _query_error, HTTPException: _http_error},
    )


async def serve(node: Node, port: int, drain: Drain, app: Starlette | None = None) -> int:
    """Run the node and its HTTP server (`create_app(node, drain)` unless given) until a
    signal has drained both; the exit code. (The node keeps its jobs in Postgres itself
    when SHOAL_LEASE_DSN is set.)"""
    return await _serve(node, port, drain, app or create_app(node, drain))


async def _serve(node: Node, port: int, drain: Drain, app: Starlette) -> int:
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
