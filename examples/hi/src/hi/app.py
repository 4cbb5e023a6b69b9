"""The `hi` app: one shoal node and its HTTP face in one process (`.venv/bin/hi`).

Configured only by the contract's environment variables (see the README):
RELEASE_COOKIE, NODE_NAME, NODE_HOST, TOPOLOGY_TYPE, ..., and PORT for HTTP.

On SIGTERM/SIGINT the node drains first (`/ready` turns 503 at once, singletons
hand over, peers are told) while HTTP keeps answering; only then does uvicorn
stop, so a load balancer sees the node leave before its port closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from hi.jobs import add_hi_job
from hi.pages import render_page
from shoal import ConfigError, Node
from shoal import loop as shoal_loop

log = logging.getLogger("hi")

EVENTS_TOPIC = "hi.events"
MAX_WAIT = 60.0
# uvicorn's wait for open connections after the node has already left; short,
# because a draining node has nothing left that needs it.
GRACEFUL_HTTP_SHUTDOWN = 1


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


def create_app(node: Node) -> FastAPI:
    """The HTTP app for a started (or starting) `node`."""
    app = FastAPI(title="hi", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "node": node.name}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        state = "ready" if node.ready else ("draining" if node.draining else "starting")
        return JSONResponse({"status": state, "node": node.name}, 200 if node.ready else 503)

    async def cluster() -> dict[str, Any]:
        return cluster_view(node)

    async def wait(key: str, timeout: float = 10.0) -> JSONResponse:
        """Wait for the event `key` to be posted on any node of the cluster."""
        if not 0 < timeout <= MAX_WAIT:
            return JSONResponse({"detail": f"timeout must be in (0, {MAX_WAIT:g}]"}, 422)
        try:
            event = await node.wait_for(
                EVENTS_TOPIC, timeout, match=lambda e: isinstance(e, dict) and e.get("key") == key
            )
        except TimeoutError:
            return JSONResponse({"detail": f"no event {key!r} within {timeout:g} s"}, 504)
        return JSONResponse({"event": event, "received_on": node.name})

    async def event(key: str, request: Request) -> JSONResponse:
        """Publish the event `key` (optional JSON body as its data) to every node."""
        body = await request.body()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return JSONResponse({"detail": "the body must be JSON (or empty)"}, 400)
        payload = {"key": key, "data": data, "from": node.name}
        try:
            await node.publish(EVENTS_TOPIC, payload)
        except TypeError as exc:
            return JSONResponse({"detail": str(exc)}, 400)
        return JSONResponse({"published": payload}, 202)

    # Behind the load balancer, /krillin/* reaches krillin only: its page and
    # API live under that prefix too, so the page's own requests stay on krillin.
    for prefix in ("", "/krillin"):
        app.add_api_route(f"{prefix}/cluster", cluster, methods=["GET"])
        app.add_api_route(f"{prefix}/wait/{{key}}", wait, methods=["GET"])
        app.add_api_route(f"{prefix}/event/{{key}}", event, methods=["POST"])

    def page(route: str) -> HTMLResponse:
        return HTMLResponse(render_page(cluster_view(node), route))

    @app.get("/", response_class=HTMLResponse)
    async def vegeta_page() -> HTMLResponse:
        return page("/")

    @app.get("/krillin", response_class=HTMLResponse)
    @app.get("/krillin/{rest:path}", response_class=HTMLResponse)
    async def krillin_page(rest: str = "") -> HTMLResponse:
        return page("/krillin")

    return app


class HiServer(uvicorn.Server):
    """uvicorn, except that a signal first drains the node, then stops HTTP."""

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node
        self._drain: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain is not None:  # a second signal: stop waiting
            self.force_exit = self.should_exit = True
            return
        log.info("%s: leaving the cluster", signal.Signals(sig).name)
        self._drain = asyncio.create_task(self._leave())

    async def _leave(self) -> None:
        try:
            await self.node.stop()
        finally:
            self.should_exit = True


async def serve(node: Node, port: int) -> int:
    """Run the node and its HTTP server until a signal; the exit code."""
    try:
        await node.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    config = uvicorn.Config(
        create_app(node),
        host="0.0.0.0",
        port=port,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_HTTP_SHUTDOWN,
    )
    server = HiServer(config, node)
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits this way when the HTTP port is taken (logged)
        return 1
    finally:
        await node.stop()
    return 0 if server.started else 1


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def http_port(env: dict[str, str] | os._Environ[str]) -> int:
    text = env.get("PORT") or "4000"
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"PORT={text!r} is not a whole number.") from None
    if not 0 < port < 65536:
        raise ConfigError(f"PORT={port}: a port is between 1 and 65535.")
    return port


def main() -> None:
    """Entry point of `.venv/bin/hi`: exit 2 on bad configuration, 1 on other failures."""
    configure_logging()
    try:
        node = Node.from_env()
        port = http_port(os.environ)
        add_hi_job(node, os.environ)
        shoal_loop.selected()  # SHOAL_EVENT_LOOP: uvloop where installed, asyncio otherwise
    except ConfigError as exc:
        print(f"hi: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(shoal_loop.run(serve(node, port)))


if __name__ == "__main__":
    main()
