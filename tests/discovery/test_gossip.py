"""Gossip: authenticated multicast beacons, on loopback and between network namespaces."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from shoal.admission import MAX_LEARNED_PEERS
from shoal.config import Peer, Settings
from shoal.discovery import strategy_for
from shoal.discovery.gossip import (
    MAX_DATAGRAM,
    NONCE_CACHE_SIZE,
    RECENT_INTERVALS,
    Beacon,
    BeaconError,
    GossipStrategy,
    decode_beacon,
    encode_beacon,
    gossip_key,
    open_multicast_socket,
)
from tests.discovery.conftest import Rounds
from tests.support.netns import Network, requires_netns
from tests.support.procs import async_wait_until, wait_until

GROUP = "233.252.1.32"
COOKIE = "discovery-test-cookie-6b1f0e3a9c2d4e87"
KEY = gossip_key(COOKIE)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings(host: str, gossip_port: int, **overrides: object) -> Settings:
    return Settings(
        cookie="discovery-test-cookie-6b1f0e3a9c2d4e87",
        basename="hi",
        name_query="hi",
        host=host,
        topology="gossip",
        gossip_addr=GROUP,
        gossip_port=gossip_port,
        gossip_interval=0.1,
    ).with_overrides(**overrides)


def beacon(**changes: object) -> Beacon:
    fields: dict[str, object] = dict(
        basename="hi", host="127.0.0.9", port=4370, timestamp=time.time(), nonce=b"n" * 16
    )
    fields.update(changes)
    return Beacon(**fields)  # type: ignore[arg-type]


# -- the beacon format ------------------------------------------------------------


def test_beacon_round_trip_and_the_cookie_never_travels() -> None:
    data = encode_beacon(KEY, beacon())
    assert decode_beacon(KEY, data) == beacon(timestamp=decode_beacon(KEY, data).timestamp)
    assert COOKIE.encode() not in data and KEY not in data
    assert len(data) < 200


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: encode_beacon(gossip_key("wrong"), beacon()), "bad-hmac"),
        (lambda: encode_beacon(KEY, beacon())[:-1] + b"\x00", "bad-hmac"),
        (lambda: b"garbage" * 10, "malformed"),
        (lambda: b"", "malformed"),
        (lambda: encode_beacon(KEY, beacon()) + b"x" * MAX_DATAGRAM, "oversized"),
        (lambda: encode_beacon(KEY, beacon(timestamp=time.time() - 31)), "stale"),
        (lambda: encode_beacon(KEY, beacon(timestamp=time.time() + 31)), "stale"),
        (lambda: encode_beacon(KEY, beacon(host="not-an-ip")), "malformed"),
        (lambda: encode_beacon(KEY, beacon(port=0)), "malformed"),
        (lambda: encode_beacon(KEY, beacon(nonce=b"short")), "malformed"),
        (lambda: encode_beacon(KEY, beacon(basename="a@b")), "malformed"),
    ],
)
def test_bad_datagrams_are_rejected(make: Callable[[], bytes], kind: str) -> None:
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, make())
    assert raised.value.kind == kind


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({"port": 1}, True),
        ({"port": 65535}, True),
        ({"port": 65536}, False),
        ({"basename": "h"}, True),
        ({"basename": "h" * 64}, True),
        ({"basename": "h" * 65}, False),
        ({"basename": ""}, False),
        ({"basename": "h i"}, False),
        ({"basename": "hi\x07"}, False),
    ],
    # Plain ids: an escaped one (the control character's) does not survive as a test id
    # on a command line, which is how scripts/mutation's mutmut selects tests.
    ids=[
        "port-1",
        "port-65535",
        "port-65536",
        "basename-1-char",
        "basename-64-chars",
        "basename-65-chars",
        "basename-empty",
        "basename-with-space",
        "basename-with-control-char",
    ],
)
def test_beacon_field_bounds(changes: dict[str, object], accepted: bool) -> None:
    data = encode_beacon(KEY, beacon(**changes))
    if accepted:
        assert decode_beacon(KEY, data).port == beacon(**changes).port
    else:
        with pytest.raises(BeaconError) as raised:
            decode_beacon(KEY, data)
        assert raised.value.kind == "malformed"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(-30.0, True), (30.0, True), (-30.5, False), (30.5, False)],
    ids=["30s-behind", "30s-ahead", "30.5s-behind", "30.5s-ahead"],
)
def test_a_beacon_exactly_max_skew_off_our_clock_is_still_fresh(
    offset: float, accepted: bool
) -> None:
    """MAX_SKEW (30 s) is tolerated, a beacon further off is stale (values exact in binary)."""
    now = 1_700_000_000.0
    data = encode_beacon(KEY, beacon(timestamp=now + offset))
    if accepted:
        assert decode_beacon(KEY, data, now=now).timestamp == now + offset
    else:
        with pytest.raises(BeaconError) as raised:
            decode_beacon(KEY, data, now=now)
        assert raised.value.kind == "stale"


def test_datagram_size_bounds() -> None:
    """The limit itself is allowed; a bare header (no payload) is no beacon."""
    at_limit = b"SHG1" + b"t" * (MAX_DATAGRAM - 4)
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, at_limit)
    assert raised.value.kind == "bad-hmac"  # read as far as the tag, not refused for size
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, at_limit + b"t")
    assert raised.value.kind == "oversized"
    header_only = b"SHG1" + b"t" * 32
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, header_only)
    assert raised.value.kind == "malformed"


def test_an_authenticated_undecodable_payload_is_malformed() -> None:
    payload = b"\xc1"  # a byte msgpack never uses
    data = b"SHG1" + hmac.new(KEY, b"SHG1" + payload, hashlib.sha256).digest() + payload
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, data)
    assert raised.value.kind == "malformed"


def test_authenticated_but_wrongly_shaped_payload_is_rejected() -> None:
    import msgpack

    payload = msgpack.packb({"not": "a list"})
    data = b"SHG1" + hmac.new(KEY, b"SHG1" + payload, hashlib.sha256).digest() + payload
    with pytest.raises(BeaconError) as raised:
        decode_beacon(KEY, data)
    assert (raised.value.kind, str(raised.value)) == ("malformed", "unexpected payload fields")


def test_replays_and_own_beacons_are_ignored() -> None:
    strategy = GossipStrategy(settings("127.0.0.2", 45000))
    addr = ("127.0.0.9", 45000)
    data = encode_beacon(KEY, beacon(nonce=b"1" * 16))
    strategy.receive(data, addr)
    assert strategy._recent_peers() == [Peer("hi", "127.0.0.9", 4370)]
    strategy.receive(data, addr)
    assert strategy.dropped == {"replay": 1}
    own = encode_beacon(KEY, beacon(host="127.0.0.2", nonce=b"2" * 16))
    strategy.receive(own, ("127.0.0.2", 45000))
    assert strategy._recent_peers() == [Peer("hi", "127.0.0.9", 4370)]
    other_service = encode_beacon(KEY, beacon(basename="krillin", host="127.0.0.8"))
    strategy.receive(other_service, ("127.0.0.8", 45000))
    assert strategy._recent_peers() == [Peer("hi", "127.0.0.9", 4370)]


def test_peers_heard_are_capped_but_those_known_are_still_heard() -> None:
    strategy = GossipStrategy(settings("127.0.0.2", 45000))
    hosts = [str(ipaddress.ip_address("127.1.0.1") + i) for i in range(MAX_LEARNED_PEERS + 1)]
    for i, host in enumerate(hosts):
        strategy.receive(encode_beacon(KEY, beacon(host=host, nonce=b"%16d" % i)), (host, 1))
    assert len(strategy._recent_peers()) == MAX_LEARNED_PEERS
    assert strategy.dropped == {"too-many": 1}
    assert Peer("hi", hosts[-1], 4370) not in strategy._recent_peers()
    again = encode_beacon(KEY, beacon(host=hosts[0], nonce=b"again-0123456789"))
    strategy.receive(again, (hosts[0], 1))  # a peer already heard is heard again
    assert strategy.dropped == {"too-many": 1}


def test_the_replay_cache_is_bounded_under_a_flood() -> None:
    """A flood of fresh beacons must not grow memory without bound (and, once it is
    over, its nonces are forgotten only as the cache needs room)."""
    strategy = GossipStrategy(settings("127.0.0.2", 45000))
    for i in range(NONCE_CACHE_SIZE + 50):
        strategy.receive(encode_beacon(KEY, beacon(nonce=b"%16d" % i)), ("127.0.0.9", 1))
    assert len(strategy._nonces) <= NONCE_CACHE_SIZE
    assert strategy.dropped == {}


def test_selected_by_topology_type_and_local_alias() -> None:
    assert isinstance(strategy_for(settings("127.0.0.2", 45000)), GossipStrategy)
    s = Settings.from_env(
        {
            "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
            "TOPOLOGY_TYPE": "local",
            "NODE_HOST": "127.0.0.2",
        }
    )
    assert isinstance(strategy_for(s), GossipStrategy)


# -- on loopback (127.0.0.x aliases, no root, no setup) ---------------------------


class Node:
    def __init__(self, strategy: GossipStrategy) -> None:
        self.strategy = strategy
        self.rounds = Rounds()
        self.started = time.monotonic()
        self.first_round_at: float | None = None
        self.task = asyncio.create_task(strategy.run(self._propose))

    def _propose(self, peers: object) -> None:
        if self.first_round_at is None:
            self.first_round_at = time.monotonic()
        self.rounds(peers)  # type: ignore[arg-type]


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[[Settings], Node]]:
    started: list[Node] = []

    def start(s: Settings) -> Node:
        node = Node(GossipStrategy(s))
        started.append(node)
        return node

    yield start
    for node in started:
        node.task.cancel()
    await asyncio.gather(*(n.task for n in started), return_exceptions=True)


def multicast_on_loopback_works(port: int) -> bool:
    """Whether this kernel delivers multicast between 127.0.0.x sockets (Linux: yes).

    Asked with plain sockets, not `open_multicast_socket`: a bug there must fail the
    tests below, not skip them."""

    def joined(host: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((GROUP, port))
        membership = socket.inet_aton(GROUP) + socket.inet_aton(host)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(host))
        return sock

    try:
        a, b = joined("127.0.0.2"), joined("127.0.0.3")
    except OSError:
        return False
    with a, b:
        b.settimeout(1)
        a.sendto(b"probe", (GROUP, port))
        try:
            return b.recv(100) == b"probe"
        except OSError:
            return False


async def test_two_nodes_on_loopback_hear_each_other(
    nodes: Callable[[Settings], Node],
) -> None:
    port = free_udp_port()
    if not multicast_on_loopback_works(port):
        pytest.skip("this kernel does not deliver multicast over lo between 127.0.0.x sockets")
    a = nodes(settings("127.0.0.2", port))
    b = nodes(settings("127.0.0.3", port))
    krillin = nodes(settings("127.0.0.4", port, basename="krillin", name_query="krillin"))
    await async_wait_until(
        lambda: (
            Peer("hi", "127.0.0.3", 4370) in a.rounds.last
            and Peer("hi", "127.0.0.2", 4370) in b.rounds.last
        ),
        timeout=5,
        message="a and b hear each other",
    )
    # The first round comes after one beacon interval, when the others could be heard.
    assert a.first_round_at is not None and a.first_round_at - a.started >= 0.09
    assert a.rounds.seen == {Peer("hi", "127.0.0.3", 4370)}
    assert krillin.rounds.seen == set(), "other services' beacons are not proposed"


async def test_wrong_cookie_and_garbage_are_ignored_on_the_wire(
    nodes: Callable[[Settings], Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.discovery.gossip")
    port = free_udp_port()
    if not multicast_on_loopback_works(port):
        pytest.skip("this kernel does not deliver multicast over lo between 127.0.0.x sockets")
    a = nodes(settings("127.0.0.2", port))
    intruder = nodes(settings("127.0.0.5", port, cookie="wrong-cookie-0f9e8d7c6b5a49382716"))
    await async_wait_until(lambda: a.rounds.rounds, timeout=5, message="a listens")
    with open_multicast_socket(GROUP, port, "127.0.0.6", 1) as raw:
        raw.sendto(b"\x00garbage", (GROUP, port))
        raw.sendto(encode_beacon(KEY, beacon(host="127.0.0.6", timestamp=0.0)), (GROUP, port))
        replayed = encode_beacon(KEY, beacon(host="127.0.0.7", nonce=b"r" * 16))
        raw.sendto(replayed, (GROUP, port))
        await async_wait_until(
            lambda: Peer("hi", "127.0.0.7", 4370) in a.rounds.seen, 5, message="fresh beacon"
        )
        raw.sendto(replayed, (GROUP, port))
        await async_wait_until(
            lambda: {"bad-hmac", "malformed", "stale", "replay"} <= set(a.strategy.dropped),
            timeout=5,
            message=f"all bad datagrams dropped (so far {a.strategy.dropped})",
        )
    assert Peer("hi", "127.0.0.5", 4370) not in a.rounds.seen
    assert Peer("hi", "127.0.0.6", 4370) not in a.rounds.seen
    assert "bad-hmac" in intruder.strategy.dropped  # it cannot read ours either
    # The operator learns where the wrong-cookie beacons come from.
    assert any("dropping beacons from 127.0.0.5" in r.getMessage() for r in caplog.records)
    assert intruder.rounds.seen == set()


# -- between hosts (network namespaces on a bridge; root only) --------------------

GOSSIP_NODE = textwrap.dedent(
    """
    import asyncio, json, sys
    from shoal.config import Settings
    from shoal.discovery.gossip import GossipStrategy

    def propose(peers):
        print(json.dumps(sorted(p.name for p in peers)), flush=True)

    settings = Settings.from_env(gossip_interval=0.2)
    asyncio.run(asyncio.wait_for(GossipStrategy(settings).run(propose), timeout=30))
    """
)


@pytest.mark.netns
@requires_netns
def test_gossip_between_network_namespaces(tmp_path: Path) -> None:
    with Network(3) as net:
        logs = {}
        for host in net.hosts:
            logs[host] = tmp_path / f"{host.name}.log"
            env = {
                "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
                "NODE_HOST": host.address,
                "TOPOLOGY_TYPE": "gossip",
            }
            if host.index == 2:
                env["RELEASE_COOKIE"] = "wrong-cookie-0f9e8d7c6b5a49382716"
            with open(logs[host], "wb") as out:
                host.popen(
                    [sys.executable, "-c", GOSSIP_NODE],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        a, b, c = net.hosts

        def last_round(host: object) -> list[str]:
            lines = [ln for ln in logs[host].read_text().splitlines() if ln.startswith("[")]
            return json.loads(lines[-1]) if lines else []

        wait_until(
            lambda: last_round(a) == [f"hi@{b.address}"] and last_round(b) == [f"hi@{a.address}"],
            timeout=10,
            message="a and b hear each other across the bridge",
        )
        assert f"hi@{c.address}" not in logs[a].read_text(), "a wrong cookie is never proposed"
        assert last_round(c) == []


# -- what a node does with what it hears, and when it speaks ------------------------


def test_a_wrong_cookie_beacon_warns_naming_the_sender_but_garbage_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong cookie is an operator's mistake worth a warning; random bytes on the port are
    noise, counted but not worth one (a port scan must not fill the log)."""
    strategy = GossipStrategy(settings("127.0.0.2", 45000))
    caplog.set_level(logging.DEBUG, logger="shoal.discovery.gossip")
    strategy.receive(b"\x00garbage", ("127.0.0.8", 45000))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    strategy.receive(encode_beacon(gossip_key("wrong"), beacon()), ("127.0.0.9", 45000))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # The whole line the operator reads: who sends, and the likely cause.
    assert warned == [
        "gossip: dropping beacons from 127.0.0.9: authentication failed (wrong cookie?)"
        " (1 dropped so far)"
    ]
    assert strategy.dropped == {"malformed": 1, "bad-hmac": 1}


def _beacons_from(listener: socket.socket, host: str) -> int:
    """How many of `host`'s beacons wait in `listener` (read without blocking)."""
    count = 0
    while True:
        try:
            data = listener.recv(MAX_DATAGRAM + 1)
        except BlockingIOError:
            return count
        if decode_beacon(KEY, data).host == host:
            count += 1


async def test_a_lone_node_finds_itself_alone_only_after_three_beacons() -> None:
    """A late beacon must not make a new node think it is alone (and claim singletons the
    cluster already runs): the first empty round comes after RECENT_INTERVALS beacons."""
    port = free_udp_port()
    if not multicast_on_loopback_works(port):
        pytest.skip("this kernel does not deliver multicast over lo between 127.0.0.x sockets")
    rounds: list[tuple[list[Peer], int]] = []  # (proposed, our beacons sent by then)
    with open_multicast_socket(GROUP, port, "127.0.0.6", 1) as listener:
        sent = 0

        def propose(peers: Iterable[Peer]) -> None:
            nonlocal sent
            sent += _beacons_from(listener, "127.0.0.2")
            rounds.append((list(peers), sent))

        lone = GossipStrategy(settings("127.0.0.2", port, gossip_interval=0.05))
        task = asyncio.create_task(lone.run(propose))
        try:
            await async_wait_until(lambda: rounds, timeout=5, message="a first round")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert rounds[0] == ([], RECENT_INTERVALS)


async def test_a_stopped_strategy_stops_listening_and_can_run_again(
    nodes: Callable[[Settings], Node],
) -> None:
    port = free_udp_port()
    if not multicast_on_loopback_works(port):
        pytest.skip("this kernel does not deliver multicast over lo between 127.0.0.x sockets")
    first = nodes(settings("127.0.0.2", port))
    other = nodes(settings("127.0.0.3", port))
    heard = Peer("hi", "127.0.0.3", 4370)
    await async_wait_until(lambda: heard in first.rounds.seen, timeout=5, message="first hears")
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
    with open_multicast_socket(GROUP, port, "127.0.0.6", 1) as raw:
        raw.sendto(encode_beacon(gossip_key("wrong"), beacon()), (GROUP, port))
        # `other` hears it, so it went out; the stopped strategy must not have.
        await async_wait_until(lambda: "bad-hmac" in other.strategy.dropped, 5, message="sent")
    assert "bad-hmac" not in first.strategy.dropped, "a stopped strategy still listens"
    again = Node(first.strategy)  # the same strategy, started again (a node restart)
    try:
        await async_wait_until(lambda: heard in again.rounds.seen, 5, message="heard again")
    finally:
        again.task.cancel()
        await asyncio.gather(again.task, return_exceptions=True)


async def test_a_peer_not_heard_for_three_intervals_is_no_longer_proposed(
    nodes: Callable[[Settings], Node],
) -> None:
    port = free_udp_port()
    if not multicast_on_loopback_works(port):
        pytest.skip("this kernel does not deliver multicast over lo between 127.0.0.x sockets")
    a = nodes(settings("127.0.0.2", port, gossip_interval=0.05))
    once = encode_beacon(KEY, beacon(host="127.0.0.9"))
    a.strategy.receive(once, ("127.0.0.9", port))  # heard once, then never again
    gone = Peer("hi", "127.0.0.9", 4370)
    await async_wait_until(lambda: gone in a.rounds.last, timeout=5, message="proposed")
    await async_wait_until(lambda: gone not in a.rounds.last, timeout=5, message="forgotten")


async def test_a_socket_that_cannot_join_warns_and_rounds_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NODE_HOST names no interface here: joining fails, the node says so, and discovery
    keeps running rounds (proposing nobody) instead of ending."""
    caplog.set_level(logging.WARNING, logger="shoal.discovery.gossip")
    rounds = Rounds()
    strategy = GossipStrategy(settings("10.123.45.67", free_udp_port(), gossip_interval=0.02))
    task = asyncio.create_task(strategy.run(rounds))
    try:
        await async_wait_until(lambda: len(rounds.rounds) >= 2, timeout=5, message="rounds")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert rounds.seen == set()
    assert any("cannot join" in r.getMessage() for r in caplog.records)


async def test_a_gossip_port_another_program_holds_warns_that_it_is_in_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A program bound to the gossip port without sharing it keeps the node out: the warning
    gives that cause, and rounds go on."""
    caplog.set_level(logging.WARNING, logger="shoal.discovery.gossip")
    port = free_udp_port()
    rounds = Rounds()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("", port))  # no SO_REUSEADDR: not shared
        strategy = GossipStrategy(settings("127.0.0.2", port, gossip_interval=0.02))
        task = asyncio.create_task(strategy.run(rounds))
        try:
            await async_wait_until(lambda: len(rounds.rounds) >= 2, timeout=5, message="rounds")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        f"gossip: cannot join {GROUP}:{port} on 127.0.0.2: [Errno {errno.EADDRINUSE}] "
        f"{os.strerror(errno.EADDRINUSE)}"
    ]
