"""`hi` with test hooks: ``python -m tests.support.hi_probe`` (same environment as `hi`).

The node under test is the real `hi` app; the hooks only let a test make it
do, from code, what an application would:

- handler `slow`: a sync handler that sleeps `payload` seconds (blocking its thread);
- handler `blob`: a sync handler that returns `payload` bytes;
- `POST /probe/call?node_name=N&handler=H&arg=X&call_timeout=T`: `node.call`, the outcome as JSON;
- `POST /probe/publish?size=N`: publish N bytes from code, the outcome as JSON;
- `POST /probe/frames?node_name=N&case=C&count=K`: send K worst-case frames (see
  `tests.wire.bench_decode`) as PUBLISH messages to node N, bypassing the size
  check; returns once N has handled them;
- `POST /probe/flood?node_name=N&size=S&count=K`: K calls to `blob` on N, 20 every
  10 ms, with reading from N paused, so that N's replies pile up (a peer that never reads).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from hi.app import (
    configure_logging,
    create_app,
    http_port,
    max_body_bytes,
    query_float,
    query_int,
    query_str,
    serve,
)
from hi.jobs import add_hi_job
from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import Node, wire
from shoal.drain import Drain
from tests.wire.bench_decode import worst_frames


def outcome(value: Any = None, error: BaseException | None = None) -> JSONResponse:
    if error is None:
        return JSONResponse({"ok": True, "value": value})
    return JSONResponse({"ok": False, "error": type(error).__name__, "message": str(error)})


def main() -> None:
    configure_logging(os.environ)
    node = Node.from_env()
    node.register("slow", lambda seconds, _sender: time.sleep(float(seconds)) or "slept")
    node.register("blob", lambda size, _sender: b"x" * int(size))
    add_hi_job(node, os.environ)
    drain = Drain.from_env(os.environ)
    app = create_app(node, drain, max_body_bytes(os.environ))
    tasks: set[asyncio.Task[Any]] = set()

    async def call(request: Request) -> JSONResponse:
        node_name, handler = query_str(request, "node_name"), query_str(request, "handler")
        arg, call_timeout = query_float(request, "arg"), query_float(request, "call_timeout")
        started = time.monotonic()
        try:
            value = await node.call(node_name, handler, arg, timeout=call_timeout)
        except Exception as exc:
            return outcome(error=exc)
        return outcome({"reply": str(value)[:100], "seconds": time.monotonic() - started})

    async def publish(request: Request) -> JSONResponse:
        size = query_int(request, "size")
        try:
            await node.publish("probe", b"x" * size)
        except Exception as exc:
            return outcome(error=exc)
        return outcome()

    async def frames(request: Request) -> JSONResponse:
        node_name, case = query_str(request, "node_name"), query_str(request, "case")
        count = query_int(request, "count")
        size = node.settings.max_frame_size
        envelope = b"\x93\x05\xa1t"  # [PUBLISH, "t", <the worst-case array>]
        body = envelope + dict(worst_frames(size - len(envelope)))[case]
        data = wire.HEADER.pack(len(body)) + body
        conn = node.mesh.connection_to(node_name) if node.mesh else None
        if conn is None:
            return outcome(error=RuntimeError("not connected"))
        for _ in range(count):
            conn.send_encoded(data)
            await conn.drain()
        # Returns once the receiver has handled them all: a call is ordered behind them.
        await node.call(node_name, "shoal.ping", None, timeout=60)
        return outcome(len(body))

    async def flood(request: Request) -> JSONResponse:
        node_name = query_str(request, "node_name")
        size, count = query_int(request, "size"), query_int(request, "count")
        assert node.mesh is not None
        transport = node.mesh.connection_to(node_name).transport
        assert transport is not None
        transport.pause_reading()
        for i in range(count):
            task = asyncio.create_task(node.call(node_name, "blob", size, timeout=30))
            task.add_done_callback(lambda t: t.exception())  # retrieved: not logged
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if i % 20 == 19:
                await asyncio.sleep(0.01)
        return outcome(count)

    for path, endpoint in (
        ("/probe/call", call),
        ("/probe/publish", publish),
        ("/probe/frames", frames),
        ("/probe/flood", flood),
    ):
        app.add_route(path, endpoint, methods=["POST"])
    sys.exit(asyncio.run(serve(node, http_port(os.environ), drain, app=app)))


if __name__ == "__main__":
    main()
