"""Worst-case frames for the decoder: ``.venv/bin/python -m tests.wire.bench_decode [BYTES]``.

Decoding runs on the event loop, so the slowest frame within the limit is
how long one peer can stall a node. Its cost is the number of objects in the
frame: these frames pack as many objects as a frame of BYTES bytes (default
`SHOAL_MAX_FRAME_BYTES`'s default) can hold, of every cheap kind. The script
prints, per frame, the CPU time of decoding it and of freeing the result (the
loop pays for both), the best of a few runs (CPU time, so that other
processes on a loaded machine do not count), and the wall time of the worst run.
"""

from __future__ import annotations

import gc
import struct
import sys
import time
from collections.abc import Callable, Iterator

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


def decode_cost(body: bytes, runs: int = 3) -> tuple[float, float, bool]:
    """(best CPU seconds, worst wall seconds, decoded?) to decode `body` as a frame and free it.

    As the mesh does it: with the GC paused, and the frame freed before it resumes.
    """
    frame = wire.HEADER.pack(len(body)) + body
    best_cpu, worst_wall, decoded = float("inf"), 0.0, False
    for _ in range(runs):
        decoder = wire.FrameDecoder(len(body))
        wall, cpu = time.perf_counter(), time.thread_time()
        with wire.gc_paused():
            try:
                frames = decoder.feed(frame)
                decoded = len(frames) == 1
                del frames
            except wire.FrameError:
                decoded = False
        best_cpu = min(best_cpu, time.thread_time() - cpu)
        worst_wall = max(worst_wall, time.perf_counter() - wall)
    return best_cpu, worst_wall, decoded


def kept_cost(body: bytes) -> float:
    """CPU seconds of the GC's first pass over a decoded frame that a handler kept."""
    decoder = wire.FrameDecoder(len(body))
    with wire.gc_paused():
        try:
            frames = decoder.feed(wire.HEADER.pack(len(body)) + body)
        except wire.FrameError:
            return 0.0
        cpu = time.thread_time()
        gc.collect(0)  # `frames` is alive: this pass has all its objects to scan
        cost = time.thread_time() - cpu
        del frames
    return cost


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_LIMIT
    print(
        f"frames of {size} bytes: ms of CPU to decode and free (best of 3), wall ms (worst of 3),"
        " ms of CPU of a GC pass over it if a handler keeps it"
    )
    worst = 0.0
    for name, body in worst_frames(size):
        cpu, wall, decoded = decode_cost(body)
        kept = kept_cost(body)
        worst = max(worst, cpu, kept)
        print(
            f"  {name:30s} {cpu * 1e3:7.1f} {wall * 1e3:7.1f} {kept * 1e3:7.1f}"
            f"  {'ok' if decoded else 'refused'}"
        )
    print(f"worst: {worst * 1e3:.1f} ms CPU")


if __name__ == "__main__":
    main()
