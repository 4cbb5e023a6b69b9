"""Coverage-guided fuzzing of the frame decoder, the handshake parsers and the record layer.

    .venv/bin/python bench/fuzz_wire.py -max_total_time=300        # 5 minutes
    .venv/bin/python bench/fuzz_wire.py -runs=20000 corpus_dir/    # keep a corpus

Each input is split into chunks (sizes taken from its first bytes) and fed to a
`FrameDecoder`, first with the handshake limit, then with a larger one; every
decoded frame goes through every handshake parser. The only exceptions allowed
are `FrameError` and `HandshakeError`; the decoder's buffer must never exceed
one frame (limit + 4-byte header); a read that the streaming decoder takes must
decode to the same frames as frame by frame. The same chunks also go to a record
`Opener` (the encrypted layer after the handshake), which may only raise
`AuthenticationError` and buffer at most one record; a valid record, sealed
by the matching key, is seeded so the fuzzer also mutates real ciphertext.
Anything else is a crash, and libFuzzer
writes the input that caused it to `crash-*` in the current directory.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import atheris

from shoal import crypto, wire


def _instrument(module: Any) -> None:
    """Coverage-instrument one module only (instrumenting its imports takes seconds)."""
    for value in list(vars(module).values()):
        if inspect.isfunction(value) and value.__module__ == module.__name__:
            atheris.instrument_func(value)
        elif inspect.isclass(value) and value.__module__ == module.__name__:
            for member in vars(value).values():
                if inspect.isfunction(member):
                    atheris.instrument_func(member)


_instrument(wire)
_instrument(crypto)

KEY = wire.cookie_key("fuzz-cookie-0f1e2d3c4b5a69788796a5b4")
HELLO = wire.Hello(wire.PROTOCOL_VERSION, "a@127.0.0.1", 4370, b"i" * 8, b"n" * 32, "b@127.0.0.1")
CHALLENGE = wire.Challenge("b@127.0.0.1", b"j" * 8, b"m" * 32)
RECORD_KEY, _ = wire.session_keys(
    KEY, HELLO, CHALLENGE.name, CHALLENGE.incarnation, CHALLENGE.nonce
)


def parse_everything(frame: Any) -> None:
    parsers = (
        wire.parse_hello,
        wire.parse_challenge,
        lambda m: wire.verify_welcome(KEY, HELLO, CHALLENGE, m),
        lambda m: wire.verify_proof(KEY, HELLO, "b@127.0.0.1", b"j" * 8, b"m" * 32, m),
    )
    for parse in parsers:
        try:
            parse(frame)
        except wire.HandshakeError:
            pass


def decode(data: bytes, limit: int) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chunk_sizes = [fdp.ConsumeIntInRange(0, 64) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = wire.FrameDecoder(limit)
    offset = 0
    chunks = []
    for size in chunk_sizes:
        chunks.append(rest[offset : offset + size])
        offset += size
    chunks.append(rest[offset:])
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                parse_everything(frame)
            if decoder.pending > limit + wire.HEADER.size:
                raise AssertionError(f"decoder holds {decoder.pending} bytes, limit {limit}")
    except wire.FrameError:
        if decoder.pending:
            raise AssertionError("a failed decoder kept its buffer") from None
    stream_like_frame_by_frame(rest, limit)
    opener = crypto.Opener(RECORD_KEY)
    try:
        for chunk in chunks:
            opener.open(chunk)
            if opener.pending > crypto.MAX_RECORD + crypto.HEADER.size:
                raise AssertionError(f"opener holds {opener.pending} bytes")
    except crypto.AuthenticationError:
        if opener.pending:
            raise AssertionError("a failed opener kept its buffer") from None


def stream_like_frame_by_frame(read: bytes, limit: int) -> None:
    """A read the streaming decoder accepts decodes to the same frames frame by frame."""
    decoder = wire.FrameDecoder(limit)
    streamed = decoder._stream(read)
    if streamed is None:
        return
    try:
        frame_by_frame = decoder._decode(read, None)
    except wire.FrameError as exc:
        raise AssertionError(f"streamed {streamed}, frame by frame {exc}") from None
    if repr(streamed) != repr(frame_by_frame):
        raise AssertionError(f"streamed {streamed}, frame by frame {frame_by_frame}")


def test_one_input(data: bytes) -> None:
    decode(data, wire.MAX_HANDSHAKE_FRAME)
    decode(data, 1 << 16)


def seed_corpus() -> str:
    """A temporary corpus of valid handshake streams, so the fuzzer starts deep."""
    challenge = wire.make_challenge(CHALLENGE.name, CHALLENGE.incarnation, CHALLENGE.nonce)
    messages: list[Any] = [
        HELLO.to_wire(),
        challenge,
        wire.make_proof(KEY, HELLO, CHALLENGE),
        wire.make_welcome(KEY, HELLO, CHALLENGE.name, CHALLENGE.incarnation, CHALLENGE.nonce),
        wire.reject("version"),
        [wire.SEND, "handler", {"payload": [1, 2.5, b"x", None]}],
    ]
    directory = tempfile.mkdtemp(prefix="shoal-fuzz-corpus-")
    for i, message in enumerate(messages):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(b"\x00" + wire.encode_frame(message))  # no chunk sizes, one chunk
    with open(os.path.join(directory, "seed-all"), "wb") as f:
        f.write(b"\x00" + b"".join(wire.encode_frame(m) for m in messages))
    with open(os.path.join(directory, "seed-many"), "wb") as f:  # a read that is streamed
        many = b"".join(wire.encode_frame(m) for m in messages)
        f.write(b"\x00" + many * (wire.STREAM_FROM // len(many) + 1))
    with open(os.path.join(directory, "seed-records"), "wb") as f:
        sealer = crypto.Sealer(RECORD_KEY)
        records = sealer.seal(wire.encode_frame(messages[-1])) + sealer.seal(b"x" * 100)
        f.write(b"\x00" + b"".join(records))
    return directory


def main() -> None:
    if os.environ.get("SHOAL_FUZZ_CHILD") or any(not a.startswith("-") for a in sys.argv[1:]):
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()  # exits the process when done
    # No corpus directory given: fuzz in a child process from a temporary seed
    # corpus, and remove it afterwards (libFuzzer exits without Python's cleanup).
    corpus = seed_corpus()
    try:
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], corpus],
            env={**os.environ, "SHOAL_FUZZ_CHILD": "1"},
            check=False,
        )
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
