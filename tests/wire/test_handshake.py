"""The handshake's pure functions: mutual HMAC proofs over the whole transcript.

A correct transcript verifies in both directions; any change to it (a flipped
bit, another cookie, swapped nonces or names) makes verification fail; the
acceptor's proof can never pass as the dialer's (no reflection); the acceptor's
CHALLENGE carries no proof at all (its proof comes in WELCOME, after the
dialer's); fields are strictly typed; and parsing arbitrary peer messages
raises only `HandshakeError`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal import wire
from tests.wire.strategies import msgpack_values

# scrypt makes every key cost tens of ms (more on a loaded machine): a few cookies,
# stretched once here, before any example runs against hypothesis's deadline.
COOKIES = [
    "property-cookie-one-0f1e2d3c4b5a6978",
    "property-cookie-two-8796a5b4c3d2e1f0",
    "property-cookie-three-5a4b3c2d1e0f9e8d",
]
for _cookie in COOKIES:
    wire.cookie_key(_cookie)
cookies = st.sampled_from(COOKIES)
# Node names are printable and have no spaces (parse_hello refuses others).
_name_chars = st.characters(whitelist_categories=("L", "N", "P", "S"), blacklist_characters="@")
names = st.builds(
    lambda base, host: f"{base}@{host}",
    st.text(_name_chars, min_size=1, max_size=20),
    st.text(_name_chars, min_size=1, max_size=40),
)
ports = st.integers(1, 65535)
nonces = st.binary(min_size=wire.NONCE_SIZE, max_size=wire.NONCE_SIZE)
incarnations = st.binary(min_size=wire.INCARNATION_SIZE, max_size=wire.INCARNATION_SIZE)


@dataclass
class Transcript:
    key: bytes
    hello: wire.Hello
    acceptor: str
    incarnation: bytes
    nonce: bytes

    def challenge(self) -> wire.Challenge:
        msg = wire.make_challenge(self.acceptor, self.incarnation, self.nonce)
        return wire.parse_challenge(wire.unpack(wire.pack(msg)))

    def proof(self) -> dict[str, Any]:
        return wire.make_proof(self.key, self.hello, self.challenge())

    def welcome(self) -> dict[str, Any]:
        return wire.make_welcome(self.key, self.hello, self.acceptor, self.incarnation, self.nonce)


@st.composite
def transcripts(draw: st.DrawFn) -> Transcript:
    hello = wire.Hello(
        wire.PROTOCOL_VERSION,
        draw(names),
        draw(ports),
        draw(incarnations),
        draw(nonces),
        draw(st.none() | names),
        draw(st.booleans()),
    )
    return Transcript(
        wire.cookie_key(draw(cookies)), hello, draw(names), draw(incarnations), draw(nonces)
    )


def acceptor_verifies(t: Transcript, proof_msg: Any) -> None:
    wire.verify_proof(t.key, t.hello, t.acceptor, t.incarnation, t.nonce, proof_msg)


def dialer_verifies(
    t: Transcript, welcome_msg: Any, challenge: wire.Challenge | None = None
) -> None:
    wire.verify_welcome(t.key, t.hello, challenge or t.challenge(), welcome_msg)


def flip(data: bytes, bit: int) -> bytes:
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@given(transcripts())
def test_a_correct_transcript_verifies_both_ways(t: Transcript) -> None:
    hello = wire.parse_hello(wire.unpack(wire.pack(t.hello.to_wire())))
    assert hello == t.hello
    acceptor_verifies(t, wire.unpack(wire.pack(t.proof())))  # the acceptor checks the dialer
    dialer_verifies(t, wire.unpack(wire.pack(t.welcome())))  # then the dialer the acceptor


@given(transcripts())
def test_the_challenge_proves_nothing_before_the_dialer_has(t: Transcript) -> None:
    # What a stranger who connects gets: names, incarnation, a fresh nonce; nothing
    # computed from the cookie, so nothing to test guesses against.
    msg = wire.make_challenge(t.acceptor, t.incarnation, t.nonce)
    assert set(msg) == {"t", "name", "inc", "nonce"}
    assert t.welcome()["proof"] not in wire.encode_frame(msg)


@given(transcripts())
def test_both_sides_derive_the_same_session_keys_one_per_direction(t: Transcript) -> None:
    dialer = wire.session_keys(t.key, t.hello, t.acceptor, t.incarnation, t.nonce)
    challenge = t.challenge()
    acceptor = wire.session_keys(
        t.key, t.hello, challenge.name, challenge.incarnation, challenge.nonce
    )
    assert dialer == acceptor
    assert dialer[0] != dialer[1]
    other = replace(t, nonce=bytes(32) if t.nonce != bytes(32) else b"\x01" * 32)
    assert wire.session_keys(t.key, t.hello, t.acceptor, t.incarnation, other.nonce) != dialer


@given(transcripts(), st.integers(0, 255))
def test_a_flipped_bit_in_either_proof_fails(t: Transcript, bit: int) -> None:
    welcome = t.welcome()
    with pytest.raises(wire.HandshakeError, match="acceptor's cookie proof"):
        dialer_verifies(t, {**welcome, "proof": flip(welcome["proof"], bit)})
    proof = t.proof()
    with pytest.raises(wire.HandshakeError, match="dialer's cookie proof"):
        acceptor_verifies(t, {**proof, "proof": flip(proof["proof"], bit)})


@given(transcripts(), cookies)
def test_another_cookie_fails_in_both_directions(t: Transcript, other: str) -> None:
    other_key = wire.cookie_key(other)
    assume(other_key != t.key)
    wrong = replace(t, key=other_key)
    # The acceptor has the other cookie: its proof fails at the dialer.
    with pytest.raises(wire.HandshakeError):
        dialer_verifies(t, wrong.welcome())
    # The dialer has the other cookie: its proof fails at the acceptor.
    with pytest.raises(wire.HandshakeError):
        acceptor_verifies(t, wrong.proof())


@given(transcripts(), st.sampled_from(["nonce", "incarnation", "acceptor"]), st.data())
def test_any_change_to_the_acceptor_side_of_the_transcript_fails(
    t: Transcript, field: str, data: st.DataObject
) -> None:
    challenge = t.challenge()
    if field == "nonce":
        changed = challenge._replace(nonce=data.draw(nonces))
    elif field == "incarnation":
        changed = challenge._replace(incarnation=data.draw(incarnations))
    else:
        changed = challenge._replace(name=data.draw(names))
    assume(changed != challenge)
    with pytest.raises(wire.HandshakeError):
        dialer_verifies(t, t.welcome(), changed)
    # A dialer that saw a changed challenge proves something the acceptor rejects.
    with pytest.raises(wire.HandshakeError):
        acceptor_verifies(t, wire.make_proof(t.key, t.hello, changed))


@given(
    transcripts(),
    st.sampled_from(["name", "port", "incarnation", "nonce", "expected", "encrypt"]),
    st.data(),
)
def test_any_change_to_the_hello_fails(t: Transcript, field: str, data: st.DataObject) -> None:
    strategy = {
        "name": names,
        "port": ports,
        "incarnation": incarnations,
        "nonce": nonces,
        "expected": st.none() | names,
        "encrypt": st.booleans(),
    }[field]
    changed = t.hello._replace(**{field: data.draw(strategy)})
    assume(changed != t.hello)
    with pytest.raises(wire.HandshakeError):
        dialer_verifies(replace(t, hello=changed), t.welcome())
    with pytest.raises(wire.HandshakeError):
        acceptor_verifies(replace(t, hello=changed), t.proof())


@given(transcripts())
def test_swapped_nonces_fail(t: Transcript) -> None:
    assume(t.hello.nonce != t.nonce)
    swapped = replace(t, hello=t.hello._replace(nonce=t.nonce), nonce=t.hello.nonce)
    with pytest.raises(wire.HandshakeError):
        dialer_verifies(t, swapped.welcome())
    with pytest.raises(wire.HandshakeError):
        acceptor_verifies(t, swapped.proof())


@given(transcripts())
def test_swapped_names_fail(t: Transcript) -> None:
    assume(t.hello.name != t.acceptor)
    swapped = replace(t, hello=t.hello._replace(name=t.acceptor), acceptor=t.hello.name)
    with pytest.raises(wire.HandshakeError):
        acceptor_verifies(t, swapped.proof())


@given(transcripts())
def test_the_acceptors_proof_cannot_be_reflected_as_the_dialers(t: Transcript) -> None:
    with pytest.raises(wire.HandshakeError, match="dialer's cookie proof"):
        acceptor_verifies(t, {"t": "proof", "proof": t.welcome()["proof"]})
    # Nor the other way round: a dialer's proof is no acceptor's proof.
    with pytest.raises(wire.HandshakeError, match="acceptor's cookie proof"):
        dialer_verifies(t, {"t": "welcome", "proof": t.proof()["proof"]})


@given(st.one_of(st.integers(), st.text(), st.none(), st.binary(max_size=4)))
def test_hello_with_another_version_is_reported_as_a_version_problem(version: Any) -> None:
    assume(version != wire.PROTOCOL_VERSION)
    msg = {**wire.Hello(1, "a@b", 1, b"i" * 8, b"n" * 32, None).to_wire(), "v": version}
    with pytest.raises(wire.HandshakeError, match="version"):
        wire.parse_hello(msg)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", True),  # True == 1 in Python; not a version
        ("v", float(wire.PROTOCOL_VERSION)),
        ("port", True),
        ("port", 4370.0),
        ("enc", 1),
        ("enc", None),
        ("name", "a@b\nnode up: x@y"),
        ("name", "a@\x1b[31mb"),
        ("inc", "i" * 8),
        ("nonce", [0] * 32),
    ],
)
def test_handshake_fields_are_strictly_typed(field: str, value: Any) -> None:
    msg = wire.Hello(wire.PROTOCOL_VERSION, "a@b", 1, b"i" * 8, b"n" * 32, None).to_wire()
    wire.parse_hello(wire.unpack(wire.pack(msg)))  # the unchanged message parses
    with pytest.raises(wire.HandshakeError):
        wire.parse_hello(wire.unpack(wire.pack({**msg, field: value})))


handshake_like = st.fixed_dictionaries(
    {"t": st.sampled_from(["hello", "challenge", "proof", "welcome", "reject"])},
    optional={
        "v": st.integers(0, 3) | msgpack_values,
        "name": names | msgpack_values,
        "to": names | msgpack_values,
        "port": ports | msgpack_values,
        "inc": incarnations | msgpack_values,
        "nonce": nonces | msgpack_values,
        "proof": st.binary(min_size=32, max_size=32) | msgpack_values,
        "enc": st.booleans() | msgpack_values,
        "reason": msgpack_values,
    },
)


@given(msgpack_values | handshake_like, transcripts())
def test_parsing_any_peer_message_raises_only_handshake_error(msg: Any, t: Transcript) -> None:
    parsers = [
        wire.parse_hello,
        wire.parse_challenge,
        lambda m: acceptor_verifies(t, m),
        lambda m: dialer_verifies(t, m),
    ]
    for parse in parsers:
        try:
            parse(msg)
        except wire.HandshakeError as exc:
            assert len(str(exc)) < 300  # bounded, so a peer cannot flood the log


def test_reject_reasons_are_reported_and_bounded() -> None:
    with pytest.raises(wire.HandshakeError, match="version"):
        wire.parse_challenge(wire.reject("version"))
    hello = wire.Hello(1, "a@b", 1, b"i" * 8, b"n" * 32, None)
    challenge = wire.Challenge("c@d", b"i" * 8, b"n" * 32)
    with pytest.raises(wire.HandshakeError, match="rejected") as info:
        wire.verify_welcome(b"k", hello, challenge, {"t": "reject", "reason": "x" * 5000})
    assert len(str(info.value)) < 200
    with pytest.raises(wire.HandshakeError, match="RELEASE_COOKIE"):
        wire.verify_welcome(b"k", hello, challenge, wire.reject("cookie"))


def test_the_cookie_never_appears_in_what_is_sent() -> None:
    cookie = "very-secret-cookie-value-4f3e2d1c0b"
    key = wire.cookie_key(cookie)
    hello = wire.Hello(1, "a@h", 4370, b"i" * 8, b"n" * 32, "b@h")
    challenge_msg = wire.make_challenge("b@h", b"j" * 8, b"m" * 32)
    proof_msg = wire.make_proof(key, hello, wire.parse_challenge(challenge_msg))
    welcome_msg = wire.make_welcome(key, hello, "b@h", b"j" * 8, b"m" * 32)
    messages = (hello.to_wire(), challenge_msg, proof_msg, welcome_msg)
    sent = b"".join(wire.encode_frame(m) for m in messages)
    assert cookie.encode() not in sent and key not in sent
    assert wire.cookie_fingerprint(cookie).startswith("sha256:")
    assert cookie not in wire.cookie_fingerprint(cookie)


@settings(max_examples=10, deadline=None)  # each new cookie costs one scrypt
@given(st.text(max_size=40))
def test_any_cookie_string_gives_a_key_even_with_surrogate_escapes(cookie: str) -> None:
    # RELEASE_COOKIE bytes that are not UTF-8 arrive as surrogate escapes.
    assume(cookie)
    try:
        raw = cookie.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        assume(False)  # not something os.environ can hold
    assert len(wire.cookie_key(cookie)) == 32
    assert wire.cookie_key(cookie) == wire.cookie_key(raw.decode("utf-8", "surrogateescape"))


def test_the_cookie_fingerprint_is_stable_across_versions() -> None:
    """Operators compare the logged fingerprint between nodes and releases: it must not move.
    (Protocol version 2 derives it through scrypt; the value below is that derivation's.)"""
    assert wire.cookie_fingerprint("correct horse battery staple") == "sha256:8f32b691"


@pytest.mark.parametrize("port", [0, -1, 65536, 70000, "4370", None, 4370.0])
def test_a_hello_with_a_port_out_of_range_or_not_an_int_is_refused(port: Any) -> None:
    hello = wire.Hello(wire.PROTOCOL_VERSION, "hi@10.0.0.2", 4370, b"i" * 8, b"n" * 32, None)
    msg = {**hello.to_wire(), "port": port}
    with pytest.raises(wire.HandshakeError, match="malformed port"):
        wire.parse_hello(msg)
    for edge in (1, 65535):
        assert wire.parse_hello({**msg, "port": edge}).port == edge
