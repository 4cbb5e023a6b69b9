"""Frames, message kinds and the handshake: pure functions, so they can be fuzzed.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Nothing from the network is ever unpickled or evaluated: msgpack decodes into
plain data only, and every frame is bounded by a size limit.

Handshake (mutual HMAC-SHA256 challenge/response over a key stretched from the
cookie with scrypt; the cookie itself never travels):

    dialer   -> acceptor  HELLO      version, dialer name, port, incarnation, nonce_d,
                                     expected name, encryption wanted
    acceptor -> dialer    CHALLENGE  acceptor name, incarnation, nonce_a (no proof)
    dialer   -> acceptor  PROOF      proof_d
    acceptor -> dialer    WELCOME(proof_a) | REJECT(reason)

The acceptor proves nothing before the dialer has proven that it knows the
cookie, so a stranger who connects learns nothing it could test guesses
against. Each proof is an HMAC over the whole transcript (both names,
incarnations and fresh nonces) with a different label per direction, so a
proof can be neither replayed nor reflected. After WELCOME both directions
switch to AES-GCM records keyed from the same transcript (`shoal.crypto`),
unless TLS already protects the connection.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import os
import struct
from typing import Any, NamedTuple

import msgpack

from shoal import crypto

# 2: the acceptor proves itself in WELCOME, after the dialer's proof; encrypted records.
PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I")
_header_pack = HEADER.pack
_header_unpack_from = HEADER.unpack_from
_header_unpack = HEADER.unpack
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
#
# A function, not a functools.partial: a partial with keywords builds a dict per call and
# makes msgpack parse it (about 0.25 us more per frame, a tenth of a small message's cost).
def _unpackb(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_ext_len=0, ext_hook=_no_ext)


# Reads from this size up are decoded by one streaming Unpacker (`FrameDecoder._stream`):
# below it, making the Unpacker costs more than it saves.
STREAM_FROM = 512

# The kinds whose last field is the app's payload.
PAYLOAD_KINDS = frozenset({SEND, CALL, REPLY, PUBLISH})


class UnreadablePayload(NamedTuple):
    """Stands in for a payload that is valid msgpack but no shoal payload: a map with an
    array as a key (the sender's dict was keyed by tuples), or an extension type (the
    sender's msgpack.ExtType or Timestamp). That message fails, with this reason; its
    connection, and every other message on it, is unharmed."""

    reason: str


_UNREADABLE = UnreadablePayload(
    "a map in it has an array (or a map) as a key (a dict keyed by tuples?): "
    "keys must be str, int, float, bool, None or bytes"
)
_UNREADABLE_EXT = UnreadablePayload(
    "it holds a msgpack extension type (a msgpack.ExtType or msgpack.Timestamp?), or bytes "
    "that are no msgpack value: payloads are None, bool, int, float, str, bytes, list, "
    "tuple and dict"
)


def _salvage(data: bytes | memoryview, error: Exception) -> list[Any]:
    """The frame that `_unpackb` refused with `error`, its payload replaced by an
    UnreadablePayload; FrameError unless the frame is well-formed msgpack whose fields
    but the payload are shoal's own (so such values elsewhere still drop the peer).

    The payload is skipped, not decoded again: that costs a few ms at most, where a second
    decode would double the cost of the worst frame a peer can send."""
    why = f"undecodable frame: {type(error).__name__}"
    # Only shoal's own fields are decoded here, and any value in them but an int, str or
    # bool fails the frame below: `_unpackb`'s options about keys and extensions do not
    # matter. A frame may exceed the Unpacker's default buffer (100 MiB).
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    try:
        unpacker.feed(data)
        length = unpacker.read_array_header()
        # [kind, ..., payload] of the kinds that carry one has 3 or 4 elements.
        fields = [unpacker.unpack() for _ in range(length - 1)] if length in (3, 4) else []
        if fields:
            unpacker.skip()  # the payload
        whole = unpacker.tell() == len(data)
    except Exception:
        raise FrameError(why) from None
    if (
        not fields
        or not whole
        or not all(type(field) in (int, str, bool) for field in fields)
        or fields[0] not in PAYLOAD_KINDS  # (hashable: checked above; a list is not)
    ):
        raise FrameError(why)
    return [*fields, _UNREADABLE if isinstance(error, TypeError) else _UNREADABLE_EXT]


# Fewer bytes than this hold fewer objects than the GC's first threshold (700
# allocations), so they set off at most one collection: no pause needed.
GC_PAUSE_FROM = 512


def gc_paused(size: int = GC_PAUSE_FROM) -> contextlib.AbstractContextManager[None]:
    """Pause the cyclic GC while a batch of frames (`size` bytes) is decoded and handled.

    A frame of small lists would otherwise set off a collection every 700
    lists, each scanning all young objects: the worst frame decoded seven
    times slower. Frames handled before the GC resumes (most are) never reach
    a collection at all.
    """
    if size < GC_PAUSE_FROM or not gc.isenabled():
        return _NO_PAUSE
    return _GC_PAUSED


class _GCPaused:
    def __enter__(self) -> None:
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()


_GC_PAUSED = _GCPaused()
_NO_PAUSE = contextlib.nullcontext()


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
    except (TypeError, ValueError) as exc:  # an unhashable key, an extension type, or junk
        return _salvage(data, exc)
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
        size = len(data)
        if not buffer and size > 4 and max_frames is None:
            length = _header_unpack_from(data)[0]
            if length == size - 4 and length <= self.max_size:
                # Commonest case: exactly one whole frame (a call, a reply).
                try:
                    return [_unpackb(data[4:])]
                except (TypeError, ValueError) as exc:
                    return [_salvage(data[4:], exc)]
                except Exception as exc:  # msgpack raises several types on bad input
                    raise FrameError(f"undecodable frame: {type(exc).__name__}") from None
        if not buffer and data:
            # Common case: nothing left over from the last read. Decode straight
            # from `data`, and keep only its incomplete tail.
            frames, offset = self._frames(data, max_frames)
            if offset < len(data):
                buffer += memoryview(data)[offset:]
            return frames
        if data:
            buffer += data
        frames, offset = self._frames(buffer, max_frames)
        if offset:
            del buffer[:offset]
        return frames

    def _frames(self, data: bytes | bytearray, max_frames: int | None) -> tuple[list[Any], int]:
        """The complete frames at the start of `data`, and where they end: streamed when
        that pays (many frames, the first of them complete), else frame by frame."""
        size = len(data)
        if (
            max_frames is None
            and size >= STREAM_FROM
            and _header_unpack_from(data)[0] <= size - 4  # not a large frame still arriving
        ):
            streamed = self._stream(data)
            if streamed is not None:
                return streamed
        return self._decode(data, max_frames)

    def _stream(self, data: bytes | bytearray) -> tuple[list[Any], int] | None:
        """`_decode` for a read of many frames, at about 80 % of its cost: one streaming
        Unpacker reads them all, headers included, and each body must end where its
        header says. None, for `_decode` to redo the read and say what is wrong, when a
        frame is anything but plain msgpack of its declared length (a payload to salvage,
        a frame over the limit, junk): such a read costs up to twice its decoding."""
        unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            max_ext_len=0,
            ext_hook=_no_ext,
            max_buffer_size=len(data),
        )
        unpacker.feed(data)
        read_header, unpack, position = unpacker.read_bytes, unpacker.unpack, unpacker.tell
        frames: list[Any] = []
        append = frames.append
        offset, size, limit = 0, len(data), self.max_size
        try:
            while size - offset >= 4:
                (length,) = _header_unpack(read_header(4))
                if length > limit:
                    return None
                end = offset + 4 + length
                if end > size:  # the incomplete frame at the end: kept for the next read
                    break
                append(unpack())
                if position() != end:
                    return None
                offset = end
        except Exception:  # msgpack raises several types on bad input
            return None
        return frames, offset

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
                    body = view[offset + 4 : end]
                    try:
                        frames.append(_unpackb(body))
                    except (TypeError, ValueError) as exc:
                        frames.append(_salvage(body, exc))
                    except Exception as exc:  # msgpack raises several types on bad input
                        raise FrameError(f"undecodable frame: {type(exc).__name__}") from None
                    finally:
                        # A view that an error's traceback still holds would keep the buffer
                        # exported, and clearing it would fail (fuzzed): released here, the
                        # one place that makes views of the buffer.
                        body.release()
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

    def take_pending(self) -> bytes:
        """Remove and return the undecoded bytes (ciphertext that followed the handshake)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def cookie_key(cookie: str) -> bytes:
    """The handshake key: scrypt of the cookie (cached), so every guess costs a slow KDF."""
    return crypto.stretch(cookie, b"mesh")


def cookie_fingerprint(cookie: str) -> str:
    """`sha256:xxxxxxxx`: shows which cookie is in use without revealing it."""
    return crypto.fingerprint(cookie)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def new_incarnation() -> bytes:
    return os.urandom(INCARNATION_SIZE)


class Hello(NamedTuple):
    version: int
    name: str
    port: int
    incarnation: bytes
    nonce: bytes
    expected: str | None  # the acceptor name the dialer wants, if known
    encrypt: bool = True  # AES-GCM records after the handshake (both sides must agree)

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "hello",
            "v": self.version,
            "name": self.name,
            "port": self.port,
            "inc": self.incarnation,
            "nonce": self.nonce,
            "to": self.expected,
            "enc": self.encrypt,
        }


class Challenge(NamedTuple):
    name: str
    incarnation: bytes
    nonce: bytes


def parse_hello(msg: Any) -> Hello:
    """Validate a HELLO frame's shape and types; a wrong version is reported as such."""
    if not isinstance(msg, dict) or msg.get("t") != "hello":
        raise HandshakeError("expected HELLO")
    version = msg.get("v")
    # `type() is int`: msgpack gives True for a bool and 1.0 for a float, and both
    # would compare equal to an int.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise HandshakeError(f"unsupported protocol version {safe(version)}")
    name = _node_name(msg.get("name"))
    expected = msg.get("to")
    if expected is not None:
        expected = _node_name(expected)
    port = msg.get("port")
    if type(port) is not int or not 0 < port < 65536:
        raise HandshakeError("malformed port")
    encrypt = msg.get("enc")
    if type(encrypt) is not bool:
        raise HandshakeError("malformed enc")
    return Hello(
        version,
        name,
        port,
        _blob(msg, "inc", INCARNATION_SIZE),
        _blob(msg, "nonce"),
        expected,
        encrypt,
    )


def make_challenge(name: str, incarnation: bytes, nonce: bytes) -> dict[str, Any]:
    """The acceptor's answer to HELLO: who it is and its nonce, and no proof yet."""
    return {"t": "challenge", "name": name, "inc": incarnation, "nonce": nonce}


def parse_challenge(msg: Any) -> Challenge:
    if not isinstance(msg, dict) or msg.get("t") != "challenge":
        if isinstance(msg, dict) and msg.get("t") == "reject":
            raise HandshakeError(f"rejected by peer: {_reason(msg)}")
        raise HandshakeError("expected CHALLENGE")
    return Challenge(
        _node_name(msg.get("name")),
        _blob(msg, "inc", INCARNATION_SIZE),
        _blob(msg, "nonce"),
    )


def make_proof(key: bytes, hello: Hello, challenge: Challenge) -> dict[str, Any]:
    """The dialer's proof, the first one of the handshake."""
    proof = _proof(key, b"dialer", hello, challenge.name, challenge.incarnation, challenge.nonce)
    return {"t": "proof", "proof": proof}


def verify_proof(
    key: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes, msg: Any
) -> None:
    """The acceptor checks the dialer's proof before it proves anything itself."""
    if isinstance(msg, dict) and msg.get("t") == "reject":
        raise HandshakeError(f"the peer gave up the handshake ({_reason(msg)})")
    if not isinstance(msg, dict) or msg.get("t") != "proof":
        raise HandshakeError("expected PROOF")
    proof = _blob(msg, "proof", 32)
    expected = _proof(key, b"dialer", hello, name, incarnation, nonce)
    if not hmac.compare_digest(expected, proof):
        raise HandshakeError("dialer's cookie proof is wrong (different RELEASE_COOKIE?)")


def make_welcome(
    key: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes
) -> dict[str, Any]:
    """The acceptor's verdict and its proof, sent only after the dialer's proof checked out."""
    proof = _proof(key, b"acceptor", hello, name, incarnation, nonce)
    return {"t": "welcome", "proof": proof}


def verify_welcome(key: bytes, hello: Hello, challenge: Challenge, msg: Any) -> None:
    """WELCOME with a valid acceptor proof returns; REJECT or a wrong proof raises."""
    if isinstance(msg, dict) and msg.get("t") == "reject":
        hint = ": our cookie proof is wrong for it (different RELEASE_COOKIE?)"
        raise HandshakeError(
            f"rejected: {_reason(msg)}" + (hint if msg.get("reason") == "cookie" else "")
        )
    if not isinstance(msg, dict) or msg.get("t") != "welcome":
        raise HandshakeError("expected WELCOME")
    proof = _blob(msg, "proof", 32)
    expected = _proof(
        key, b"acceptor", hello, challenge.name, challenge.incarnation, challenge.nonce
    )
    if not hmac.compare_digest(expected, proof):
        raise HandshakeError("acceptor's cookie proof is wrong (different RELEASE_COOKIE?)")


def transcript(hello: Hello, name: str, incarnation: bytes, nonce: bytes) -> bytes:
    """Everything both sides said, in one canonical encoding (proofs and session keys)."""
    return pack(
        [
            hello.version,
            hello.name,
            hello.port,
            hello.incarnation,
            hello.nonce,
            hello.expected,
            hello.encrypt,
            name,
            incarnation,
            nonce,
        ]
    )


def session_keys(
    key: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes
) -> tuple[bytes, bytes]:
    """(dialer->acceptor, acceptor->dialer) record keys for this connection."""
    return crypto.session_keys(key, transcript(hello, name, incarnation, nonce))


def _proof(
    key: bytes, label: bytes, hello: Hello, name: str, incarnation: bytes, nonce: bytes
) -> bytes:
    data = label + b"\x00" + transcript(hello, name, incarnation, nonce)
    return hmac.new(key, data, hashlib.sha256).digest()


def reject(reason: str) -> dict[str, Any]:
    return {"t": "reject", "reason": reason}


def _reason(msg: dict[str, Any]) -> str:
    """A peer's stated reason, safe to log (bounded, no control characters)."""
    return safe(msg.get("reason"))


def safe(value: Any) -> str:
    """A peer-supplied value for a log line: repr (escapes control characters), bounded."""
    return repr(value)[:80]


def _node_name(value: Any) -> str:
    if (
        type(value) is not str
        or not 3 <= len(value) <= 320
        or value.count("@") != 1
        or not value.isprintable()
        or any(c.isspace() for c in value)
    ):
        raise HandshakeError("malformed node name")
    return value


def _blob(msg: dict[str, Any], field: str, size: int = NONCE_SIZE) -> bytes:
    value = msg.get(field)
    if type(value) is not bytes or len(value) != size:
        raise HandshakeError(f"malformed {field}")
    return value
