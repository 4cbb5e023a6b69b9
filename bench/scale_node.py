"""A bare shoal node (no web app) for `bench/scale.py`, configured by the usual environment.

It writes one line per event to stdout, `<unix time in µs> <event> [fields]`:
`boot <pid> <event loop>` (time: process start, before imports), `imported`,
`listening`, `ready` (first discovery round done), `up <peer> <count>`,
`down <peer> <count> <reason>`, `stopped`. The count is the number of
connected peers after the event, so the driver can tell when the mesh is full
without asking the node anything.

It stops by itself after SCALE_LIFETIME_S seconds (default 300), so that no
node outlives a driver that was killed; SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import time

STARTED = time.time()

import asyncio  # noqa: E402  (the start time is taken before imports on purpose)
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import shoal.loop  # noqa: E402
from shoal import ConfigError, MembershipEvent, Node  # noqa: E402


def emit(*fields: object, at: float | None = None) -> None:
    """One event line, written with one system call so lines never interleave."""
    stamp = round((time.time() if at is None else at) * 1_000_000)
    os.write(1, (" ".join(str(f) for f in (stamp, *fields)) + "\n").encode())


async def serve(node: Node, lifetime: float) -> None:
    emit("boot", os.getpid(), shoal.loop.name(), at=STARTED)

    def on_event(event: MembershipEvent) -> None:
        count = len(node.nodes())
        if event.kind == "up":
            emit("up", event.node, count)
        else:
            emit("down", event.node, count, event.reason or "-")

    node.add_listener(on_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    emit("listening")
    try:
        await node.wait_ready(timeout=lifetime)
        emit("ready")
        await asyncio.wait_for(stop.wait(), timeout=lifetime)
    except TimeoutError:
        emit("lifetime-over")
    finally:
        await node.stop()
        emit("stopped")


def main() -> None:
    emit("imported")
    try:
        node = Node.from_env()
        lifetime = float(os.environ.get("SCALE_LIFETIME_S", "300"))
        shoal.loop.selected()
    except (ConfigError, ValueError) as exc:
        print(f"scale_node: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    shoal.loop.run(serve(node, lifetime))


if __name__ == "__main__":
    main()
