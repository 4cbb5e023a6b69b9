"""DNS polling against a real DNS server on loopback whose records the test changes."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.resolver
import pytest

from shoal.config import Peer, Settings
from shoal.discovery import strategy_for
from shoal.discovery.dns import (
    DNSLookupError,
    DNSPollStrategy,
    _make_resolver,
    _parse_server,
    lookup_all_ips,
)
from tests.discovery.conftest import Rounds
from tests.support.dns_server import LocalDNSServer
from tests.support.procs import async_wait_until

NAME = "hi.service.local"


def settings(dns: LocalDNSServer, **overrides: object) -> Settings:
    return Settings(
        cookie="discovery-test-cookie-6b1f0e3a9c2d4e87",
        basename="hi",
        name_query="hi",
        host="127.0.0.2",
        port=4370,
        topology="dns",
        discovery_endpoint=NAME,
        polling_interval=0.05,
        dns_server=dns.address,
    ).with_overrides(**overrides)


def peers(*ips: str) -> list[Peer]:
    return [Peer("hi", ip, 4370) for ip in ips]


class Running:
    def __init__(self, strategy: DNSPollStrategy) -> None:
        self.rounds = Rounds()
        self.task = asyncio.create_task(strategy.run(self.rounds))

    async def next_rounds(self, n: int = 2, timeout: float = 5) -> list[list[Peer]]:
        """The rounds completed after now (at least `n` of them)."""
        start = len(self.rounds.rounds)
        await async_wait_until(
            lambda: len(self.rounds.rounds) >= start + n, timeout, message=f"{n} DNS rounds"
        )
        assert not self.task.done(), "the polling loop must never end on its own"
        return self.rounds.rounds[start:]


@pytest.fixture
async def poll(dns_server: LocalDNSServer) -> AsyncIterator[Running]:
    running = Running(DNSPollStrategy(settings(dns_server), lifetime=0.3))
    try:
        yield running
    finally:
        running.task.cancel()
        await asyncio.gather(running.task, return_exceptions=True)


async def test_records_appear_then_change(dns_server: LocalDNSServer, poll: Running) -> None:
    assert (await poll.next_rounds(1))[-1] == []  # NXDOMAIN: a round, no peers
    dns_server.set_records(NAME, ["127.0.0.3", "127.0.0.2", "127.0.0.4"])
    await async_wait_until(lambda: poll.rounds.last == peers("127.0.0.3", "127.0.0.4"), 5)
    dns_server.set_records(NAME, ["127.0.0.4", "127.0.0.5"])
    await async_wait_until(lambda: poll.rounds.last == peers("127.0.0.4", "127.0.0.5"), 5)
    assert dns_server.query_count(NAME) >= 6  # really asked over the network, every round


async def test_aaaa_records_are_proposed(dns_server: LocalDNSServer, poll: Running) -> None:
    dns_server.set_records(NAME, ["::1", "fd00::7", "127.0.0.9"])
    await async_wait_until(
        lambda: poll.rounds.last == peers("127.0.0.9", "::1", "fd00::7"), 5, message="AAAA"
    )


@pytest.mark.parametrize("silent", ["AAAA", "A"])
async def test_a_type_that_is_never_answered_keeps_the_other(
    dns_server: LocalDNSServer, poll: Running, silent: str
) -> None:
    # A nameserver that drops AAAA queries (or A) must not disable discovery.
    dns_server.set_records(NAME, ["127.0.0.9", "fd00::7"])
    dns_server.silent_types.add(silent)
    expected = peers("fd00::7") if silent == "A" else peers("127.0.0.9")
    rounds = await poll.next_rounds(3)
    assert rounds[-1] == expected, rounds
    assert dns_server.query_count() > dns_server.query_count(NAME)  # some were dropped


@pytest.mark.parametrize("mode", ["servfail", "nxdomain", "timeout"])
async def test_failures_propose_nothing_and_polling_goes_on(
    dns_server: LocalDNSServer, poll: Running, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.set_records(NAME, ["127.0.0.3"])
    await async_wait_until(lambda: poll.rounds.last == peers("127.0.0.3"), 5)
    caplog.set_level(logging.DEBUG, logger="shoal.discovery.dns")
    dns_server.set_mode(mode)  # type: ignore[arg-type]
    failed = await poll.next_rounds(4, timeout=10)
    assert failed[-3:] == [[], [], []]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a lasting outage warns once, not every round"
    assert {"servfail": "SERVFAIL", "nxdomain": "NXDOMAIN", "timeout": "within"}[mode] in (
        warnings[0].getMessage()
    )
    dns_server.set_mode("ok")
    await async_wait_until(lambda: poll.rounds.last == peers("127.0.0.3"), 5, message="recovery")
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_timeout_round_is_bounded_by_the_lifetime(dns_server: LocalDNSServer) -> None:
    dns_server.set_mode("timeout")
    strategy = DNSPollStrategy(settings(dns_server), lifetime=0.3)
    start = time.monotonic()
    assert await strategy.poll() == []
    assert time.monotonic() - start < 2


async def test_unreachable_nameserver_is_a_failed_round() -> None:
    with LocalDNSServer() as dns:
        s = settings(dns)
    # The server is gone: nothing listens on that port any more.
    assert await DNSPollStrategy(s, lifetime=0.3).poll() == []


async def test_name_query_sets_the_basename_of_proposed_peers(dns_server: LocalDNSServer) -> None:
    dns_server.set_records(NAME, ["127.0.0.3"])
    s = settings(dns_server, basename="vegeta", name_query="vegeta")
    assert await DNSPollStrategy(s).poll() == [Peer("vegeta", "127.0.0.3", 4370)]


async def test_lookup_all_ips(dns_server: LocalDNSServer) -> None:
    dns_server.set_records(NAME, ["127.0.0.3", "::1", "127.0.0.2", "127.0.0.3"])
    assert await lookup_all_ips(NAME, dns_server.address) == ["127.0.0.2", "127.0.0.3", "::1"]
    assert await lookup_all_ips(NAME, dns_server.address_text) == [
        "127.0.0.2",
        "127.0.0.3",
        "::1",
    ]
    dns_server.set_records("empty.local", [])
    assert await lookup_all_ips("empty.local", dns_server.address) == []


@pytest.mark.parametrize(
    ("mode", "kind"), [("servfail", "servfail"), ("nxdomain", "nxdomain"), ("timeout", "timeout")]
)
async def test_lookup_all_ips_errors(dns_server: LocalDNSServer, mode: str, kind: str) -> None:
    dns_server.set_records(NAME, ["127.0.0.3"])
    dns_server.set_mode(mode)  # type: ignore[arg-type]
    with pytest.raises(DNSLookupError) as raised:
        await lookup_all_ips(NAME, dns_server.address, lifetime=0.3)
    assert raised.value.kind == kind


async def test_tcp_listener_answers_too(dns_server: LocalDNSServer) -> None:
    import dns.asyncquery
    import dns.message

    dns_server.set_records(NAME, ["127.0.0.3"])
    query = dns.message.make_query(NAME, "A")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", timeout=2, port=dns_server.port)
    assert [rr.address for rrset in response.answer for rr in rrset] == ["127.0.0.3"]


def test_selected_by_default_topology(dns_server: LocalDNSServer) -> None:
    assert isinstance(strategy_for(settings(dns_server)), DNSPollStrategy)


@pytest.mark.parametrize(("interval", "lifetime"), [(0.1, 0.5), (0.4, 0.8), (5.0, 2.0)])
def test_a_lookup_may_last_two_polling_intervals_within_half_a_second_and_two(
    dns_server: LocalDNSServer, interval: float, lifetime: float
) -> None:
    """The default bound of a round: a slow nameserver cannot stretch the polling period
    far beyond what the operator set, nor is a fast poll cut below a useful wait."""
    strategy = DNSPollStrategy(settings(dns_server, polling_interval=interval))
    assert strategy.lifetime == pytest.approx(lifetime)


async def test_our_own_address_is_left_out_however_node_host_spells_it(
    dns_server: LocalDNSServer,
) -> None:
    dns_server.set_records(NAME, ["fd00::2", "fd00::3"])
    s = settings(dns_server, host="fd00:0:0::2")  # the same address as fd00::2
    assert await DNSPollStrategy(s, lifetime=1).poll() == peers("fd00::3")


async def test_rounds_are_a_polling_interval_apart(dns_server: LocalDNSServer) -> None:
    """Not back to back: one lookup per interval (start to start), however long each took."""
    dns_server.set_records(NAME, ["127.0.0.3"])
    times: list[float] = []
    strategy = DNSPollStrategy(settings(dns_server, polling_interval=0.3), lifetime=1)
    task = asyncio.create_task(strategy.run(lambda _peers: times.append(time.monotonic())))
    try:
        await async_wait_until(lambda: len(times) >= 3, timeout=5, message="3 rounds")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Two intervals (0.6 s), less the first lookup's own time.
    assert times[2] - times[0] >= 0.4


def test_an_explicit_lifetime_wins_over_the_default(dns_server: LocalDNSServer) -> None:
    assert DNSPollStrategy(settings(dns_server, polling_interval=5.0), lifetime=0.3).lifetime == 0.3


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("[fd00::53]:5353", ("fd00::53", 5353)),
        ("[fd00::53]", ("fd00::53", 53)),
        (" 127.0.0.1:5353 ", ("127.0.0.1", 5353)),
        ("dns.local", ("dns.local", 53)),
    ],
)
def test_dns_server_forms(text: str, server: tuple[str, int]) -> None:
    """SHOAL_DNS_SERVER: `host`, `host:port`, `[v6]` or `[v6]:port` (a pure parser)."""
    assert _parse_server(text) == server


async def test_a_nameserver_name_that_does_not_resolve_is_a_config_error() -> None:
    with pytest.raises(DNSLookupError) as raised:
        await lookup_all_ips(NAME, "no-such-nameserver.invalid:5353", lifetime=0.3)
    assert raised.value.kind == "config"
    assert "'no-such-nameserver.invalid' cannot be resolved" in str(raised.value)


async def test_a_nameserver_given_by_host_name_is_asked() -> None:
    """SHOAL_DNS_SERVER may name its host (a compose service, here `localhost`): the name
    is resolved, and peers come from that nameserver's records."""
    # Listen where `localhost` resolves first (127.0.0.1, or ::1 on some hosts).
    host = socket.getaddrinfo("localhost", None, type=socket.SOCK_DGRAM)[0][4][0]
    with LocalDNSServer(str(host)) as nameserver:
        nameserver.set_records(NAME, ["127.0.0.3", "127.0.0.4"])
        env = {
            "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
            "TOPOLOGY_TYPE": "dns",
            "NODE_HOST": "127.0.0.2",
            "SERVICE_DISCOVERY_ENDPOINT": NAME,
            "SHOAL_DNS_SERVER": f"localhost:{nameserver.port}",
        }
        strategy = strategy_for(Settings.from_env(env))
        assert isinstance(strategy, DNSPollStrategy)
        assert await strategy.poll() == peers("127.0.0.3", "127.0.0.4")
        assert await lookup_all_ips(NAME, env["SHOAL_DNS_SERVER"]) == ["127.0.0.3", "127.0.0.4"]


@pytest.fixture
def resolv_conf(
    dns_server: LocalDNSServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The system resolver's configuration for this test, in place of /etc/resolv.conf: an
    ECS task's (with its search list), whose nameserver is the test DNS server."""
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.1\nsearch ec2.internal\n")
    read = dns.resolver.BaseResolver.read_resolv_conf

    def read_ours(self: dns.resolver.BaseResolver, f: Any) -> None:
        self.port = dns_server.port  # resolv.conf cannot say which port
        read(self, path)

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", read_ours)
    return path


async def test_without_a_dns_server_the_system_resolver_is_asked(
    dns_server: LocalDNSServer, resolv_conf: Path
) -> None:
    """No SHOAL_DNS_SERVER (the default, e.g. on ECS): the nameserver of resolv.conf."""
    dns_server.set_records(NAME, ["127.0.0.3"])
    s = settings(dns_server, dns_server=None)
    assert await DNSPollStrategy(s, lifetime=1).poll() == peers("127.0.0.3")
    assert await lookup_all_ips(NAME) == ["127.0.0.3"]
    assert dns_server.query_count(NAME) >= 2


@pytest.mark.parametrize("search_list_from", ["resolv-conf", "host-name"])
async def test_the_endpoint_is_asked_as_given_never_through_a_search_list(
    dns_server: LocalDNSServer,
    resolv_conf: Path,
    monkeypatch: pytest.MonkeyPatch,
    search_list_from: str,
) -> None:
    """An ECS task's resolv.conf says `search ec2.internal` (and an EC2 host's name ends in
    it, which dnspython also uses as a search domain): a missing `hi.service.local` must stay
    missing, not silently become `hi.service.local.ec2.internal`, another name's records."""
    searched = f"{NAME}.ec2.internal"
    dns_server.set_records(searched, ["127.0.0.3"])
    if search_list_from == "resolv-conf":
        s = settings(dns_server, dns_server=None)
    else:
        monkeypatch.setattr(socket, "gethostname", lambda: "ip-10-0-0-7.ec2.internal")
        s = settings(dns_server)
    # The search list is in effect: a lookup that uses it finds the other name's records.
    resolver = await _make_resolver(s.dns_server, 1)
    searching = await resolver.resolve(NAME, "A", search=True)
    assert [rdata.address for rdata in searching] == ["127.0.0.3"]
    asked = dns_server.query_count(searched)
    assert await DNSPollStrategy(s, lifetime=1).poll() == []
    with pytest.raises(DNSLookupError) as raised:  # `shoal lookup` says so too
        await lookup_all_ips(NAME, s.dns_server, lifetime=1)
    assert raised.value.kind == "nxdomain"
    assert dns_server.query_count(searched) == asked, "a search-list name was asked"
