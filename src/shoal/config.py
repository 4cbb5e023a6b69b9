"""Node settings: read from the environment once, validated, with clear errors.

Every timing knob lives here with its default and the reason for it, so there
is one place to look when tuning a cluster.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

from shoal import crypto

TOPOLOGIES = ("gossip", "dns", "static", "cloudmap")
TOPOLOGY_ALIASES = {"local": "gossip"}
SINGLETON_MODES = ("mesh", "quorum", "lease")
# No duration setting may exceed a day: larger values are typos, and would
# overflow timers.
MAX_MS = 24 * 3600 * 1000
# POLLING_INTERVAL's least value (ms).
MIN_POLLING_MS = 100
# SHOAL_BUSY_POLL_US at most: a longer window mostly burns CPU.
MAX_BUSY_POLL_US = 10_000
# SHOAL_NODES_PER_HOST at most: every node of a host may be handshaking with a
# peer at once, and one address holds at most this many pending handshakes
# there (shoal.admission.MAX_PENDING_HANDSHAKES_PER_HOST); it also bounds the
# ports a dialer probes on each discovered host.
MAX_NODES_PER_HOST = 32


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class Peer:
    """A node address proposed by discovery or configuration.

    Its name is `basename@host`, or `basename@host:port` for a node on a port
    other than SHOAL_PORT within SHOAL_NODES_PER_HOST (`Settings.peer` decides).
    """

    basename: str
    host: str
    port: int
    port_in_name: bool = False

    @property
    def name(self) -> str:
        if self.port_in_name:
            return f"{self.basename}@{join_host_port(self.host, self.port)}"
        return f"{self.basename}@{self.host}"


class TLSFiles(NamedTuple):
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class Settings:
    """Everything a node needs. Build with `Settings.from_env()` or directly.

    Built directly, the defaults are those of `from_env`: `name_query` follows
    `basename`, and an empty `host` is detected as `from_env` does when
    `NODE_HOST` is unset (the ECS task metadata, else the primary address).
    Construction validates every field, types included, with a `ConfigError`
    that names the field and its variable.
    """

    cookie: str = field(repr=False)
    basename: str = "hi"
    host: str = ""
    port: int = 4370
    topology: str = "dns"
    # DNS polling (and Cloud Map) discovery.
    discovery_endpoint: str = "ecs.local"
    name_query: str = ""  # empty: the basename
    polling_interval: float = 1.0
    dns_server: tuple[str, int] | None = None
    # Gossip discovery: TTL 1 keeps beacons on the local segment.
    gossip_addr: str = "233.252.1.32"
    gossip_port: int = 45892
    gossip_ttl: int = 1
    gossip_interval: float = 1.0
    # Static discovery.
    hosts: tuple[Peer, ...] = ()
    # Cloud Map API discovery.
    cloudmap_namespace: str = ""
    cloudmap_service: str = ""
    # Failure detection. A heartbeat every 0.5 s and a 3 s timeout tolerate
    # five lost heartbeats (GC pauses, a busy event loop) while still finding a
    # silent peer well inside the 5 s the design promises.
    heartbeat_interval: float = 0.5
    failure_timeout: float = 3.0
    # A handshake that takes longer than this is an attack or a broken peer.
    handshake_timeout: float = 3.0
    # A TCP connect still pending after this lost its SYN (a cut link, a dead
    # host): give up and let the next discovery round dial afresh, so a healed
    # link reconnects within about a second instead of the kernel's retries.
    connect_timeout: float = 1.0
    # The largest message. A sender gets MessageTooLarge above it; a receiver
    # drops a peer that sends a larger frame. Decoding a frame runs on the
    # event loop and costs up to one object per byte: 512 KiB of the worst
    # content (empty lists) takes about 30-50 ms of CPU on a busy 2-core
    # machine, so one frame cannot stall a node for more than about 100 ms.
    # Raising it raises that bound in proportion.
    max_frame_size: int = 512 * 1024
    # Bytes queued for one peer that it has not read yet. A peer past this is
    # not reading (or far too slow) and is dropped, so it cannot grow our
    # memory; senders that await (`send`) wait at 4 MiB, far below it.
    max_send_buffer: int = 16 * 1024 * 1024
    # Handler calls from one peer running at once (async handlers and sync
    # ones in threads). Above it a call is refused with `Busy` and a one-way
    # message is dropped, so one peer cannot queue unbounded work here.
    max_inflight_per_peer: int = 256
    # Worker threads for sync handlers (shared by all peers).
    handler_threads: int = 16
    # After reading calls, and after sending one, the event loop polls instead of
    # sleeping for this long, so that the next call or the reply is read without waking
    # the process (`shoal.loop.BusyPoll`). 0 turns it off: a round trip then takes two
    # wake-ups longer, and no CPU polls.
    busy_poll: float = 0.00005
    # How long a graceful stop waits for singletons and jobs to finish.
    drain_timeout: float = 10.0
    tls: TLSFiles | None = None
    # AES-GCM records on mesh connections (when TLS is off). Every node of a
    # cluster must agree; turning it off is for benchmarks on trusted links only.
    mesh_encryption: bool = True
    singleton_mode: str = "mesh"
    expected_nodes: int | None = None
    lease_dsn: str | None = field(default=None, repr=False)
    lease_ttl: float = 5.0
    control_socket: str | None = None
    # SHOAL_ALLOW_WEAK_COOKIE=1: accept a short or guessable cookie (throwaway tests only).
    allow_weak_cookie: bool = False
    # Several nodes per host: a node listens on the first free port of
    # `ports` (SHOAL_PORT, SHOAL_PORT + 1, ...), claimed by `mesh.claim_port`,
    # which sets `own_port`; 0 means SHOAL_PORT itself (one node per host).
    nodes_per_host: int = 1
    own_port: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.name_query:
            object.__setattr__(self, "name_query", self.basename)
        if not self.host:
            host = detect_host(os.environ)
            _check_host("NODE_HOST", host)
            object.__setattr__(self, "host", host)
        self.validate()

    @property
    def name(self) -> str:
        return self.peer(self.basename, self.host, self.listen_port).name

    @property
    def listen_port(self) -> int:
        """The port this node listens on and advertises."""
        return self.own_port or self.port

    @property
    def ports(self) -> range:
        """The mesh ports of a host: SHOAL_PORT only, unless SHOAL_NODES_PER_HOST > 1."""
        return range(self.port, self.port + self.nodes_per_host)

    def peer(self, basename: str, host: str, port: int) -> Peer:
        """The node at host:port, named as it names itself: the port is part of the
        name on the other ports of the range only, so one node per host keeps
        `basename@host`."""
        return Peer(basename, host, port, port != self.port and port in self.ports)

    def peers_on(self, basename: str, host: str) -> list[Peer]:
        """Every node `basename` may run on `host`: one per port of the range."""
        return [self.peer(basename, host, port) for port in self.ports]

    def with_overrides(self, **changes: Any) -> Settings:
        settings = replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.cookie:
            raise ConfigError("RELEASE_COOKIE is empty: set it to the shared cluster secret.")
        check_cookie(self.cookie, self.allow_weak_cookie)
        _check_basename("NODE_NAME", self.basename)
        _check_basename("NODE_NAME_QUERY", self.name_query)
        _check_port("SHOAL_PORT", self.port)
        _check_port("SHOAL_GOSSIP_PORT", self.gossip_port)
        _check_durations(self)
        if not 1 <= self.nodes_per_host <= MAX_NODES_PER_HOST:
            raise ConfigError(
                f"SHOAL_NODES_PER_HOST={self.nodes_per_host}: expected 1 to {MAX_NODES_PER_HOST}."
            )
        if self.port + self.nodes_per_host - 1 > 65535:
            raise ConfigError(
                f"SHOAL_PORT={self.port} with SHOAL_NODES_PER_HOST={self.nodes_per_host} "
                "goes past port 65535: lower SHOAL_PORT."
            )
        if self.own_port and self.own_port not in self.ports:
            raise ConfigError(f"own_port={self.own_port} is outside SHOAL_PORT's range.")
        if self.topology not in TOPOLOGIES:
            raise ConfigError(
                f"TOPOLOGY_TYPE={self.topology!r} is unknown: use one of "
                f"{', '.join((*TOPOLOGIES, *TOPOLOGY_ALIASES))}."
            )
        if self.singleton_mode not in SINGLETON_MODES:
            raise ConfigError(
                f"SHOAL_SINGLETON_MODE={self.singleton_mode!r} is unknown: use one of "
                f"{', '.join(SINGLETON_MODES)}."
            )
        if self.singleton_mode == "lease" and not self.lease_dsn:
            raise ConfigError("SHOAL_SINGLETON_MODE=lease needs SHOAL_LEASE_DSN (a Postgres DSN).")
        if self.heartbeat_interval <= 0 or self.failure_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "SHOAL_FAILURE_TIMEOUT_MS must be larger than SHOAL_HEARTBEAT_INTERVAL_MS, "
                "and both positive."
            )
        if not 64 * 1024 <= self.max_frame_size < 2**32:
            raise ConfigError("SHOAL_MAX_FRAME_BYTES must be at least 65536 (and below 4 GiB).")
        if self.max_send_buffer < 4 * 1024 * 1024 + 2 * self.max_frame_size:
            raise ConfigError(
                "SHOAL_MAX_SEND_BUFFER_BYTES must be at least 4 MiB plus twice "
                "SHOAL_MAX_FRAME_BYTES (the write high-water mark and two frames)."
            )
        if self.max_inflight_per_peer < 1 or self.handler_threads < 1:
            raise ConfigError(
                "SHOAL_MAX_INFLIGHT_PER_PEER and SHOAL_HANDLER_THREADS must be at least 1."
            )
        if not 0 <= self.busy_poll <= MAX_BUSY_POLL_US / 1e6:  # NaN fails too
            raise ConfigError(
                f"SHOAL_BUSY_POLL_US={self.busy_poll * 1e6:g} (Settings(busy_poll="
                f"{self.busy_poll!r}), in seconds): expected 0 (off) to {MAX_BUSY_POLL_US} µs."
            )
        if self.expected_nodes is not None and self.expected_nodes < 1:
            raise ConfigError("SHOAL_EXPECTED_NODES must be at least 1.")
        _check_node_host("NODE_HOST", self.host)
        _check_multicast("SHOAL_GOSSIP_ADDR", self.gossip_addr)
        if not 1 <= self.gossip_ttl <= 255:
            raise ConfigError(f"SHOAL_GOSSIP_TTL={self.gossip_ttl}: a TTL is between 1 and 255.")
        if self.dns_server is not None:
            _check_host("SHOAL_DNS_SERVER", self.dns_server[0])
            _check_port("SHOAL_DNS_SERVER", self.dns_server[1])
        if self.lease_dsn is not None:
            _check_dsn("SHOAL_LEASE_DSN", self.lease_dsn)
        if self.topology == "dns":  # a URL or a typo would poll in vain, the node alone
            _check_host("SERVICE_DISCOVERY_ENDPOINT", self.discovery_endpoint)
        if self.topology == "cloudmap" and not (self.cloudmap_namespace and self.cloudmap_service):
            raise ConfigError(
                "TOPOLOGY_TYPE=cloudmap needs SHOAL_CLOUDMAP_NAMESPACE and SHOAL_CLOUDMAP_SERVICE."
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the contract's variables (see DESIGN.md / README) and validate them."""
        env = os.environ if env is None else env
        cookie = env.get("RELEASE_COOKIE", "")
        if "cookie" in overrides:
            cookie = overrides.pop("cookie")
        if not cookie:
            raise ConfigError(
                "RELEASE_COOKIE is not set: every node of a cluster needs the same secret "
                "cookie (for example `export RELEASE_COOKIE=$(openssl rand -hex 32)`)."
            )
        basename = env.get("NODE_NAME", "hi") or "hi"
        _check_basename("NODE_NAME", basename)
        topology = (env.get("TOPOLOGY_TYPE") or "dns").strip().lower()
        topology = TOPOLOGY_ALIASES.get(topology, topology)
        port = _int(env, "SHOAL_PORT", 4370)
        host = env.get("NODE_HOST") or detect_host(env)
        _check_host("NODE_HOST", host)
        _check_node_host("NODE_HOST", host)
        tls = None
        tls_values = [env.get(k) for k in ("SHOAL_TLS_CERT", "SHOAL_TLS_KEY", "SHOAL_TLS_CA")]
        if any(tls_values):
            if not all(tls_values):
                raise ConfigError(
                    "TLS needs all three of SHOAL_TLS_CERT, SHOAL_TLS_KEY and SHOAL_TLS_CA."
                )
            for var, path in zip(
                ("SHOAL_TLS_CERT", "SHOAL_TLS_KEY", "SHOAL_TLS_CA"), tls_values, strict=True
            ):
                if not os.path.isfile(str(path)):
                    raise ConfigError(f"{var}={path!r}: no such file.")
            tls = TLSFiles(*(str(v) for v in tls_values))
        expected = env.get("SHOAL_EXPECTED_NODES")
        values: dict[str, Any] = dict(
            cookie=cookie,
            basename=basename,
            host=host,
            port=port,
            nodes_per_host=_int(env, "SHOAL_NODES_PER_HOST", 1),
            topology=topology,
            discovery_endpoint=env.get("SERVICE_DISCOVERY_ENDPOINT") or "ecs.local",
            name_query=env.get("NODE_NAME_QUERY") or basename,
            # Its name has no unit: POLLING_INTERVAL=5 meant as seconds would poll DNS or
            # Cloud Map 200 times a second.
            polling_interval=_ms(env, "POLLING_INTERVAL", 1000, least=MIN_POLLING_MS),
            dns_server=_host_port("SHOAL_DNS_SERVER", env.get("SHOAL_DNS_SERVER"), 53),
            gossip_addr=env.get("SHOAL_GOSSIP_ADDR") or "233.252.1.32",
            gossip_port=_int(env, "SHOAL_GOSSIP_PORT", 45892),
            gossip_ttl=_int(env, "SHOAL_GOSSIP_TTL", 1),
            hosts=parse_hosts(env.get("SHOAL_HOSTS", ""), basename, port),
            cloudmap_namespace=env.get("SHOAL_CLOUDMAP_NAMESPACE", ""),
            cloudmap_service=env.get("SHOAL_CLOUDMAP_SERVICE", ""),
            heartbeat_interval=_ms(env, "SHOAL_HEARTBEAT_INTERVAL_MS", 500),
            failure_timeout=_ms(env, "SHOAL_FAILURE_TIMEOUT_MS", 3000),
            handshake_timeout=_ms(env, "SHOAL_HANDSHAKE_TIMEOUT_MS", 3000),
            connect_timeout=_ms(env, "SHOAL_CONNECT_TIMEOUT_MS", 1000),
            drain_timeout=_ms(env, "SHOAL_DRAIN_TIMEOUT_MS", 10000),
            max_frame_size=_int(env, "SHOAL_MAX_FRAME_BYTES", 512 * 1024),
            max_send_buffer=_int(env, "SHOAL_MAX_SEND_BUFFER_BYTES", 16 * 1024 * 1024),
            max_inflight_per_peer=_int(env, "SHOAL_MAX_INFLIGHT_PER_PEER", 256),
            handler_threads=_int(env, "SHOAL_HANDLER_THREADS", 16),
            busy_poll=_int(env, "SHOAL_BUSY_POLL_US", 50) / 1e6,
            tls=tls,
            singleton_mode=(env.get("SHOAL_SINGLETON_MODE") or "mesh").strip().lower(),
            expected_nodes=_parse_int("SHOAL_EXPECTED_NODES", expected) if expected else None,
            lease_dsn=_lease_dsn(env),
            lease_ttl=_ms(env, "SHOAL_LEASE_TTL_MS", 5000),
            control_socket=env.get("SHOAL_CONTROL_SOCKET") or None,
            allow_weak_cookie=_flag(env, "SHOAL_ALLOW_WEAK_COOKIE"),
        )
        values.update(overrides)
        return cls(**values)  # validated by __post_init__


# Each field's variable, for messages about a value built in code.
_FIELD_VARS = {
    "cookie": "RELEASE_COOKIE",
    "basename": "NODE_NAME",
    "host": "NODE_HOST",
    "port": "SHOAL_PORT",
    "topology": "TOPOLOGY_TYPE",
    "discovery_endpoint": "SERVICE_DISCOVERY_ENDPOINT",
    "name_query": "NODE_NAME_QUERY",
    "polling_interval": "POLLING_INTERVAL",
    "dns_server": "SHOAL_DNS_SERVER",
    "hosts": "SHOAL_HOSTS",
}

# The durations (seconds) and their variables (milliseconds); `gossip_interval` has none.
_DURATIONS = {
    "polling_interval": "POLLING_INTERVAL",
    "gossip_interval": None,
    "heartbeat_interval": "SHOAL_HEARTBEAT_INTERVAL_MS",
    "failure_timeout": "SHOAL_FAILURE_TIMEOUT_MS",
    "handshake_timeout": "SHOAL_HANDSHAKE_TIMEOUT_MS",
    "connect_timeout": "SHOAL_CONNECT_TIMEOUT_MS",
    "drain_timeout": "SHOAL_DRAIN_TIMEOUT_MS",
    "lease_ttl": "SHOAL_LEASE_TTL_MS",
}


def _check_durations(settings: Settings) -> None:
    """Every duration as `from_env` allows it: positive and at most a day. Built in code,
    0, a negative, NaN or inf would otherwise start a node whose timers spin, never fire,
    or give up at once (a NaN passes every comparison)."""
    for name, var in _DURATIONS.items():
        value = getattr(settings, name)
        if not (0 < value <= MAX_MS / 1000 and math.isfinite(value)):
            hint = f" (the setting of {var}, in ms)" if var else ""
            raise ConfigError(
                f"Settings({name}={value!r}){hint}: expected a positive number of seconds, "
                f"at most {MAX_MS // 1000}."
            )


def _check_types(settings: Settings) -> None:
    """Refuse a field of the wrong type at construction (`hosts="a@b"` is a str, not Peers)."""
    for item in fields(settings):
        value = getattr(settings, item.name)
        expected = _field_types()[item.name]
        if not _has_type(value, expected):
            var = _FIELD_VARS.get(item.name)
            hint = f" (the setting of {var})" if var else ""
            secret = item.name in ("cookie", "lease_dsn")
            shown = "(its value is not shown: a secret)" if secret else repr(value)
            extra = ""
            if item.name == "hosts":
                extra = (
                    '; parse a string with shoal.config.parse_hosts("app@10.0.0.2,app@10.0.0.3",'
                    " basename, port)"
                )
            raise ConfigError(
                f"Settings({item.name}=...){hint} must be {_type_name(expected)}, "
                f"not {type(value).__name__} {shown}{extra}."
            )


def _has_type(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    if isinstance(expected, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    origin = typing.get_origin(expected)
    if origin is tuple:
        args = typing.get_args(expected)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_has_type, value, args))
    if expected is float:  # an int is a fine number of seconds
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "None"
    if typing.get_origin(expected) is tuple:
        args = typing.get_args(expected)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_type_name(args[0])}"
        return f"a tuple ({', '.join(_type_name(a) for a in args)})"
    return getattr(expected, "__name__", str(expected))


@functools.cache
def _field_types() -> dict[str, Any]:
    """Settings' field types (resolved on first use: it costs a few ms)."""
    return typing.get_type_hints(Settings)


def parse_hosts(text: str, default_basename: str, port: int) -> tuple[Peer, ...]:
    """Parse `SHOAL_HOSTS`: comma-separated `name@host`, `host`, optionally `:port`."""
    peers = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        basename, _, rest = item.rpartition("@")
        basename = basename or default_basename
        try:
            host, peer_port = _split_host_port(rest, port)
            _check_basename("SHOAL_HOSTS", basename)
            _check_host("SHOAL_HOSTS", host)
        except ConfigError as exc:
            raise ConfigError(
                f"SHOAL_HOSTS entry {item!r} is not `name@host`, `host` or `host:port`: {exc}"
            ) from None
        peers.append(Peer(basename, host, peer_port))
    return tuple(peers)


def detect_host(env: Mapping[str, str]) -> str:
    """The address to bind and advertise: ECS task metadata v4, else the primary address."""
    uri = env.get("ECS_CONTAINER_METADATA_URI_V4")
    if uri:
        return ecs_task_ip(uri)
    return primary_address()


def ecs_task_ip(metadata_uri: str, timeout: float = 2.0) -> str:
    """The task's private address from the ECS task metadata endpoint v4.

    `${ECS_CONTAINER_METADATA_URI_V4}` itself returns the *container* document,
    whose `Networks[].IPv4Addresses` (awsvpc mode, i.e. every Fargate task) is
    the task's ENI address that peers can reach. The `/task` document nests the
    same list under `Containers[]`; it is accepted too, in case an operator
    points the variable there. IPv4 is preferred; IPv6 only when there is none.
    """
    import json
    import urllib.request  # here, not at the top: only ECS needs it (3 MB, 30 ms at start)

    try:
        with urllib.request.urlopen(metadata_uri, timeout=timeout) as response:
            document = json.loads(response.read(1_000_000))
    except (OSError, ValueError) as exc:  # urllib's URLError is an OSError
        raise ConfigError(
            f"ECS_CONTAINER_METADATA_URI_V4={metadata_uri!r} could not be read ({exc}); "
            "set NODE_HOST to override."
        ) from None
    networks: list[Any] = []
    if isinstance(document, dict):
        networks.extend(document.get("Networks") or [])
        for container in document.get("Containers") or []:
            if isinstance(container, dict):
                networks.extend(container.get("Networks") or [])
    for key in ("IPv4Addresses", "IPv6Addresses"):
        for network in networks:
            if not isinstance(network, dict):
                continue
            for address in network.get(key) or []:
                try:
                    return str(ipaddress.ip_address(address))
                except ValueError:
                    continue
    raise ConfigError(
        f"The ECS metadata at {metadata_uri!r} lists no network address; set NODE_HOST."
    )


def primary_address() -> str:
    """The source address of the default route (no packet is sent), else loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP only picks a route
        return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets (`[fd00::1]:4371`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_node_name(name: str, port: int) -> tuple[str, str, int]:
    """(basename, host, port) of `basename@host` or `basename@host:port`.

    `port` is the port a name without one stands for. Raises ConfigError when
    the part after `@` is not `host` or `host:port`.
    """
    basename, _, rest = name.partition("@")
    host, port = _split_host_port(rest, port)
    return basename, host, port


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{text!r}: expected `[address]:port`.")
        port_text = rest.removeprefix(":")
        port = _parse_int("port", port_text) if port_text else default_port
        _check_port("port", port)
        return host, port
    if text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_int("port", port_text)
        _check_port("port", port)
        return host, port
    return text, default_port


def _host_port(var: str, text: str | None, default_port: int) -> tuple[str, int] | None:
    if not text:
        return None
    try:
        host, port = _split_host_port(text, default_port)
    except ConfigError as exc:
        raise ConfigError(f"{var}={text!r}: expected `host:port` ({exc}).") from None
    if not host:
        raise ConfigError(f"{var}={text!r}: expected `host:port`.")
    return host, port


def _check_basename(var: str, name: str) -> None:
    if not name or "@" in name or any(c.isspace() for c in name) or len(name) > 64:
        raise ConfigError(
            f"{var}={name!r}: a node basename is 1-64 characters without '@' or spaces."
        )


def _check_host(var: str, host: str) -> None:
    if not host:
        raise ConfigError(f"{var} is empty.")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(
        label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
        for label in labels
    ):
        raise ConfigError(f"{var}={host!r} is neither an IP address nor a host name.")


def check_cookie(cookie: str, allow_weak: bool = False) -> None:
    """Refuse a cookie that is not UTF-8, or (unless allowed) too short or guessable."""
    try:
        cookie.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            "RELEASE_COOKIE is not valid UTF-8: generate one with `shoal cookie`."
        ) from None
    weakness = crypto.cookie_weakness(cookie)
    if weakness is not None and not allow_weak:
        raise ConfigError(
            f"RELEASE_COOKIE is too weak: {weakness}. Use a random secret of at least "
            f"{crypto.MIN_COOKIE_LENGTH} characters: `shoal cookie` prints one."
        )


def _check_node_host(var: str, host: str) -> None:
    """An address to bind and advertise: one host, not a wildcard, broadcast or group."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name, checked by _check_host
    if address.is_unspecified or address.is_multicast or host == "255.255.255.255":
        raise ConfigError(
            f"{var}={host}: peers must be able to dial this address; use this host's own "
            "address, not a wildcard, broadcast or multicast one."
        )


def _check_multicast(var: str, text: str) -> None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{var}={text!r} is not an IP address.") from None
    if not address.is_multicast or address.version != 4:  # gossip's sockets are IPv4
        raise ConfigError(f"{var}={text}: expected an IPv4 multicast group (224.0.0.0/4).")


def _lease_dsn(env: Mapping[str, str]) -> str | None:
    """SHOAL_LEASE_DSN: the Postgres of lease mode and of the job store (one setting);
    SHOAL_JOB_STORE_DSN, its earlier name in `hi`, is read as an alias."""
    lease, alias = env.get("SHOAL_LEASE_DSN") or None, env.get("SHOAL_JOB_STORE_DSN") or None
    if lease and alias and lease != alias:
        raise ConfigError(
            "SHOAL_JOB_STORE_DSN is an alias of SHOAL_LEASE_DSN and differs from it: set one."
        )
    return lease or alias


def _check_dsn(var: str, dsn: str) -> None:
    import urllib.parse  # here: only a DSN needs it

    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or not (parts.netloc or parts.query):
        raise ConfigError(f"{var}: expected a URL like postgresql://user:password@host/db.")


def _flag(env: Mapping[str, str], var: str) -> bool:
    text = (env.get(var) or "").strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{var}={text!r}: expected 1 or 0.")


def _check_port(var: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{var}={port}: a port is between 1 and 65535.")


def _parse_int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{var}={text!r} is not a whole number.") from None


def _int(env: Mapping[str, str], var: str, default: int) -> int:
    text = env.get(var)
    value = default if not text else _parse_int(var, text)
    if var.endswith("PORT"):
        _check_port(var, value)
    return value


def _ms(env: Mapping[str, str], var: str, default_ms: int, least: int = 1) -> float:
    value = _int(env, var, default_ms)
    if not least <= value <= MAX_MS:
        raise ConfigError(
            f"{var}={value}: expected a number of milliseconds from {least} to {MAX_MS}"
            + (f" ({value} s is {value * 1000})." if 0 < value < least else ".")
        )
    return value / 1000.0
