"""Bad peers are dropped and logged; good peers do not notice.

Two good nodes exchange calls the whole time (`Traffic`) while raw TCP clients
and a wrong-cookie node attack one of them. After each attack the attacked
node still serves: calls keep succeeding with low latency, nobody goes down,
and the node's pending-handshake slots are all free again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal import wire
from shoal.mesh import MAX_PENDING_HANDSHAKES_PER_HOST, MembershipEvent
from shoal.node import Node
from tests.mesh.conftest import NodeFactory, peer_of
from tests.support.procs import async_wait_until

HANDSHAKE_TIMEOUT = 1.0
ATTACKER = "127.0.20.250"  # source address of the raw bad clients
PAYLOAD = b"x" * 64


class Traffic:
    """Sequential calls between two good nodes, both ways, with their latencies."""

    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b
        self.latencies: list[float] = []
        self.failures: list[BaseException] = []
        self.downs: list[MembershipEvent] = []
        for node in (a, b):
            node.add_listener(lambda e: self.downs.append(e) if e.kind == "down" else None)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        pairs = [(self.a, self.b), (self.b, self.a)]
        i = 0
        while True:
            src, dst = pairs[i % 2]
            i += 1
            started = time.perf_counter()
            try:
                assert await src.call(dst.name, "echo", PAYLOAD, timeout=2.0) == PAYLOAD
            except Exception as exc:
                self.failures.append(exc)
            self.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98]

    async def check(self, since: int = 0, p99_bound: float = 0.25) -> None:
        """Calls made after `since` succeeded, quickly, and the pair stayed connected."""
        count = len(self.latencies)
        await async_wait_until(
            lambda: len(self.latencies) >= count + 20, timeout=5, message="20 more calls"
        )
        assert not self.failures, self.failures[:3]
        assert not self.downs, self.downs
        assert self.b.name in self.a.nodes() and self.a.name in self.b.nodes()
        recent = self.latencies[since:]
        assert len(recent) >= 20
        p99 = statistics.quantiles(recent, n=100)[98]
        # On a machine busy with other work, calm calls are slower too: the bound is then a
        # multiple of the calm p99 measured before the attack, on the same machine.
        calm = self.latencies[:since]
        if len(calm) >= 20:
            p99_bound = max(p99_bound, 3 * statistics.quantiles(calm, n=100)[98])
        assert p99 < p99_bound, f"p99 {p99 * 1000:.1f} ms during the attack (bound {p99_bound})"


@pytest.fixture
async def pair(make_node: NodeFactory) -> AsyncIterator[Traffic]:
    b = await make_node(handshake_timeout=HANDSHAKE_TIMEOUT)
    a = await make_node([peer_of(b)], handshake_timeout=HANDSHAKE_TIMEOUT)
    for node in (a, b):
        node.register("echo", lambda payload, _sender: payload)
    await async_wait_until(lambda: b.name in a.nodes() and a.name in b.nodes(), timeout=5)
    traffic = Traffic(a, b)
    traffic.start()
    # A calm baseline before any attack (see Traffic.check).
    await async_wait_until(lambda: len(traffic.latencies) >= 20, timeout=10, message="calm calls")
    yield traffic
    await traffic.stop()


@pytest.fixture(autouse=True)
def mesh_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="shoal")
    return caplog


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def connect(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        node.settings.host, node.settings.port, local_addr=(ATTACKER, 0)
    )


async def until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the node sent until it closed the connection (fails if it does not)."""
    received = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk


def handshakes_in_progress(node: Node) -> int:
    assert node.mesh is not None
    return node.mesh.admission.total


async def still_serving(traffic: Traffic, since: int) -> None:
    await traffic.check(since)
    await async_wait_until(
        lambda: handshakes_in_progress(traffic.b) == 0, timeout=5, message="handshakes done"
    )


def hello(version: int = wire.PROTOCOL_VERSION) -> bytes:
    msg = wire.Hello(version, "hi@127.0.20.250", 4370, os.urandom(8), os.urandom(32), None)
    return wire.encode_frame(msg.to_wire())


@pytest.mark.parametrize("seed", range(4))
async def test_random_garbage_is_dropped(pair: Traffic, seed: int) -> None:
    since = len(pair.latencies)
    garbage = random.Random(seed).randbytes(random.Random(seed).randint(1, 5000))
    reader, writer = await connect(pair.b)
    writer.write(garbage)
    assert await until_closed(reader, HANDSHAKE_TIMEOUT + 2) == b""
    writer.close()
    await still_serving(pair, since)


async def test_http_request_is_dropped_at_once(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    since = len(pair.latencies)
    reader, writer = await connect(pair.b)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " is a 1.2 GB length
    await until_closed(reader, HANDSHAKE_TIMEOUT / 2)
    writer.close()
    assert any("exceeds the limit" in w for w in warnings(mesh_logs))
    await still_serving(pair, since)


async def test_oversized_length_prefix_is_dropped_at_once(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    since = len(pair.latencies)
    reader, writer = await connect(pair.b)
    writer.write(b"\xff\xff\xff\xff")
    await until_closed(reader, HANDSHAKE_TIMEOUT / 2)  # not waiting for 4 GiB to arrive
    writer.close()
    assert any("exceeds the limit" in w and ATTACKER in w for w in warnings(mesh_logs)), warnings(
        mesh_logs
    )
    await still_serving(pair, since)


async def test_truncated_frame_then_close(pair: Traffic) -> None:
    since = len(pair.latencies)
    _, writer = await connect(pair.b)
    frame = hello()
    writer.write(frame[: len(frame) // 2])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await still_serving(pair, since)


async def test_wrong_version_gets_a_reject_naming_the_version(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    since = len(pair.latencies)
    reader, writer = await connect(pair.b)
    writer.write(hello(version=99))
    received = await until_closed(reader, HANDSHAKE_TIMEOUT / 2)
    writer.close()
    assert wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME).feed(received) == [
        {"t": "reject", "reason": "version"}
    ]
    assert any("version 99" in w and ATTACKER in w for w in warnings(mesh_logs))
    await still_serving(pair, since)


async def test_silent_connection_is_dropped_after_the_handshake_timeout(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    since = len(pair.latencies)
    started = time.monotonic()
    reader, writer = await connect(pair.b)
    await until_closed(reader, HANDSHAKE_TIMEOUT + 2)
    elapsed = time.monotonic() - started
    writer.close()
    assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed <= HANDSHAKE_TIMEOUT + 1.0
    assert any("did not finish in time" in w and ATTACKER in w for w in warnings(mesh_logs))
    await still_serving(pair, since)


async def test_hello_then_silence_is_dropped_after_the_handshake_timeout(pair: Traffic) -> None:
    since = len(pair.latencies)
    started = time.monotonic()
    reader, writer = await connect(pair.b)
    writer.write(hello())
    received = await until_closed(reader, HANDSHAKE_TIMEOUT + 2)
    writer.close()
    assert HANDSHAKE_TIMEOUT * 0.9 <= time.monotonic() - started <= HANDSHAKE_TIMEOUT + 1.0
    (challenge,) = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME).feed(received)
    assert challenge["t"] == "challenge"
    await still_serving(pair, since)


async def test_flood_of_frames_during_the_handshake_is_dropped(pair: Traffic) -> None:
    """Valid-looking frames by the megabyte before the handshake ends: bounded, dropped."""
    since = len(pair.latencies)
    reader, writer = await connect(pair.b)
    writer.write(hello() + wire.encode_frame(None) * 400_000)  # 2 MB of tiny frames
    await until_closed(reader, HANDSHAKE_TIMEOUT + 2)
    writer.close()
    await still_serving(pair, since)


async def test_many_silent_connections_do_not_keep_others_out(
    pair: Traffic, make_node: NodeFactory
) -> None:
    since = len(pair.latencies)
    count = 150

    async def silent() -> tuple[asyncio.StreamWriter, asyncio.Task[float]]:
        """Connect and say nothing; the task gives how long the node kept the connection."""
        reader, writer = await connect(pair.b)
        opened = time.monotonic()

        async def lifetime() -> float:
            await until_closed(reader, HANDSHAKE_TIMEOUT + 2)
            return time.monotonic() - opened

        return writer, asyncio.create_task(lifetime())

    conns = await asyncio.gather(*(silent() for _ in range(count)))
    # While they hold every handshake slot their address may have, a new node joins.
    c = await make_node([peer_of(pair.b)], handshake_timeout=HANDSHAKE_TIMEOUT)
    await async_wait_until(lambda: pair.b.name in c.nodes(), timeout=HANDSHAKE_TIMEOUT / 2)
    still_held = sum(not task.done() for _, task in conns)
    assert still_held >= MAX_PENDING_HANDSHAKES_PER_HOST, "the slots were free again already"
    times = await asyncio.gather(*(task for _, task in conns))
    for writer, _ in conns:
        writer.close()
    # Each connection's own lifetime, from its connect, so slow setup cannot skew it.
    # Beyond the per-address cap, connections are refused at once; the rest time out.
    refused_at_once = sum(t < HANDSHAKE_TIMEOUT / 2 for t in times)
    assert refused_at_once >= count - MAX_PENDING_HANDSHAKES_PER_HOST
    assert max(times) <= HANDSHAKE_TIMEOUT + 1.5
    await still_serving(pair, since)


async def test_wrong_cookie_node_never_joins_and_is_logged(
    pair: Traffic, make_node: NodeFactory, mesh_logs: pytest.LogCaptureFixture
) -> None:
    wrong_cookie = "another-cookie-a1b2c3d4e5f60718293a"
    # The intruder shares this process: its start stretches its cookie (scrypt, ~50 ms of
    # CPU and 16 MiB, cached per process), which is no attack on the good nodes. Done here,
    # outside the window the traffic check measures (a 498.6 ms call failed it under load).
    wire.cookie_key(wrong_cookie)
    since = len(pair.latencies)
    good = pair.b
    intruder = await make_node([peer_of(good)], cookie=wrong_cookie)
    assert good.mesh is not None
    good.mesh.propose([peer_of(intruder)])  # and the good node dials the intruder too

    def logged() -> bool:
        found = warnings(mesh_logs)
        # The good node, dialed: "dropping unauthenticated peer (claiming to be hi@..)".
        inbound = any(
            f"claiming to be {intruder.name}" in w and "RELEASE_COOKIE" in w for w in found
        )
        # The good node, dialing: names the intruder's address.
        outbound = any(
            f"{intruder.settings.host}:{intruder.settings.port}" in w and "cookie proof" in w
            for w in found
        )
        return inbound and outbound

    await async_wait_until(logged, timeout=5, message="both handshakes logged")
    assert intruder.name not in good.nodes() and good.name not in intruder.nodes()
    assert intruder.name not in pair.a.nodes()
    await still_serving(pair, since)


async def test_everything_at_once_while_calls_stay_fast(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    """All the attacks above, concurrently, against both good nodes."""
    await async_wait_until(lambda: len(pair.latencies) >= 50, timeout=5)
    calm_p99 = pair.p99()
    since = len(pair.latencies)
    rng = random.Random(7)

    async def attack(target: Node, payload: bytes, close: bool) -> None:
        reader, writer = await connect(target)
        writer.write(payload)
        if close:
            writer.close()
            return
        await until_closed(reader, HANDSHAKE_TIMEOUT + 2)
        writer.close()

    attacks = []
    for target in (pair.a, pair.b):
        attacks += [attack(target, rng.randbytes(rng.randint(1, 3000)), False) for _ in range(10)]
        attacks += [attack(target, b"\xff\xff\xff\xff", False) for _ in range(5)]
        attacks += [attack(target, hello()[:10], True) for _ in range(5)]
        attacks += [attack(target, hello(version=2), False) for _ in range(5)]
        attacks += [attack(target, b"", False) for _ in range(20)]
    await asyncio.gather(*attacks)
    await still_serving(pair, since)
    during = pair.latencies[since:]
    p99 = statistics.quantiles(during, n=100)[98]
    logging.getLogger(__name__).info(
        "calls during the attacks: %d, p99 %.2f ms (calm p99 %.2f ms)",
        len(during),
        p99 * 1000,
        calm_p99 * 1000,
    )
    assert p99 < max(0.1, 20 * calm_p99)


async def test_a_forged_proof_is_dropped_and_never_welcomed(
    pair: Traffic, mesh_logs: pytest.LogCaptureFixture
) -> None:
    """A raw client goes through the whole handshake as a dialer but proves with another
    cookie: the acceptor's own check must drop it (a wrong-cookie node would stop earlier, at
    its check of the acceptor's proof, so only a hand-made client reaches this one)."""
    # scrypt costs ~50 ms of CPU on this loop: outside the window the traffic check measures.
    wrong_key = wire.cookie_key("not-the-cookie")
    since = len(pair.latencies)
    reader, writer = await connect(pair.b)
    forged = wire.Hello(
        wire.PROTOCOL_VERSION, "hi@127.0.20.250", 4370, os.urandom(8), os.urandom(32), None
    )
    writer.write(wire.encode_frame(forged.to_wire()))
    decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
    frames: list[Any] = []
    async with asyncio.timeout(5):
        while not frames:
            chunk = await reader.read(65536)
            assert chunk, "closed before the CHALLENGE"
            frames += decoder.feed(chunk)
    challenge = wire.parse_challenge(frames.pop(0))
    writer.write(wire.encode_frame(wire.make_proof(wrong_key, forged, challenge)))
    rest = decoder.feed(await until_closed(reader, HANDSHAKE_TIMEOUT + 2))
    writer.close()
    assert not any(isinstance(f, dict) and f.get("t") == "welcome" for f in frames + rest), rest
    assert forged.name not in pair.b.nodes()
    assert any("dialer's cookie proof is wrong" in w for w in warnings(mesh_logs))
    await still_serving(pair, since)
