"""A new node joins within 2 s while 12 addresses flood a node with half-open handshakes.

Real processes: node A runs; an attacker process holds 32 half-open
connections from each of 12 source addresses (more than A's total cap), and
reopens each one as soon as A drops it. Node B then starts; A does not know
about B (its SHOAL_HOSTS lists only itself), so B's inbound handshake must get
through the flood. From the moment B is ready, A and B must see each other
within 2 s. A's log stays readable:
refusals and drops are rate-limited.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

# B, the newcomer, has the smaller name: its own dial to A would win a
# simultaneous connect, yet that dial is the one the flood gets in the way of.
A, B = "127.0.62.3", "127.0.62.2"
ATTACKERS = [f"127.0.62.{i}" for i in range(100, 112)]
PER_ADDRESS = 32
JOIN_WITHIN = 2.0

# Holds PER_ADDRESS half-open handshakes per source address; reconnects at once
# when one is dropped. Stops by itself after `seconds` (bounded even if orphaned).
FLOOD = r"""
import asyncio, sys, time
target, port, per, seconds, *sources = sys.argv[1:]
port, per, seconds = int(port), int(per), float(seconds)
held = 0
opened = 0

async def hold(source):
    global held, opened
    while True:
        try:
            reader, writer = await asyncio.open_connection(target, port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        opened += 1
        held += 1
        try:
            writer.write(b"\x00\x00")  # the start of a length prefix, and nothing more
            await reader.read()
        except OSError:
            pass
        finally:
            held -= 1
            writer.close()

async def main():
    tasks = [asyncio.create_task(hold(s)) for s in sources for _ in range(per)]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        print(f"held {held} opened {opened}", flush=True)
        await asyncio.sleep(0.25)

asyncio.run(main())
"""


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as group:
        yield group


def test_a_new_node_joins_within_two_seconds_during_a_handshake_flood(procs: Procs) -> None:
    env = {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list([A, B])}
    # A long handshake timeout: slots are held long, as a slow attacker would hold them.
    a_env = {**env, "SHOAL_HOSTS": hosts_list([A]), "SHOAL_HANDSHAKE_TIMEOUT_MS": "10000"}
    a = HiNode.start(procs, A, env=a_env)
    a.wait_ready()
    flood = procs.start(
        [sys.executable, "-c", FLOOD, A, "4370", str(PER_ADDRESS), "60", *ATTACKERS],
        name="flood",
    )

    def opened() -> int:
        lines = [line for line in flood.output().splitlines() if line.startswith("held")]
        return int(lines[-1].split()[3]) if lines else 0

    # The flood is on: more connections opened than A may hold, and A refuses some.
    wait_until(lambda: opened() > 2 * 256, 20, message="the flood fills A's handshake table")
    wait_until(lambda: "refusing" in a.proc.output(), 10, message="A refuses connections")
    flood_started = time.monotonic()

    b = HiNode.start(procs, B, env=env)
    b.wait_ready(30)
    ready_at = time.monotonic()
    wait_until(
        lambda: a.nodes() == [b.name] and b.nodes() == [a.name],
        JOIN_WITHIN + 8,
        interval=0.02,
        message="A and B connected",
    )
    joined_after = time.monotonic() - ready_at
    print(f"B joined {joined_after:.3f} s after it was ready; flood opened {opened()} connections")
    assert flood.alive(), "the flood lasted the whole join"
    assert joined_after <= JOIN_WITHIN, f"B joined {joined_after:.2f} s after it was ready"

    # Rate-limited: at most a few warning lines per second of flood, not one per drop.
    seconds = time.monotonic() - flood_started + 2
    warnings = [line for line in a.proc.output().splitlines() if "WARNING" in line]
    assert len(warnings) <= 4 * seconds + 10, f"{len(warnings)} warnings in {seconds:.0f} s"
