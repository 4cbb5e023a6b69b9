"""No frame within the limit stalls the event loop for more than 100 ms.

The worst frames we could construct (`bench_decode`: one object per byte,
deep nesting, colliding keys, extension types) are decoded as the mesh does
it. CPU time of this thread is measured, best of three, so that other
processes on a loaded machine do not count: it is what the loop pays.
`.venv/bin/python -m tests.wire.bench_decode` prints the table.
"""

from __future__ import annotations

import pytest

from shoal import wire
from tests.wire.bench_decode import DEFAULT_LIMIT, decode_cost, kept_cost, worst_frames

BOUND = 0.100
CASES = dict(worst_frames(DEFAULT_LIMIT))


@pytest.mark.parametrize("name", list(CASES))
def test_the_worst_frames_decode_or_are_refused_within_the_bound(name: str) -> None:
    body = CASES[name]
    assert len(body) <= DEFAULT_LIMIT
    cpu, _wall, decoded = decode_cost(body)
    assert cpu < BOUND, f"{name}: {cpu * 1000:.0f} ms"
    assert decoded == ("refused" not in name)
    # A handler that keeps the payload makes the GC scan it later: bounded alike.
    assert kept_cost(body) < BOUND


@pytest.mark.parametrize(
    "data",
    [b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x00\x01", b"\xd4\x01\x00", b"\xc8\x00\x01\x05\x00"],
    ids=["timestamp", "empty ext", "fixext1", "ext16"],
)
def test_extension_types_are_refused(data: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.FrameDecoder(1000).feed(wire.HEADER.pack(len(data)) + data)
    with pytest.raises(wire.FrameError):
        wire.unpack(data)


def test_the_sender_refuses_a_frame_over_the_limit() -> None:
    assert wire.unpack(wire.encode_frame([b"x" * 100], 103)[4:]) == [b"x" * 100]
    with pytest.raises(wire.MessageTooLarge, match="103 bytes exceeds the frame limit of 102"):
        wire.encode_frame([b"x" * 100], 102)
