"""shoal's core benchmark: two nodes on loopback, each in its own process.

    .venv/bin/python bench/core.py                  # full run (about a minute)
    .venv/bin/python bench/core.py --quick          # smaller counts, for a smoke test

For 64-byte payloads it measures, in one run, side by side:

* one-way messages/s: `await node.send(peer, "sink", payload)` in a loop,
  counted by a sync handler on the other node, timed until the receiver has
  all of them; baseline: pyzmq PUSH/PULL over TCP carrying the same
  msgpack-encoded messages (decoded and counted by the receiver);
* the Python floor of one-way: a minimal `async def send` in plain Python (msgpack
  and a 64 KiB buffer on a raw transport, no shoal, no checks, no encryption), the
  least any Python sender costs; printed as a ratio to BEAM;
* call round trip p50/p99: sequential `await node.call(peer, "echo", payload)`;
  baseline: a raw asyncio TCP echo of the same payload behind a 4-byte length;
* the `hi` app's start-to-ready time and idle RSS (`.venv/bin/hi`, polled on
  `/ready`, RSS from /proc after ~2 s idle), and the same for a bare node
  (`bench/scale_node.py`, no web app), both started with shoal's and hi's
  bytecode compiled, as a wheel install (the Docker image) has it; hi is also
  started from source, as the editable development venv does it (with
  PYTHONDONTWRITEBYTECODE=1 nothing is cached between starts);
* when `erl` is installed: the BEAM anchor (Erlang/OTP distribution,
  `../shared/anchors/beam`, run from a copy in a temporary folder), once per
  round between shoal's runs: one sender's `{sink, B} ! Msg` messages/s and
  `gen_server:call` round trips, with the same counts and 64-byte payloads;
  shoal's ratios to it are printed (`--beam off` skips it).

Targets: one-way >= 1.0x pyzmq and >= 2.0x BEAM; call p50 <= 1.5x raw echo and
<= 1.0x BEAM's gen_server:call; hi RSS <= 45 MB; bare node RSS <= 34 MB; hi
start-to-ready <= 0.5 s.
Loopback addresses 127.0.30.x (BEAM: 127.0.0.1, epmd on port 4399).

shoal runs with its default AES-GCM mesh encryption; each round also runs it
with encryption off (`mesh_encryption=False`), and the cost of encryption is
reported as ratios (issue 11 target: one-way throughput >= 0.85x, i.e. at
most 15 % less with encryption), of wall-clock throughput and of messages per
CPU-second of both processes (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack

from shoal import loop as shoal_loop

PAYLOAD = b"\xa5" * 64
SERVER_HOST = "127.0.30.10"
CLIENT_HOST = "127.0.30.11"
HI_HOST = "127.0.30.2"
COOKIE = "bench-cookie-0f1e2d3c4b5a69788796"
ROOT = Path(__file__).resolve().parents[1]
BEAM_ANCHOR = ROOT.parent / "shared" / "anchors" / "beam"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# --- shoal --------------------------------------------------------------------


def shoal_settings(host: str, port: int, encrypt: int = 1) -> Any:
    from shoal.config import Settings

    return Settings(
        cookie=COOKIE,
        basename="bench",
        name_query="bench",
        host=host,
        port=port,
        topology="static",
        mesh_encryption=bool(encrypt),
    )


class Once:
    def __init__(self, peers: list[Any]) -> None:
        self.peers = peers

    async def run(self, propose: Any) -> None:
        propose(self.peers)
        await asyncio.Event().wait()


async def shoal_server(port: int, encrypt: int = 1) -> None:
    from shoal.node import Node

    node = Node(shoal_settings(SERVER_HOST, port, encrypt), Once([]))
    count = 0

    def sink(_payload: Any, _sender: str) -> None:
        nonlocal count
        count += 1

    # They return at once, so they run on the event loop, not in worker threads.
    node.register("sink", sink, sync_to_thread=False)
    node.register("count", lambda _payload, _sender: count, sync_to_thread=False)
    node.register("echo", lambda payload, _sender: payload, sync_to_thread=False)
    node.register("cpu", lambda _payload, _sender: time.process_time(), sync_to_thread=False)
    await node.start()
    report({"ready": True})
    await until_terminated()
    await node.stop()


async def until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def shoal_client(server_port: int, messages: int, calls: int, encrypt: int = 1) -> None:
    from shoal.config import Peer
    from shoal.node import Node

    server = Peer("bench", SERVER_HOST, server_port)
    node = Node(shoal_settings(CLIENT_HOST, server_port, encrypt), Once([server]))
    await node.start()
    deadline = time.monotonic() + 10
    while server.name not in node.nodes():
        if time.monotonic() > deadline:
            raise SystemExit("shoal client: could not connect")
        await asyncio.sleep(0.01)
    send, call, peer = node.send, node.call, server.name
    # Warm up, then one-way: the final call is ordered behind every send.
    for _ in range(min(messages, 20_000)):
        await send(peer, "sink", PAYLOAD)
    base = await call(peer, "count", None, timeout=60)
    server_cpu = await call(peer, "cpu", None)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(messages):
        await send(peer, "sink", PAYLOAD)
    received = await call(peer, "count", None, timeout=120)
    elapsed = time.perf_counter() - started
    # CPU time of both processes: on a busy machine, wall-clock throughput also
    # measures the neighbours; CPU per message measures only us.
    cpu_oneway = time.process_time() - cpu + await call(peer, "cpu", None) - server_cpu
    assert received - base == messages, (received, base, messages)
    # Round trips.
    for _ in range(min(calls, 1000)):
        await call(peer, "echo", PAYLOAD)
    latencies = []
    server_cpu = await call(peer, "cpu", None)
    cpu = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        await call(peer, "echo", PAYLOAD)
        latencies.append(time.perf_counter() - t0)
    client_cpu = time.process_time() - cpu
    server_cpu = await call(peer, "cpu", None) - server_cpu
    report(
        {
            "oneway_per_s": messages / elapsed,
            "oneway_per_cpu_s": messages / cpu_oneway,
            **percentiles(latencies),
            # CPU per round trip, each side (steadier than wall time on a shared machine).
            "call_cpu_client_us": client_cpu / calls * 1e6,
            "call_cpu_server_us": server_cpu / calls * 1e6,
        }
    )
    await node.stop()


def percentiles(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_us": cuts[49] * 1e6, "p99_us": cuts[98] * 1e6}


# --- pyzmq baseline -------------------------------------------------------------


def zmq_server(port: int, back_port: int, messages: int) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://{SERVER_HOST}:{port}")
    back = ctx.socket(zmq.PUSH)
    back.bind(f"tcp://{SERVER_HOST}:{back_port}")
    report({"ready": True})
    unpackb = msgpack.unpackb
    for batch in (min(messages, 20_000), messages):
        count = 0
        while count < batch:
            frame = unpackb(pull.recv())
            if frame[0] == 2:
                count += 1
        back.send(b"done")
    pull.close(linger=0)
    back.close(linger=0)
    ctx.term()


def zmq_client(port: int, back_port: int, messages: int) -> None:
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://{SERVER_HOST}:{port}")
    back = ctx.socket(zmq.PULL)
    back.connect(f"tcp://{SERVER_HOST}:{back_port}")
    packb = msgpack.packb
    results = []
    for batch in (min(messages, 20_000), messages):
        started = time.perf_counter()
        for _ in range(batch):
            # The same message shoal sends: [SEND, handler, payload], msgpack-encoded.
            push.send(packb([2, "sink", PAYLOAD], use_bin_type=True))
        back.recv()
        results.append(batch / (time.perf_counter() - started))
    report({"oneway_per_s": results[-1]})
    push.close(linger=0)
    back.close(linger=0)
    ctx.term()


# --- raw asyncio echo baseline ----------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a stream transport (uvloop's is no asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_server(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, SERVER_HOST, port)
    report({"ready": True})
    await asyncio.Event().wait()


async def echo_client(port: int, calls: int) -> None:
    reader, writer = await asyncio.open_connection(SERVER_HOST, port)
    frame = len(PAYLOAD).to_bytes(4, "big") + PAYLOAD
    latencies = []
    for i in range(calls + min(calls, 1000)):
        t0 = time.perf_counter()
        writer.write(frame)
        header = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(header, "big"))
        assert body == PAYLOAD
        if i >= min(calls, 1000):
            latencies.append(time.perf_counter() - t0)
    report(percentiles(latencies))
    writer.close()


# --- the floor of a Python sender -----------------------------------------------
# What any `await send()` written in Python costs at least, with no shoal in it: a
# coroutine per message that msgpack-encodes [SEND, handler, payload] and buffers it,
# written 64 KiB at a time on a raw transport; no length prefix, no checks, no
# encryption. The receiver decodes the stream with one msgpack.Unpacker and counts.
# shoal's one-way figure cannot exceed it without taking that path out of Python.


class FloorSink(asyncio.Protocol):
    def __init__(self, messages: int, done: asyncio.Future[None]) -> None:
        self.unpacker = msgpack.Unpacker()
        self.count, self.expected, self.done = 0, messages, done

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for frame in self.unpacker:
            if frame[0] == 2 and type(frame[1]) is str:
                self.count += 1
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)


async def floor_server(port: int, messages: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    server = await loop.create_server(lambda: FloorSink(messages, done), SERVER_HOST, port)
    report({"ready": True})
    await done
    report({"finished": time.perf_counter()})  # CLOCK_MONOTONIC: one clock for all processes
    server.close()


async def floor_client(port: int, messages: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, SERVER_HOST, port)
    out: list[bytes] = []
    size = 0
    packb = msgpack.packb

    async def send(node: str, handler: str, payload: Any) -> None:
        nonlocal size
        data = packb([2, handler, payload])
        out.append(data)
        size += len(data)
        if size >= 65536:
            transport.write(b"".join(out))
            out.clear()
            size = 0
            await asyncio.sleep(0)  # lets the transport write and the peer keep up

    report({"started": time.perf_counter()})
    for _ in range(messages):
        await send("bench", "sink", PAYLOAD)
    transport.write(b"".join(out))
    await asyncio.sleep(3600)  # ended by the orchestrator once the server has all


def measure_floor(messages: int) -> dict[str, Any]:
    port = free_port(SERVER_HOST)
    server = Child("floor-server", port, messages)
    client: Child | None = None
    try:
        server.result(30)
        client = Child("floor-client", port, messages)
        started = client.result()["started"]
        return {"oneway_per_s": messages / (server.result()["finished"] - started)}
    finally:
        if client is not None:
            client.stop()
        server.stop()


# --- orchestration -----------------------------------------------------------------


class Child:
    """A role of this script in its own process; its stdout carries JSON lines."""

    def __init__(self, *args: object) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, __file__, "--role", *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def result(self, timeout: float = 300) -> dict[str, Any]:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.popen.args[3]} exited ({self.popen.wait()})")
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
        raise TimeoutError(self.popen.args)

    def stop(self, grace: float = 0.0) -> None:
        try:
            self.popen.wait(grace)  # a client exits by itself once it has reported
        except subprocess.TimeoutExpired:
            pass
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def run_pair(server_args: list[object], client_args: list[object]) -> dict[str, Any]:
    server = Child(*server_args)
    client: Child | None = None
    try:
        server.result(30)
        client = Child(*client_args)
        return client.result()
    finally:
        if client is not None:
            client.stop(grace=10)
        server.stop()


def measure_beam(anchor: Path, messages: int, calls: int) -> dict[str, Any]:
    """One run of the BEAM anchor's `throughput` experiment, from a copy of the harness.

    The harness writes next to itself (ebin/, results/), so it runs from a
    temporary copy; its event logs (/tmp/anchor-beam/<run>) are removed after.
    """
    if not (anchor / "run.sh").exists():
        return {"error": f"no BEAM harness at {anchor}"}
    env = {**os.environ, "TP_N": str(messages), "TP_REPS": "1", "TP_LAT_N": str(calls)}
    with tempfile.TemporaryDirectory(prefix="shoal-beam-") as tmp:
        copy = Path(tmp) / "beam"
        shutil.copytree(anchor, copy, ignore=shutil.ignore_patterns("results*", "ebin"))
        try:
            run = subprocess.run(
                ["bash", str(copy / "run.sh"), "throughput"],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            return {"error": "the BEAM harness did not finish within 600 s"}
    for line in run.stdout.splitlines():
        if line.startswith("{") and '"experiment":"throughput"' in line:
            result = json.loads(line)
            break
    else:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the BEAM harness failed ({run.returncode}): {tail}"}
    log_dir = Path(result.get("log_dir", ""))
    if log_dir.parent.name and log_dir.parent.parent == Path("/tmp/anchor-beam"):
        shutil.rmtree(log_dir.parent, ignore_errors=True)
    call, raw = result["rtt_gen_server_call_us"], result["rtt_send_receive_us"]
    return {
        "oneway_per_s": result["msgs_per_s_1_sender"],
        "p50_us": call["p50"],
        "p99_us": call["p99"],
        "raw_p50_us": raw["p50"],
        "raw_p99_us": raw["p99"],
    }


def compiled_sources(tmp: Path) -> dict[str, str]:
    """shoal's and hi's modules with their bytecode, as a wheel install (the image) has them.

    The development venv installs both in editable mode, and with
    PYTHONDONTWRITEBYTECODE=1 (set on the benchmark machine and in the image)
    their sources are compiled again at every start; pip compiles the bytecode
    of what it installs from wheels, as the image's build does. A copy with
    bytecode, first on PYTHONPATH, gives the deployed start.
    """
    for source in (ROOT / "src" / "shoal", ROOT / "examples" / "hi" / "src" / "hi"):
        shutil.copytree(source, tmp / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tmp)], check=True)
    return {"PYTHONPATH": str(tmp)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop_process(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def node_env(port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "NODE_HOST": HI_HOST,
        "TOPOLOGY_TYPE": "static",
        "RELEASE_COOKIE": COOKIE,
        "PORT": str(port),
        "SHOAL_PORT": str(free_port(HI_HOST)),
        **extra,
    }


def measure_hi(extra_env: dict[str, str]) -> dict[str, Any]:
    hi = ROOT / ".venv" / "bin" / "hi"
    if not hi.exists():
        return {"error": f"{hi} not found"}
    port = free_port(HI_HOST)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(hi)],
        env=node_env(port, extra_env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ready_after = None
        while time.perf_counter() - started < 20 and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{HI_HOST}:{port}/ready", timeout=1) as r:
                    if r.status == 200:
                        ready_after = time.perf_counter() - started
                        break
            except OSError:
                pass
            time.sleep(0.01)
        if ready_after is None:
            return {"error": f"not ready within 20 s (exit code {proc.poll()})"}
        time.sleep(2.0)
        return {"ready_s": ready_after, "rss_mb": rss_mb(proc.pid)}
    finally:
        stop_process(proc)


def measure_bare_node(extra_env: dict[str, str]) -> dict[str, Any]:
    """A node without a web app (`bench/scale_node.py`): start to ready, RSS after ~2 s idle."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "scale_node.py")],
        env=node_env(free_port(HI_HOST), {"NODE_NAME": "bench", **extra_env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready_after = None
        for _ in range(100):  # a few event lines come before `ready`
            line = proc.stdout.readline()
            if not line:
                break
            if line.split()[1:2] == ["ready"]:
                ready_after = time.perf_counter() - started
                break
        if ready_after is None:
            return {"error": f"not ready (exit code {proc.poll()})"}
        time.sleep(2.0)
        return {"ready_s": ready_after, "rss_mb": rss_mb(proc.pid)}
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300_000, help="one-way messages")
    parser.add_argument("--calls", type=int, default=10_000, help="sequential calls")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians are shown)")
    parser.add_argument("--quick", action="store_true", help="30k messages, 2k calls, 1 round")
    parser.add_argument(
        "--beam",
        choices=("auto", "off"),
        default="auto",
        help="run the BEAM anchor each round when `erl` is installed (auto) or never",
    )
    parser.add_argument(
        "--beam-anchor", type=Path, default=BEAM_ANCHOR, help="the BEAM harness folder"
    )
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, *params = args.role
        values = [int(p) for p in params]
        roles: dict[str, Any] = {
            "shoal-server": lambda: shoal_loop.run(shoal_server(*values)),
            "shoal-client": lambda: shoal_loop.run(shoal_client(*values)),
            "zmq-server": lambda: zmq_server(*values),
            "zmq-client": lambda: zmq_client(*values),
            "echo-server": lambda: shoal_loop.run(echo_server(*values)),
            "echo-client": lambda: shoal_loop.run(echo_client(*values)),
            "floor-server": lambda: shoal_loop.run(floor_server(*values)),
            "floor-client": lambda: shoal_loop.run(floor_client(*values)),
        }
        profile = os.environ.get("SHOAL_BENCH_PROFILE")  # a directory: cProfile each role
        if profile:
            import cProfile

            cProfile.runctx("roles[role]()", globals(), locals(), f"{profile}/{role}.prof")
        else:
            roles[role]()
        return
    if args.quick:
        args.messages, args.calls, args.rounds = 30_000, 2_000, 1
    n, calls = args.messages, args.calls
    with_beam = args.beam == "auto" and shutil.which("erl") is not None
    print(
        f"shoal core benchmark: 64-byte payloads, {n} one-way messages, {calls} calls, "
        f"each node in its own process on loopback ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, {shoal_loop.selected()} loop)",
        flush=True,
    )

    # Rounds interleave shoal and the baselines, so that both see the same
    # machine (other work on it shows up as noise); medians are reported.
    rounds: list[tuple[dict[str, Any], ...]] = []
    beam_error = None if with_beam else "erl is not installed" if args.beam == "auto" else "off"
    for r in range(args.rounds):
        port = free_port(SERVER_HOST)
        shoal = run_pair(["shoal-server", port, 1], ["shoal-client", port, n, calls, 1])
        port = free_port(SERVER_HOST)
        plain = run_pair(["shoal-server", port, 0], ["shoal-client", port, n, calls, 0])
        port, back = free_port(SERVER_HOST), free_port(SERVER_HOST)
        zmq = run_pair(["zmq-server", port, back, n], ["zmq-client", port, back, n])
        port = free_port(SERVER_HOST)
        echo = run_pair(["echo-server", port], ["echo-client", port, calls])
        echo.update(floor_oneway_per_s=measure_floor(n)["oneway_per_s"])
        line = (
            f"  round {r + 1}: shoal {shoal['oneway_per_s']:,.0f}/s, p50 {shoal['p50_us']:.0f} us"
            f", p99 {shoal['p99_us']:.0f} us | unencrypted {plain['oneway_per_s']:,.0f}/s, "
            f"p50 {plain['p50_us']:.0f} us | pyzmq {zmq['oneway_per_s']:,.0f}/s | echo p50 "
            f"{echo['p50_us']:.0f} us, p99 {echo['p99_us']:.0f} us | Python floor "
            f"{echo['floor_oneway_per_s']:,.0f}/s"
        )
        if beam_error is None:
            beam = measure_beam(args.beam_anchor, n, calls)
            beam_error = beam.get("error")
        if beam_error is None:
            rounds.append((shoal, zmq, echo, plain, beam))
            line += (
                f" | BEAM {beam['oneway_per_s']:,.0f}/s, call p50 {beam['p50_us']:.0f} us, "
                f"p99 {beam['p99_us']:.0f} us"
            )
        else:
            rounds.append((shoal, zmq, echo, plain))
        print(line, flush=True)
    # A BEAM run that failed in a later round leaves rounds of unequal length.
    width = min(len(r) for r in rounds)
    shoal, zmq, echo, plain, *beams = (
        {key: statistics.median(r[i][key] for r in rounds) for key in rounds[0][i]}
        for i in range(width)
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bytecode-") as tmp:
        compiled = compiled_sources(Path(tmp))
        hi = measure_hi(compiled)
        hi_source = measure_hi({})
        bare = measure_bare_node(compiled)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"medians of {args.rounds} rounds (load average now {load}):")

    oneway_ratio = shoal["oneway_per_s"] / zmq["oneway_per_s"]
    p50_ratio = shoal["p50_us"] / echo["p50_us"]
    rows = [
        (
            "one-way messages/s",
            f"{shoal['oneway_per_s']:,.0f}",
            f"{zmq['oneway_per_s']:,.0f} (pyzmq PUSH/PULL)",
            f"{oneway_ratio:.2f}x",
            ">= 1.0x",
            oneway_ratio >= 1.0,
        ),
        (
            "call round trip p50",
            f"{shoal['p50_us']:.0f} us",
            f"{echo['p50_us']:.0f} us (raw echo)",
            f"{p50_ratio:.2f}x",
            "<= 1.5x",
            p50_ratio <= 1.5,
        ),
        (
            "call CPU per round trip (client + server)",
            f"{shoal['call_cpu_client_us']:.0f} + {shoal['call_cpu_server_us']:.0f} us",
            f"{plain['call_cpu_client_us']:.0f} + {plain['call_cpu_server_us']:.0f} us "
            "(encryption off)",
            "",
            "-",
            None,
        ),
        (
            "call round trip p99",
            f"{shoal['p99_us']:.0f} us",
            f"{echo['p99_us']:.0f} us (raw echo)",
            f"{shoal['p99_us'] / echo['p99_us']:.2f}x",
            "-",
            None,
        ),
    ]
    encrypted_ratio = shoal["oneway_per_s"] / plain["oneway_per_s"]
    cpu_ratio = shoal["oneway_per_cpu_s"] / plain["oneway_per_cpu_s"]
    rows += [
        (
            "one-way msgs per CPU-s, enc. vs not",
            f"{shoal['oneway_per_cpu_s']:,.0f}",
            f"{plain['oneway_per_cpu_s']:,.0f} (encryption off)",
            f"{cpu_ratio:.2f}x",
            ">= 0.85x",
            cpu_ratio >= 0.85,
        ),
        (
            "one-way, encrypted vs not",
            f"{shoal['oneway_per_s']:,.0f}",
            f"{plain['oneway_per_s']:,.0f} (encryption off)",
            f"{encrypted_ratio:.2f}x",
            ">= 0.85x",
            encrypted_ratio >= 0.85,
        ),
        (
            "call p50, encrypted vs not",
            f"{shoal['p50_us']:.0f} us",
            f"{plain['p50_us']:.0f} us (encryption off)",
            f"{shoal['p50_us'] / plain['p50_us']:.2f}x",
            "-",
            None,
        ),
    ]
    if beams:
        beam = beams[0]
        beam_oneway = shoal["oneway_per_s"] / beam["oneway_per_s"]
        beam_p50 = shoal["p50_us"] / beam["p50_us"]
        rows += [
            (
                "one-way vs BEAM, 1 sender",
                f"{shoal['oneway_per_s']:,.0f}",
                f"{beam['oneway_per_s']:,.0f} (BEAM {{sink, B}} ! Msg)",
                f"{beam_oneway:.2f}x",
                ">= 2.0x",
                beam_oneway >= 2.0,
            ),
            (
                "one-way, Python floor vs BEAM",
                f"{echo['floor_oneway_per_s']:,.0f}",
                f"{beam['oneway_per_s']:,.0f} (BEAM)",
                f"{echo['floor_oneway_per_s'] / beam['oneway_per_s']:.2f}x",
                "-",
                None,
            ),
            (
                "call p50 vs BEAM",
                f"{shoal['p50_us']:.0f} us",
                f"{beam['p50_us']:.0f} us (BEAM gen_server:call)",
                f"{beam_p50:.2f}x",
                "<= 1.0x",
                beam_p50 <= 1.0,
            ),
            (
                "call p99 vs BEAM",
                f"{shoal['p99_us']:.0f} us",
                f"{beam['p99_us']:.0f} us (BEAM gen_server:call)",
                f"{shoal['p99_us'] / beam['p99_us']:.2f}x",
                "-",
                None,
            ),
            (
                "BEAM raw send/receive RTT",
                "",
                f"p50 {beam['raw_p50_us']:.0f} us, p99 {beam['raw_p99_us']:.0f} us",
                "",
                "-",
                None,
            ),
        ]
    else:
        rows.append(("BEAM anchor", "not run", str(beam_error), "", "", None))
    for label, result, rss_target in (("hi", hi, 45), ("bare node", bare, 34)):
        if "error" in result:
            rows += [
                (f"{label} start-to-ready", "not available", result["error"], "", "<= 0.5 s", None),
                (f"{label} idle RSS", "not available", "", "", f"<= {rss_target} MB", None),
            ]
            continue
        rows += [
            (
                f"{label} start-to-ready",
                f"{result['ready_s']:.2f} s",
                "bytecode compiled (as installed from wheels)",
                "",
                "<= 0.5 s",
                result["ready_s"] <= 0.5,
            ),
            (
                f"{label} idle RSS",
                f"{result['rss_mb']:.1f} MB",
                "",
                "",
                f"<= {rss_target} MB",
                result["rss_mb"] <= rss_target,
            ),
        ]
        if label == "hi" and "error" not in hi_source:
            rows.append(
                (
                    "hi start-to-ready, from source",
                    f"{hi_source['ready_s']:.2f} s",
                    "editable install, no bytecode (development venv)",
                    "",
                    "-",
                    None,
                )
            )
    headers = ("measure", "shoal", "baseline", "ratio", "target", "met")
    table = [headers, *[(*r[:5], {True: "yes", False: "NO", None: "-"}[r[5]]) for r in rows]]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    for i, row in enumerate(table):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
