"""Gossip discovery: authenticated UDP multicast beacons (libcluster's `Gossip`).

Every `gossip_interval` each node multicasts a beacon `[basename, host, mesh
port, timestamp, nonce]` (msgpack) to `SHOAL_GOSSIP_ADDR:SHOAL_GOSSIP_PORT`
with TTL 1, so beacons stay on the local segment (a docker network, a VPC
subnet does not carry multicast). Each beacon carries an HMAC-SHA256 tag under
a key derived from the cookie; the cookie itself never travels. Beacons that
fail the tag, are malformed, oversized, too old or from the future, or replayed
are dropped before anything in them is believed.

Datagram layout: `b"SHG1"` + 32-byte tag + msgpack payload, where
`tag = HMAC-SHA256(key, b"SHG1" + payload)` and
`key = scrypt(cookie)` (`shoal.crypto.stretch`: slow, so a captured beacon
does not help guess the cookie).

Several nodes on one machine (loopback aliases 127.0.0.x, or containers
sharing a host network) share the group: the socket is bound with
SO_REUSEADDR/SO_REUSEPORT to the group address, joins the group on the
interface that owns `settings.host`, and sends through that interface with
multicast loop on. Linux delivers multicast over `lo` without any setup (it
needs neither the MULTICAST flag on `lo` nor a multicast route, because the
outgoing interface is chosen explicitly with IP_MULTICAST_IF).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]

from shoal import crypto
from shoal.admission import MAX_LEARNED_PEERS, learned_address_allowed
from shoal.config import Peer, Settings
from shoal.discovery.base import Propose
from shoal.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

MAGIC = b"SHG1"
TAG_SIZE = 32
NONCE_SIZE = 16
# A beacon is ~80 bytes; anything above this is not ours.
MAX_DATAGRAM = 1024
# Clock skew tolerated between nodes; older/newer beacons could be replays.
MAX_SKEW = 30.0
# Replay cache: a nonce is remembered while its beacon could still pass the
# timestamp check (2 * MAX_SKEW), bounded so a flood cannot exhaust memory.
NONCE_CACHE_SIZE = 8192
# A peer is proposed while we heard it within this many beacon intervals, so a
# beacon lost or delayed past a round boundary does not drop it from a round.
RECENT_INTERVALS = 3


def gossip_key(cookie: str) -> bytes:
    """The beacon key: derived from the cookie so the cookie is never used directly."""
    return crypto.stretch(cookie, b"gossip")


@dataclass(frozen=True)
class Beacon:
    basename: str
    host: str
    port: int
    timestamp: float
    nonce: bytes


class BeaconError(ValueError):
    """A datagram that is not a valid beacon; `kind` says why (for logs and tests)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encode_beacon(key: bytes, beacon: Beacon) -> bytes:
    """Serialize and authenticate one beacon."""
    payload: bytes = msgpack.packb(
        [beacon.basename, beacon.host, beacon.port, beacon.timestamp, beacon.nonce],
        use_bin_type=True,
    )
    tag = hmac.new(key, MAGIC + payload, hashlib.sha256).digest()
    return MAGIC + tag + payload


def decode_beacon(key: bytes, data: bytes, now: float | None = None) -> Beacon:
    """Check and parse one datagram; raises `BeaconError` for anything not a fresh beacon.

    The tag is checked (constant time) before the payload is parsed, so
    unauthenticated bytes never reach the msgpack decoder.
    """
    if len(data) > MAX_DATAGRAM:
        raise BeaconError("oversized", f"{len(data)} bytes (limit {MAX_DATAGRAM})")
    if len(data) <= len(MAGIC) + TAG_SIZE or not data.startswith(MAGIC):
        raise BeaconError("malformed", "not a shoal beacon")
    tag = data[len(MAGIC) : len(MAGIC) + TAG_SIZE]
    payload = data[len(MAGIC) + TAG_SIZE :]
    expected = hmac.new(key, MAGIC + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        raise BeaconError("bad-hmac", "authentication failed (wrong cookie?)")
    try:
        # The datagram is at most MAX_DATAGRAM bytes, which bounds what this can allocate.
        fields: Any = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise BeaconError("malformed", f"undecodable payload: {exc}") from None
    if not (
        isinstance(fields, list)
        and len(fields) == 5
        and isinstance(fields[0], str)
        and isinstance(fields[1], str)
        and isinstance(fields[2], int)
        and not isinstance(fields[2], bool)
        and isinstance(fields[3], float | int)
        and isinstance(fields[4], bytes)
        and len(fields[4]) == NONCE_SIZE
        and 0 < fields[2] < 65536
        and 0 < len(fields[0]) <= 64
        and "@" not in fields[0]
        and fields[0].isprintable()
        and not any(c.isspace() for c in fields[0])
    ):
        raise BeaconError("malformed", "unexpected payload fields")
    try:
        host = str(ipaddress.ip_address(fields[1]))
    except ValueError:
        raise BeaconError("malformed", f"host {fields[1]!r} is not an IP address") from None
    beacon = Beacon(fields[0], host, fields[2], float(fields[3]), fields[4])
    now = time.time() if now is None else now
    if abs(beacon.timestamp - now) > MAX_SKEW:
        raise BeaconError("stale", f"timestamp {beacon.timestamp - now:+.1f} s off our clock")
    return beacon


class GossipStrategy:
    """Multicast our beacon, listen for others', propose those named `name_query`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key = gossip_key(settings.cookie)
        self._nonces: OrderedDict[bytes, float] = OrderedDict()
        self._heard: dict[Peer, float] = {}
        self._problems = RateLimitedLog(log)
        self._drops = RateLimitedLog(log, streak=False)
        self._transport: asyncio.DatagramTransport | None = None
        self.dropped: dict[str, int] = {}

    async def run(self, propose: Propose) -> None:
        interval = self.settings.gossip_interval
        try:
            next_round = time.monotonic()
            rounds = 0
            while True:
                if self._transport is None or self._transport.is_closing():
                    await self._open()
                self._send_beacon()
                next_round = max(next_round + interval, time.monotonic())
                await asyncio.sleep(next_round - time.monotonic())
                peers = self._recent_peers()
                rounds += 1
                # "Alone" is only a finding after a full horizon of beacons: a peer
                # whose beacon is late (a busy host) must not make a new node think it
                # is alone, become ready and claim singletons the cluster already runs.
                if peers or rounds >= RECENT_INTERVALS:
                    propose(peers)
        finally:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    async def _open(self) -> None:
        try:
            sock = open_multicast_socket(
                self.settings.gossip_addr,
                self.settings.gossip_port,
                self.settings.host,
                self.settings.gossip_ttl,
            )
        except OSError as exc:
            self._problems.problem(
                "socket",
                "gossip: cannot join %s:%d on %s: %s",
                self.settings.gossip_addr,
                self.settings.gossip_port,
                self.settings.host,
                exc,
            )
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _BeaconProtocol(self), sock=sock)
        self._transport = transport

    def _send_beacon(self) -> None:
        if self._transport is None:
            return
        beacon = Beacon(
            self.settings.basename,
            self.settings.host,
            self.settings.listen_port,
            time.time(),
            os.urandom(NONCE_SIZE),
        )
        try:
            self._transport.sendto(
                encode_beacon(self._key, beacon),
                (self.settings.gossip_addr, self.settings.gossip_port),
            )
        except OSError as exc:
            self._problems.problem("send", "gossip: sending a beacon failed: %s", exc)
        else:
            self._problems.recovered("gossip: beacons are sent again")

    def receive(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        """Handle one datagram (public so tests can feed crafted ones)."""
        try:
            beacon = decode_beacon(self._key, data)
        except BeaconError as exc:
            self._drop(exc.kind, addr, str(exc))
            return
        own_port = self.settings.listen_port
        if beacon.host == _normalize(self.settings.host) and beacon.port == own_port:
            return  # our own beacon, looped back
        if not self._fresh_nonce(beacon):
            self._drop("replay", addr, "nonce seen before")
            return
        if beacon.basename != self.settings.name_query:
            log.debug(
                "gossip: ignoring %s@%s (not %s)",
                beacon.basename,
                beacon.host,
                self.settings.name_query,
            )
            return
        if beacon.port not in self.settings.ports or not learned_address_allowed(
            beacon.host, self.settings.host
        ):
            # Dial policy (shoal.admission): our mesh ports only, no loopback etc.
            self._drop("policy", addr, f"will not dial {beacon.host}:{beacon.port}")
            return
        peer = self.settings.peer(beacon.basename, beacon.host, beacon.port)
        if peer not in self._heard and len(self._heard) >= MAX_LEARNED_PEERS:
            self._drop("too-many", addr, f"already {len(self._heard)} peers heard")
            return
        self._heard[peer] = time.monotonic()

    def _fresh_nonce(self, beacon: Beacon) -> bool:
        now = time.monotonic()
        while self._nonces:
            oldest, expires = next(iter(self._nonces.items()))
            if expires > now and len(self._nonces) < NONCE_CACHE_SIZE:
                break
            del self._nonces[oldest]
        if beacon.nonce in self._nonces:
            return False
        self._nonces[beacon.nonce] = now + 2 * MAX_SKEW
        return True

    def _drop(self, kind: str, addr: tuple[str | Any, ...], why: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        log.debug("gossip: dropped a datagram from %s: %s: %s", addr[0], kind, why)
        if kind != "malformed":  # someone with a beacon format but wrong key or replaying
            self._drops.problem(
                kind,
                "gossip: dropping beacons from %s: %s (%d dropped so far)",
                addr[0],
                why,
                self.dropped[kind],
            )

    def _recent_peers(self) -> list[Peer]:
        horizon = time.monotonic() - RECENT_INTERVALS * self.settings.gossip_interval
        for peer in [p for p, seen in self._heard.items() if seen < horizon]:
            del self._heard[peer]
        return sorted(self._heard, key=lambda p: (p.host, p.port))


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, strategy: GossipStrategy) -> None:
        self._strategy = strategy

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self._strategy.receive(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip: socket error: %s", exc)


def open_multicast_socket(group: str, port: int, host: str, ttl: int) -> socket.socket:
    """A non-blocking UDP socket joined to `group` on the interface that owns `host`.

    Bound to the group address (Linux: receive only this group's datagrams, not
    every multicast the host has joined on that port); falls back to the
    wildcard address where binding to a group is not allowed.
    """
    interface = _interface_address(host)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((group, port))
        except OSError:
            sock.bind(("", port))
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        # Other nodes on this machine (loopback aliases, host networking) must hear us.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _interface_address(host: str) -> str:
    """The IPv4 address naming the interface to use; any interface when host is not one."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    if address.version != 4 or address.is_unspecified:
        return "0.0.0.0"
    return str(address)


def _normalize(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host
