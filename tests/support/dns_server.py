"""A real DNS server on 127.0.0.1 (UDP and TCP, ephemeral port) whose answers tests change.

It plays Cloud Map: set the A/AAAA records of a name, change them while nodes
poll, or make it fail (SERVFAIL, NXDOMAIN, or silence). Clients reach it over
the network, exactly as in production:

    with LocalDNSServer() as dns:
        dns.set_records("hi.local", ["127.0.0.2", "127.0.0.3"])
        env = {"SHOAL_DNS_SERVER": dns.address_text, "SERVICE_DISCOVERY_ENDPOINT": "hi.local"}
        ...
        dns.set_mode("servfail")

or as the pytest fixture `dns_server` (see `tests.support.fixtures`).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

Mode = Literal["ok", "servfail", "nxdomain", "timeout"]
MODES: tuple[Mode, ...] = ("ok", "servfail", "nxdomain", "timeout")

# How long a "timeout" TCP query is held open before the server gives up on it
# (bounded, so stopping the server never waits for a silent client).
_HOLD_SECONDS = 5.0


def _key(name: str) -> str:
    return name.rstrip(".").lower() + "."


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, server: LocalDNSServer) -> None:
        self._server = server

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        mode, records = self._server._lookup(qname)
        self._server._count(qname, qtype)
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if records is None or mode == "nxdomain":
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in records:
            ip = ipaddress.ip_address(address)
            if qtype == "A" and ip.version == 4:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=self._server.ttl))
            elif qtype == "AAAA" and ip.version == 6:
                reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(address), ttl=self._server.ttl))
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    """Drops queries in "timeout" mode, or of a type in `silent_types`, instead of answering."""

    def handle(self) -> None:
        server: LocalDNSServer = self.server.owner
        if server.silent_types and self.server.socket_type == socket.SOCK_DGRAM:
            try:
                qtype = QTYPE[DNSRecord.parse(self.request[0]).q.qtype]
            except Exception:
                qtype = None
            if qtype in server.silent_types:
                server._count("(dropped)", str(qtype))
                return
        if server.mode == "timeout":
            server._count("(dropped)", "-")
            if self.server.socket_type == socket.SOCK_STREAM:
                server._stopping.wait(_HOLD_SECONDS)
            return
        super().handle()


class _QuietLogger:
    """dnslib's default logger prints every query to stdout."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class LocalDNSServer:
    """A DNS server on `127.0.0.1:<port>` (UDP+TCP on the same port) with mutable records."""

    def __init__(self, host: str = "127.0.0.1", ttl: int = 0) -> None:
        self.host = host
        self.port = 0
        self.ttl = ttl
        self.mode: Mode = "ok"
        # Record types (e.g. "AAAA") whose UDP queries are never answered.
        self.silent_types: set[str] = set()
        self.queries: dict[tuple[str, str], int] = {}
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._servers: list[DNSServer] = []

    # -- records and failure modes -------------------------------------------------
    def set_records(self, name: str, addresses: Iterable[str]) -> None:
        """Answer `name` with these IPv4/IPv6 addresses (an empty list: NOERROR, no records)."""
        checked = [str(ipaddress.ip_address(a)) for a in addresses]
        with self._lock:
            self._records[_key(name)] = checked

    def remove(self, name: str) -> None:
        """Forget `name`: it answers NXDOMAIN."""
        with self._lock:
            self._records.pop(_key(name), None)

    def set_mode(self, mode: Mode) -> None:
        """`ok`, `servfail`, `nxdomain` (for every name) or `timeout` (queries are dropped)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES}")
        self.mode = mode

    def query_count(self, name: str | None = None) -> int:
        """Queries received so far (for `name`, or all, including dropped ones)."""
        with self._lock:
            if name is None:
                return sum(self.queries.values())
            key = _key(name)
            return sum(n for (qname, _), n in self.queries.items() if qname == key)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def address_text(self) -> str:
        """`host:port`, the form `SHOAL_DNS_SERVER` takes."""
        return f"{self.host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> LocalDNSServer:
        """Bind UDP on an ephemeral port, then TCP on the same port (retrying on a clash)."""
        resolver = _Resolver(self)
        last_error: OSError | None = None
        for _attempt in range(20):
            udp = DNSServer(
                resolver, address=self.host, port=0, logger=_QuietLogger(), handler=_Handler
            )
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    resolver,
                    address=self.host,
                    port=port,
                    tcp=True,
                    logger=_QuietLogger(),
                    handler=_Handler,
                )
            except OSError as exc:
                udp.server.server_close()
                last_error = exc
                continue
            self.port = port
            self._servers = [udp, tcp]
            for server in self._servers:
                server.server.owner = self
                # A short poll interval: stop() returns in ~50 ms, not 0.5 s.
                server.thread = threading.Thread(
                    target=server.server.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"local-dns-{port}",
                    daemon=True,
                )
                server.thread.start()
            return self
        raise RuntimeError(f"could not bind UDP and TCP on one port: {last_error}")

    def stop(self) -> None:
        self._stopping.set()
        # shutdown() waits for the serve loop's 0.5 s poll; do both at once.
        stoppers = [threading.Thread(target=server.stop) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper, server in zip(stoppers, self._servers, strict=True):
            stopper.join(timeout=5)
            server.server.server_close()
            server.thread.join(timeout=5)
        self._servers = []

    def __enter__(self) -> LocalDNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- used by the resolver thread -----------------------------------------------
    def _lookup(self, qname: str) -> tuple[Mode, list[str] | None]:
        with self._lock:
            records = self._records.get(_key(qname))
            return self.mode, None if records is None else list(records)

    def _count(self, qname: str, qtype: str) -> None:
        with self._lock:
            key = (_key(qname), qtype)
            self.queries[key] = self.queries.get(key, 0) + 1


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.support.dns_server HOST NAME IP...`: serve NAME's records on HOST.

    For a server inside a network-namespace host (`Host.popen`): prints `port N`
    once it serves, and stops on SIGTERM, or by itself after 10 minutes.
    """
    host, name, *ips = sys.argv[1:] if argv is None else argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalDNSServer(host) as dns:
        dns.set_records(name, ips)
        print(f"port {dns.port}", flush=True)
        stop.wait(600)


if __name__ == "__main__":
    main()
