"""Cookie-derived keys and the encrypted record layer of the mesh.

The cookie is stretched once per process with scrypt, so that anything
derived from it (handshake proofs, the fingerprint on pages) costs an
attacker a slow KDF per guess. After the handshake each direction of a
connection has its own AES-256-GCM key, derived with HKDF from the stretched
cookie and the handshake transcript (both names, incarnations and nonces), and
a 64-bit counter nonce: a replayed, reordered, dropped or altered record fails
authentication, and the connection is dropped.

A record is a 4-byte big-endian length followed by that many bytes of
ciphertext (tag included). Records carry a plain byte stream (the mesh's
frames), cut wherever the sender writes, so one record usually holds a whole
batch of frames and the AEAD cost is paid per write, not per message.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import string
import struct
from collections import Counter

# scrypt cost: about 50 ms and 16 MiB once per process, and per guess for an attacker.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_SIZE = 32
TAG_SIZE = 16
# Plaintext per record at most: bounds what a receiver buffers before it can
# authenticate anything (one record), independently of the frame size limit.
MAX_RECORD_PLAINTEXT = 256 * 1024
MAX_RECORD = MAX_RECORD_PLAINTEXT + TAG_SIZE
# Up to this size a record's header and ciphertext are joined into one bytes
# (one transport.write, the cheapest path of a small call or reply); a larger
# one goes out as two buffers rather than be copied.
JOIN_BELOW = 16 * 1024
# Plaintext below this size is sealed into one joined record (`Sealer.seal_small`).
SMALL_RECORD = JOIN_BELOW - TAG_SIZE
HEADER = struct.Struct(">I")
_header_pack = HEADER.pack
_header_unpack_from = HEADER.unpack_from
_NONCE = struct.Struct(">4xQ")
# Cookie strength: at least this long, and at least this many estimated bits.
MIN_COOKIE_LENGTH = 32
MIN_COOKIE_BITS = 128


class AuthenticationError(Exception):
    """A record failed authentication (or is malformed): drop the connection."""


def cookie_bytes(cookie: str) -> bytes:
    """The environment's bytes as they were (a non-UTF-8 cookie arrives surrogate-escaped)."""
    return cookie.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=8)
def _master(cookie: str) -> bytes:
    """scrypt(cookie): the one slow step, paid once per process (cached)."""
    return hashlib.scrypt(
        cookie_bytes(cookie),
        salt=b"shoal v2 cookie",
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=KEY_SIZE,
    )


def stretch(cookie: str, purpose: bytes) -> bytes:
    """A key for one purpose (mesh, gossip, fingerprint) from the scrypt of the cookie."""
    return hmac.new(_master(cookie), b"shoal v2 " + purpose, hashlib.sha256).digest()


def fingerprint(cookie: str) -> str:
    """`sha256:xxxxxxxx`: tells cookies apart; a slow KDF makes it useless for guessing."""
    digest = hashlib.sha256(stretch(cookie, b"fingerprint")).hexdigest()
    return f"sha256:{digest[:8]}"


def new_cookie() -> str:
    """A strong cookie: 256 random bits, URL-safe (what `shoal cookie` prints)."""
    import secrets

    return secrets.token_urlsafe(32)


# Standard alphabets, smallest first: a cookie is rated by the smallest one that
# holds all its characters (hex from `openssl rand -hex`, base64, printable ASCII).
_ALPHABETS = (
    frozenset("0123456789abcdef"),
    frozenset("0123456789ABCDEF"),
    frozenset(string.ascii_lowercase + string.digits),
    frozenset(string.ascii_letters + string.digits),
    frozenset(string.ascii_letters + string.digits + "-_+/="),
)
# Below this many bits per character (empirical), the cookie is patterned or repetitive.
_MIN_BITS_PER_CHAR = 3.0


def estimated_bits(cookie: str) -> float:
    """A strength estimate: length times log2 of the cookie's alphabet.

    A repetitive or patterned cookie (`aaaa…`, `abab…`: under 3 bits per
    character of empirical entropy) is rated by that entropy instead, so it
    fails. `openssl rand -hex 16` rates 128 bits, `shoal cookie` 258.
    """
    if not cookie:
        return 0.0
    n = len(cookie)
    counts = Counter(cookie)
    per_char = max(0.0, -sum(c / n * math.log2(c / n) for c in counts.values()))
    if per_char < _MIN_BITS_PER_CHAR:
        return n * per_char
    chars = set(cookie)
    size = next((len(a) for a in _ALPHABETS if chars <= a), 95)
    return n * math.log2(size)


def cookie_weakness(cookie: str) -> str | None:
    """Why `cookie` is too weak to protect a cluster, or None when it is strong enough."""
    if len(cookie) < MIN_COOKIE_LENGTH:
        return f"it has {len(cookie)} characters, fewer than {MIN_COOKIE_LENGTH}"
    bits = estimated_bits(cookie)
    if bits < MIN_COOKIE_BITS:
        return f"it has about {bits:.0f} bits of entropy, fewer than {MIN_COOKIE_BITS}"
    return None


def session_keys(master: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(dialer->acceptor key, acceptor->dialer key) for one connection."""
    # Imported here, as in Sealer and Opener: only a connection needs cryptography, and
    # importing it costs about as much as the rest of `import shoal`.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_SIZE,
        salt=hashlib.sha256(transcript).digest(),
        info=b"shoal v2 session keys",
    ).derive(master)
    return material[:KEY_SIZE], material[KEY_SIZE:]


class Sealer:
    """Encrypts one direction of a connection: bytes in, records out."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._encrypt = AESGCM(key).encrypt
        self._counter = 0

    def seal_small(self, data: bytes) -> bytes:
        """One record, header and ciphertext joined, for `data` under SMALL_RECORD bytes."""
        sealed: bytes = self._encrypt(_NONCE.pack(self._counter), data, None)
        self._counter += 1
        return _header_pack(len(sealed)) + sealed

    def seal(self, data: bytes) -> list[bytes]:
        """The records carrying `data` (header and ciphertext, ready to write)."""
        if len(data) <= MAX_RECORD_PLAINTEXT:
            sealed = self._encrypt(_NONCE.pack(self._counter), data, None)
            self._counter += 1
            if len(sealed) < JOIN_BELOW:
                return [_header_pack(len(sealed)) + sealed]
            return [_header_pack(len(sealed)), sealed]
        out: list[bytes] = []
        with memoryview(data) as view:
            for start in range(0, len(data), MAX_RECORD_PLAINTEXT):
                out.extend(self.seal(bytes(view[start : start + MAX_RECORD_PLAINTEXT])))
        return out


class Opener:
    """Decrypts one direction of a connection: bytes in, authenticated plaintext out.

    Buffers at most one record (MAX_RECORD plus its header).
    """

    def __init__(self, key: bytes) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._decrypt = AESGCM(key).decrypt
        self._invalid_tag = InvalidTag
        self._counter = 0
        self._buffer = bytearray()

    def open(self, data: bytes) -> bytes:
        """The plaintext of the complete records received so far."""
        buffer = self._buffer
        size = len(data)
        if not buffer and size > 4 and _header_unpack_from(data)[0] == size - 4:
            # Common case: exactly one whole record (a call, a reply, a small batch).
            if not TAG_SIZE <= size - 4 <= MAX_RECORD:
                raise AuthenticationError(f"record of {size - 4} bytes is malformed")
            try:
                plain: bytes = self._decrypt(_NONCE.pack(self._counter), data[4:], None)
            except self._invalid_tag:
                raise AuthenticationError("record failed authentication") from None
            self._counter += 1
            return plain
        try:
            if not buffer:
                # Common case: nothing left over; decrypt straight from `data`.
                out, offset = self._open(data)
                if offset < len(data):
                    buffer += memoryview(data)[offset:]
            else:
                buffer += data
                out, offset = self._open(buffer)
                del buffer[:offset]
        except AuthenticationError:
            buffer.clear()  # the connection is to be dropped
            raise
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _open(self, data: bytes | bytearray) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        offset = 0
        size = len(data)
        decrypt = self._decrypt
        invalid_tag = self._invalid_tag
        with memoryview(data) as view:  # released before the buffer is resized
            while size - offset >= 4:
                (length,) = _header_unpack_from(data, offset)
                if not TAG_SIZE <= length <= MAX_RECORD:
                    raise AuthenticationError(f"record of {length} bytes is malformed")
                end = offset + 4 + length
                if end > size:
                    break
                try:
                    out.append(decrypt(_NONCE.pack(self._counter), view[offset + 4 : end], None))
                except invalid_tag:
                    raise AuthenticationError("record failed authentication") from None
                self._counter += 1
                offset = end
        return out, offset

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record, waiting for the rest."""
        return len(self._buffer)
