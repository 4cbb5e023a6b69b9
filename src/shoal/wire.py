"""Frames, message kinds and the handshake: pure functions, so they can be fuzzed.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Nothing from the network is ever unpickled or evaluated: msgpack decodes into
plain data only, and every frame is bounded by a size limit.

Handshake (mutual HMAC-SHA256 challenge/response over a key derived from the
cookie; the cookie itself never travels):

    dialer   -> acceptor  HELLO      version, dialer name, incarnation, nonce_d, expected name
    acceptor -> dialer    CHALLENGE  acceptor name, incarnation, nonce_a, proof_a
    dialer   -> acceptor  PROOF      proof_d
    acceptor -> dialer    WELCOME | REJECT(reason)

Each proof is an HMAC over the whole transcript (both names, incarnations and
fresh nonces) with a different label per direction, so a proof can be neither
replayed nor reflected.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
_header_pack = HEADER.pack
_header_unpack_from = HEADER.unpack_from
# Handshake frames are tiny; an unauthenticated peer gets no more than this.
MAX_HANDSHAKE_FRAME = 4096
NONCE_SIZE = 32
INCARNATION_SIZE = 8

# Message kinds after the handshake: a frame is a msgpack array [kind, ...].
HEARTBEAT = 0  # []
MEMBERS = 1  # [[name, host, port], ...]
SEND = 2  # [handler, payload]
CALL = 3  # [call_id, handler, payload]
REPLY = 4  # [call_id, ok, payload_or_error_message]; ok: True, False, "busy", "too_large"
PUBLISH = 5  # [topic, payload]
LEAVING = 6  # []
KINDS = frozenset({HEARTBEAT, MEMBERS, SEND, CALL, REPLY, PUBLISH, LEAVING})


class FrameError(Exception):
    """The peer sent something that is not a valid frame; drop the connection."""


class MessageTooLarge(ValueError):
    """A message does not fit in one frame (`SHOAL_MAX_FRAME_BYTES`); raised by the sender."""


class HandshakeError(Exception):
    """The handshake failed; the message says why (never includes secrets)."""


# One packer, reused: `msgpack.packb` builds a new Packer per call, which costs
# as much as packing a small message. Packer.pack runs in C without releasing
# the GIL (there is no `default` hook to call back into Python), and resets its
# buffer when it raises, so sharing it is safe.
_packer = msgpack.Packer(use_bin_type=True, datetime=False)
_pack = _packer.pack


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not shoal payloads")


# Decoding runs on the event loop, so its cost per frame must be bounded. Its
# cost is the number of objects a frame holds, at most about one per byte;
# the frame limit bounds that (see `shoal.config`). Extension types (including
# msgpack's timestamps) would call Python code per object, several times
# slower, so none is accepted: `max_ext_len=0` refuses those with data,
# `_no_ext` the empty ones.
_unpackb = functools.partial(
    msgpack.unpackb, raw=False, strict_map_key=False, max_ext_len=0, ext_hook=_no_ext
)


def gc_paused() -> contextlib.AbstractContextManager[None]:
    """Pause the cyclic GC while a batch of frames is decoded and handled.

    A frame of small lists would otherwise set off a collection every 700
    lists, each scanning all young objects: the worst frame decoded seven
    times slower. Frames handled before the GC resumes (most are) never reach
    a collection at all.
    """
    return _GC_PAUSED if gc.isenabled() else contextlib.nullcontext()


class _GCPaused:
    def __enter__(self) -> None:
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()


_GC_PAUSED = _GCPaused()


def pack(obj: Any) -> bytes:
    """Encode msgpack types; anything else raises a TypeError that names the type."""
    try:
        return _pack(obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"shoal payloads must be msgpack types (None, bool, int, float, str, bytes, "
            f"list, tuple, dict): {exc}"
        ) from None


def unpack(data: bytes | memoryview) -> Any:
    """Decode one msgpack value; any malformation is a FrameError."""
    try:
        return _unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise FrameError(f"undecodable frame: {type(exc).__name__}") from None


def encode_frame(obj: Any, max_size: int | None = None) -> bytes:
    """Length prefix and msgpack; MessageTooLarge if the body exceeds `max_size`."""
    try:
        body: bytes = _pack(obj)
    except (TypeError, ValueError, OverflowError):
        pack(obj)  # raises the explanatory TypeError
        raise
    if max_size is not None and len(body) > max_size:
        raise MessageTooLarge(
            f"message of {len(body)} bytes exceeds the frame limit of {max_size} bytes "
            "(SHOAL_MAX_FRAME_BYTES)"
        )
    return _header_pack(len(body)) + body


class FrameDecoder:
    """Incremental frame decoder with a hard size limit.

    The buffer never holds more than one frame's header plus the bytes of the
    frame being read, so memory per connection is bounded by `max_size`.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes = b"", max_frames: int | None = None) -> list[Any]:
        """Add bytes; return the complete frames decoded so far (at most `max_frames`).

        With `max_frames`, undecoded frames stay buffered for a later call; the
        caller then bounds memory itself (the mesh stops reading meanwhile).
        After a FrameError the buffer is emptied: the connection is to be dropped.
        """
        buffer = self._buffer
        if not buffer and data:
            # Common case: nothing left over from the last read. Decode straight
            # from `data`, and keep only its incomplete tail.
            frames, offset = self._decode(data, max_frames)
            if offset < len(data):
                buffer += memoryview(data)[offset:]
            return frames
        if data:
            buffer += data
        frames, offset = self._decode(buffer, max_frames)
        if offset:
            del buffer[:offset]
        return frames

    def _decode(self, data: bytes | bytearray, max_frames: int | None) -> tuple[list[Any], int]:
        """The complete frames at the start of `data`, and where they end."""
        frames: list[Any] = []
        offset = 0
        size = len(data)
        limit = self.max_size
        try:
            with memoryview(data) as view:  # released before the buffer is resized
                while size - offset >= 4:
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                    (length,) = _header_unpack_from(data, offset)
                    if length > limit:
                        raise FrameError(f"frame of {length} bytes exceeds the limit of {limit}")
                    end = offset + 4 + length
                    if end > size:
                        break
                    try:
                        frames.append(_unpackb(view[offset + 4 : end]))
                    except Exception as exc:  # msgpack raises several types on bad input
                        raise FrameError(f"undecodable frame: {type(exc).__name__}") from None
                    offset = end
        except FrameError:
            self._buffer.clear()
            raise
        return frames, offset

    def append(self, data: bytes) -> None:
        """Buffer bytes without decoding them; the caller bounds how much (see `pending`)."""
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


def cookie_key(cookie: str, purpose: bytes = b"shoal mesh v1") -> bytes:
    """A per-purpose key, so the cookie is never used (or exposed) directly."""
    return hmac.new(_cookie_bytes(cookie), purpose, hashlib.sha256).digest()


def cookie_fingerprint(cookie: str) -> str:
    """`sha256:xxxxxxxx`: shows which cookie is in use without revealing it."""
    digest = hashlib.sha256(b"shoal fingerprint v1\x00" + _cookie_bytes(cookie)).hexdigest()
    return f"sha256:{digest[:8]}"


def _cookie_bytes(cookie: str) -> bytes:
    # The environment's bytes as they were: a cookie that is not valid UTF-8
    # reaches Python with surrogate escapes, and must not crash the node.
    return cookie.encode("utf-8", "surrogateescape")


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def new_incarnation() -> bytes:
    return os.urandom(INCARNATION_SIZE)


@dataclass(frozen=True)
class Hello:
    version: int
    name: str
    port: int
    incarnation: bytes
    nonce: bytes
    expected: str | None  # the acceptor name the dialer wants, if known

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "hello",
            "v": self.version,
            "name": self.name,
            "port": self.port,
            "inc": self.incarnation,
            "nonce": self.nonce,
            "to": self.expected,
        }


@dataclass(frozen=True)
class Challenge:
    name: str
    incarnation: bytes
    nonce: bytes
    proof: bytes


def parse_hello(msg: Any) -> Hello:
    """Validate a HELLO frame's shape; a wrong version is reported as such."""
    if not isinstance(msg, dict) or msg.get("t") != "hello":
        raise HandshakeError("expected HELLO")
    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"unsupported protocol version {repr(version)[:40]}")
    name = _node_name(msg.get("name"))
    expected = msg.get("to")
    if expected is not None:
        expected = _node_name(expected)
    port = msg.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise HandshakeError("malformed port")
    return Hello(
        version, name, port, _blob(msg, "inc", INCARNATION_SIZE), _blob(msg, "nonce"), expected
    )


def make_challenge(
    key: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes
) -> dict[str, Any]:
    proof = _proof(key, b"acceptor", hello, name, incarnation, nonce)
    return {"t": "challenge", "name": name, "inc": incarnation, "nonce": nonce, "proof": proof}


def parse_challenge(msg: Any) -> Challenge:
    if not isinstance(msg, dict) or msg.get("t") != "challenge":
        if isinstance(msg, dict) and msg.get("t") == "reject":
            raise HandshakeError(f"rejected by peer: {_reason(msg)}")
        raise HandshakeError("expected CHALLENGE")
    return Challenge(
        _node_name(msg.get("name")),
        _blob(msg, "inc", INCARNATION_SIZE),
        _blob(msg, "nonce"),
        _blob(msg, "proof", 32),
    )


def verify_challenge(key: bytes, hello: Hello, challenge: Challenge) -> None:
    expected = _proof(
        key, b"acceptor", hello, challenge.name, challenge.incarnation, challenge.nonce
    )
    if not hmac.compare_digest(expected, challenge.proof):
        raise HandshakeError("acceptor's cookie proof is wrong (different RELEASE_COOKIE?)")


def make_proof(key: bytes, hello: Hello, challenge: Challenge) -> dict[str, Any]:
    proof = _proof(key, b"dialer", hello, challenge.name, challenge.incarnation, challenge.nonce)
    return {"t": "proof", "proof": proof}


def verify_proof(
    key: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes, msg: Any
) -> None:
    if isinstance(msg, dict) and msg.get("t") == "reject":
        hint = ": our cookie proof is wrong for it (different RELEASE_COOKIE?)"
        raise HandshakeError(
            f"the peer gave up the handshake ({_reason(msg)})"
            + (hint if msg.get("reason") == "cookie" else "")
        )
    if not isinstance(msg, dict) or msg.get("t") != "proof":
        raise HandshakeError("expected PROOF")
    proof = _blob(msg, "proof", 32)
    expected = _proof(key, b"dialer", hello, name, incarnation, nonce)
    if not hmac.compare_digest(expected, proof):
        raise HandshakeError("dialer's cookie proof is wrong (different RELEASE_COOKIE?)")


def _proof(
    key: bytes, label: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes
) -> bytes:
    transcript = pack(
        [
            label,
            hello.version,
            hello.name,
            hello.port,
            hello.incarnation,
            hello.nonce,
            name,
            incarnation,
            nonce,
        ]
    )
    return hmac.new(key, transcript, hashlib.sha256).digest()


def parse_welcome(msg: Any) -> None:
    """The acceptor's verdict: WELCOME returns, REJECT (or anything else) raises."""
    if isinstance(msg, dict) and msg.get("t") == "welcome":
        return
    if isinstance(msg, dict) and msg.get("t") == "reject":
        raise HandshakeError(f"rejected: {_reason(msg)}")
    raise HandshakeError("expected WELCOME")


def reject(reason: str) -> dict[str, Any]:
    return {"t": "reject", "reason": reason}


def _reason(msg: dict[str, Any]) -> str:
    """A peer's stated reason, safe to log (bounded, no control characters)."""
    return repr(msg.get("reason"))[:80]


def _node_name(value: Any) -> str:
    if not isinstance(value, str) or not 3 <= len(value) <= 320 or value.count("@") != 1:
        raise HandshakeError("malformed node name")
    return value


def _blob(msg: dict[str, Any], field: str, size: int = NONCE_SIZE) -> bytes:
    value = msg.get(field)
    if not isinstance(value, bytes) or len(value) != size:
        raise HandshakeError(f"malformed {field}")
    return value
