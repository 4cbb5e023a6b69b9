"""An ASGI app whose every worker process runs its own shoal node: `uvicorn --workers N`.

    WORKER_STATE_DIR=/tmp/x SHOAL_NODES_PER_HOST=4 ... \
        python -m uvicorn tests.support.worker_app:app --workers 4 --host H --port 8000

The node is made in the lifespan, so in each worker (SHOAL_NODES_PER_HOST
gives each its own mesh port and name). Each worker writes its view to
`$WORKER_STATE_DIR/<pid>.json` on every membership event: `pid`, `name`,
`port`, `nodes`, `listening_at` (Unix time the node listened) and `full_at`
(when it first saw `$WORKER_EXPECT_PEERS` peers), so a test reads every worker's view without
asking a load-balanced HTTP port which worker answers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shoal import MembershipEvent, Node


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state_dir = Path(os.environ["WORKER_STATE_DIR"])
    expect = int(os.environ.get("WORKER_EXPECT_PEERS") or 0)
    node = Node.from_env()
    full_at: float | None = None
    listening_at: float | None = None

    def write(_event: MembershipEvent | None = None) -> None:
        nonlocal full_at
        peers = node.nodes()
        if full_at is None and expect and len(peers) >= expect:
            full_at = time.time()
        state = {
            "pid": os.getpid(),
            "name": node.name,
            "port": node.settings.listen_port,
            "nodes": peers,
            "listening_at": listening_at,
            "full_at": full_at,
        }
        tmp = state_dir / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(state_dir / f"{os.getpid()}.json")

    node.add_listener(write)
    app.state.node = node
    async with node:
        listening_at = time.time()
        write()
        yield


async def cluster(request: Request) -> JSONResponse:
    node: Any = request.app.state.node
    return JSONResponse({"node": node.name, "nodes": node.nodes()})


app = Starlette(routes=[Route("/cluster", cluster)], lifespan=lifespan)
