"""Worst-case frames for the decoder: ``.venv/bin/python -m tests.wire.bench_decode [BYTES]``.

Decoding runs on the event loop, so the slowest frame within the limit is
how long one peer can stall a node. Its cost is the number of objects in the
frame: these frames pack as many objects as a frame of BYTES bytes (default
`SHOAL_MAX_FRAME_BYTES`'s default) can hold, of every cheap kind. The script
prints, per frame, the CPU time of decoding it and of freeing the result (the
loop pays for both), the best of a few runs (CPU time, so that other
processes on a loaded machine do not count), and the wall time of the worst run.
The worst of each frame's costs is also shown as a ratio to `reference_cost`,
Python's own cost of one object per byte, measured in the same run: the
absolute figures swing by a third between runs on the project's VM (page
faults and cache misses of ~50 MB of small objects), the ratio less.
"""

from __future__ import annotations

import gc
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from shoal import wire
from shoal.config import Settings

DEFAULT_LIMIT = Settings(cookie="x", allow_weak_cookie=True).max_frame_size


def _array(item: bytes, size: int) -> bytes:
    """A msgpack array32 of copies of `item`, as long as fits in `size` bytes."""
    count = (size - 5) // len(item)
    return b"\xdd" + struct.pack(">I", count) + item * count


def _map(pair: Callable[[int], bytes], pair_size: int, size: int) -> bytes:
    count = (size - 5) // pair_size
    return b"\xdf" + struct.pack(">I", count) + b"".join(pair(i) for i in range(count))


def _str_key(i: int) -> bytes:
    return b"\xa5" + f"{i:05x}".encode() + b"\xc0"


def _colliding_float_key(i: int) -> bytes:
    return b"\xcb" + struct.pack(">d", 2.0 ** (61 * (i % 32 - 16)) * (i // 32 + 1)) + b"\xc0"


def worst_frames(size: int) -> Iterator[tuple[str, bytes]]:
    """(name, frame body) pairs: the costliest frames of `size` bytes we could construct."""
    yield "empty arrays", _array(b"\x90", size)
    yield "empty maps", _array(b"\x80", size)
    yield "[0] arrays", _array(b"\x91\x00", size)
    yield "{0: 0} maps", _array(b"\x81\x00\x00", size)
    yield "arrays of 15 empty arrays", _array(b"\x9f" + b"\x90" * 15, size)
    yield "1000-deep nested arrays", _array(b"\x91" * 999 + b"\x90", size)
    yield "nils", _array(b"\xc0", size)
    yield "uint16 ints", _array(b"\xcd\x01\x00", size)
    yield "2-byte strs", _array(b"\xa2ab", size)
    yield "2-byte bins", _array(b"\xc4\x02ab", size)
    yield "floats", _array(b"\xcb\x3f\xf0" + bytes(6), size)
    # Distinct str keys (each interned), and float keys whose hashes collide
    # (x and x * 2**61 hash alike: 32 to a hash here).
    yield "map of distinct str keys", _map(_str_key, 7, size)
    yield "map of colliding float keys", _map(_colliding_float_key, 10, size)
    # Refused outright: extension types and timestamps, and nesting past msgpack's stack.
    yield "empty ext types (refused)", _array(b"\xc7\x00\x01", size)
    yield "timestamps (refused)", _array(b"\xd6\xff\x00\x00\x00\x01", size)
    yield "nesting 2000 deep (refused)", _array(b"\x91" * 1999 + b"\x90", size)
    # In a message's payload, what a sender's msgpack.ExtType, Timestamp or dict keyed by
    # tuples packs to makes the message unreadable, not the frame: its payload is skipped
    # (`wire._salvage`); a tuple key comes after as many objects as fit.
    send = b"\x93\x02\xa1h"  # [SEND, "h", payload]
    yield "payload of empty ext types", send + _array(b"\xc7\x00\x01", size - len(send))
    yield "payload of fixext1s", send + _array(b"\xd4\x01\x00", size - len(send))
    tuple_key = b"\x81\x91\x00\xc0"  # {[0]: None}
    items = _array(b"\x80", size - len(send) - len(tuple_key))
    count = struct.unpack(">I", items[1:5])[0] + 1
    keyed = send + b"\xdd" + struct.pack(">I", count) + items[5:] + tuple_key
    yield "payload of empty maps, then an array key", keyed


def decode(body: bytes) -> list[Any]:
    """The frames `body` decodes to ([] if it is refused); the caller pauses the GC."""
    try:
        return wire.FrameDecoder(len(body)).feed(wire.HEADER.pack(len(body)) + body)
    except wire.FrameError:
        return []


def object_count(value: Any) -> int:
    """How many objects `value` is made of, itself included (without recursion)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return count


def decode_cost(body: bytes) -> tuple[float, float]:
    """(CPU, wall) seconds to decode `body` as a frame and free it, as the mesh does it:

    with the GC paused, and the frame freed before it resumes.
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    with wire.gc_paused():
        frames = decode(body)
        del frames
    return time.thread_time() - cpu, time.perf_counter() - wall


def kept_cost(body: bytes) -> float:
    """CPU seconds of the GC's first pass over a decoded frame that a handler kept."""
    with wire.gc_paused():
        frames = decode(body)
        cpu = time.thread_time()
        gc.collect(0)  # `frames` is alive: this pass has all its objects to scan
        cost = time.thread_time() - cpu
        del frames
    return cost


def reference_cost(size: int) -> float:
    """CPU seconds for Python itself to make and free `size` empty lists, GC paused.

    One object per byte is the most a frame holds, so this is the yardstick for
    decoding a frame of `size` bytes.
    """
    cpu = time.thread_time()
    gc.disable()  # not through `wire`: the yardstick must not depend on what it measures
    try:
        lists = [[] for _ in range(size)]
        del lists
    finally:
        gc.enable()
    return time.thread_time() - cpu


def costs(body: bytes, runs: int = 3) -> tuple[float, float, float, float]:
    """(decode CPU, decode wall, kept CPU, reference CPU): best of `runs`, interleaved.

    The best, so that other processes on a loaded machine count least; the
    reference is measured between the others, so that it meets the same state
    of memory (how much of the cost is page faults varies from run to run).
    The wall time is the worst run's.
    """
    cpu = kept = reference = float("inf")
    worst_wall = 0.0
    for _ in range(runs):
        reference = min(reference, reference_cost(len(body)))
        run_cpu, run_wall = decode_cost(body)
        cpu, worst_wall = min(cpu, run_cpu), max(worst_wall, run_wall)
        kept = min(kept, kept_cost(body))
    return cpu, worst_wall, kept, reference


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_LIMIT
    print(
        f"frames of {size} bytes, ms of CPU (best of 3): to decode and free; wall (worst of 3);"
        " a GC pass over it if a handler keeps it; the reference (Python making and freeing"
        " one empty list per byte); the worst of decode and GC pass as a ratio to the reference"
    )
    worst = worst_ratio = 0.0
    for name, body in worst_frames(size):
        cpu, wall, kept, reference = costs(body)
        ratio = max(cpu, kept) / reference
        worst, worst_ratio = max(worst, cpu, kept), max(worst_ratio, ratio)
        print(
            f"  {name:30s} {cpu * 1e3:7.1f} {wall * 1e3:7.1f} {kept * 1e3:7.1f}"
            f" {reference * 1e3:7.1f} {ratio:5.2f}  {'refused' if not decode(body) else 'ok'}"
        )
    print(f"worst: {worst * 1e3:.1f} ms CPU; worst ratio to the reference {worst_ratio:.2f}")


if __name__ == "__main__":
    main()
