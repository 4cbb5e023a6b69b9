"""DNS polling discovery (libcluster's `DNSPoll`), e.g. AWS Cloud Map A records.

Every `POLLING_INTERVAL` the A and AAAA records of `SERVICE_DISCOVERY_ENDPOINT`
are asked for, and every address except our own is proposed as
`NODE_NAME_QUERY@ip`. Unlike libcluster, a failed lookup (timeout, SERVFAIL,
NXDOMAIN) proposes nothing and disconnects nobody: the mesh alone decides when
a peer is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from shoal.config import Peer, Settings
from shoal.discovery.base import Propose, host_peers, poll_forever
from shoal.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# A lookup longer than this is a failed round; keeps one slow nameserver from
# stretching the polling period far beyond what the operator configured.
DEFAULT_TIMEOUT = 2.0

DNSServer = tuple[str, int]


class DNSLookupError(Exception):
    """A lookup failed (timeout, SERVFAIL, NXDOMAIN, unreachable nameserver)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def lookup_all_ips(
    name: str,
    dns_server: DNSServer | str | None = None,
    *,
    lifetime: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """All A and AAAA addresses of `name`, IPv4 first, sorted, without duplicates.

    `dns_server` is `(host, port)` or `"host:port"`; `None` asks the system
    resolver; `lifetime` bounds the whole lookup, in seconds. A name without
    records gives `[]`; a failure raises `DNSLookupError` with a message fit
    for a user (the CLI prints it).
    """
    resolver = await _make_resolver(dns_server, lifetime)
    return await _lookup(resolver, name, lifetime)


class DNSPollStrategy:
    """Poll A/AAAA of `settings.discovery_endpoint`; propose `name_query@ip` for each."""

    def __init__(self, settings: Settings, *, lifetime: float | None = None) -> None:
        self.settings = settings
        self.lifetime = lifetime if lifetime is not None else _default_lifetime(settings)
        self._problems = RateLimitedLog(log)
        self._resolver: dns.asyncresolver.Resolver | None = None

    async def run(self, propose: Propose) -> None:
        await poll_forever(self.poll, self.settings.polling_interval, propose)

    async def poll(self) -> list[Peer]:
        """One round: the peers DNS returns now, or `[]` when the lookup failed."""
        endpoint = self.settings.discovery_endpoint
        try:
            if self._resolver is None:
                self._resolver = await _make_resolver(self.settings.dns_server, self.lifetime)
            ips = await _lookup(self._resolver, endpoint, self.lifetime)
        except DNSLookupError as exc:
            self._problems.problem(exc.kind, "DNS discovery: %s; proposing no peers", exc)
            return []
        except Exception as exc:  # never let one bad round end discovery
            self._problems.problem(
                "unexpected", "DNS discovery: lookup of %s failed unexpectedly: %r", endpoint, exc
            )
            return []
        self._problems.recovered("DNS discovery: %s answers again", endpoint)
        peers = host_peers(self.settings, ips)
        log.debug("DNS discovery: %s -> %s", endpoint, ips)
        return peers


def _default_lifetime(settings: Settings) -> float:
    return max(0.5, min(DEFAULT_TIMEOUT, settings.polling_interval * 2))


async def _make_resolver(
    dns_server: DNSServer | str | None, lifetime: float
) -> dns.asyncresolver.Resolver:
    if dns_server is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            raise DNSLookupError(
                "config", f"no system nameserver configured ({exc}); set SHOAL_DNS_SERVER"
            ) from None
    else:
        host, port = _parse_server(dns_server)
        address = await _nameserver_address(host, port)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)]
    # Every query goes to the wire: a cached answer would hide new tasks.
    resolver.cache = None
    resolver.timeout = lifetime
    resolver.lifetime = lifetime
    return resolver


def _parse_server(server: DNSServer | str) -> DNSServer:
    if isinstance(server, tuple):
        return server
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.removeprefix(":") or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


async def _nameserver_address(host: str, port: int) -> str:
    """dnspython wants an IP; a host name (e.g. a compose service) is resolved once."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=2)  # SOCK_DGRAM
    except OSError as exc:
        raise DNSLookupError("config", f"nameserver {host!r} cannot be resolved: {exc}") from None
    return str(infos[0][4][0])


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str, lifetime: float) -> list[str]:
    """A and AAAA in parallel, used independently.

    An empty answer for one type is not an error, and neither is a failure of
    one type while the other answers (a nameserver that never answers AAAA
    must not disable discovery): only when both fail is the round lost.
    """
    # return_exceptions: when both queries fail, the second failure is still
    # retrieved (no "exception was never retrieved" noise in the log).
    results = await asyncio.gather(
        *(
            resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False, lifetime=lifetime
            )
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ),
        return_exceptions=True,
    )
    answers = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if answers and failures:
        log.debug("DNS discovery: one record type of %s failed: %r", name, failures[0])
    try:
        if not answers:
            raise failures[0]
    except dns.resolver.NXDOMAIN:
        raise DNSLookupError("nxdomain", f"{name} does not exist (NXDOMAIN)") from None
    except dns.exception.Timeout:
        raise DNSLookupError("timeout", f"no answer for {name} within {lifetime:g} s") from None
    except dns.resolver.NoNameservers as exc:
        raise DNSLookupError(
            "servfail", f"every nameserver failed for {name} (SERVFAIL or refused): {exc}"
        ) from None
    except dns.exception.DNSException as exc:
        raise DNSLookupError("error", f"lookup of {name} failed: {exc}") from None
    ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for answer in answers:
        for rdata in answer:
            ips.add(ipaddress.ip_address(rdata.address))
    return [str(ip) for ip in sorted(ips, key=lambda ip: (ip.version, ip))]
