"""The mesh: one authenticated connection per node pair, failure detection, membership.

Discovery proposes addresses; the mesh dials them, accepts inbound
connections, keeps exactly one connection per peer, and emits node-up and
node-down events. Frames after the handshake go to the `on_frame` callback
(the messaging layer).

Simultaneous dials are resolved deterministically: when two nodes dial each
other at once, the connection dialed by the node with the smaller name wins,
and both sides reach the same decision without another round trip.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

from shoal import admission, crypto, wire
from shoal.config import ConfigError, Peer, Settings, join_host_port, split_node_name
from shoal.loop import BusyPoll
from shoal.metrics import MeshStats

log = logging.getLogger("shoal.mesh")

# Caps on unauthenticated connections (total, per address): see shoal.admission.
MAX_PENDING_HANDSHAKES = admission.MAX_PENDING_HANDSHAKES
MAX_PENDING_HANDSHAKES_PER_HOST = admission.MAX_PENDING_HANDSHAKES_PER_HOST
# Write buffer above which senders wait (`drain`) instead of queueing more.
WRITE_HIGH_WATER = 4 * 1024 * 1024
# Frames queued in one loop iteration are written together, in writes of about
# this size at most: large enough to batch small messages, small enough for the
# peer to start decoding while we still encode.
WRITE_BATCH = 64 * 1024
# Bytes an unauthenticated peer may have buffered before we stop reading from it:
# one maximal handshake frame and its header.
HANDSHAKE_BUFFER = wire.MAX_HANDSHAKE_FRAME + wire.HEADER.size
LISTEN_BACKLOG = 512
CLOSED_DURING_HANDSHAKE = "connection closed during handshake"
# Several nodes per host: a port of the range where no node of ours answered
# (refused, or another node) is probed again after 1 s, then 2, 4, ... up to
# this; a newcomer dials everybody itself, so the back-off delays no join.
MAX_PROBE_BACKOFF = 30.0
# (host, port) pairs remembered for the back-off; more are forgotten at once.
MAX_PROBE_BACKOFF_ENTRIES = 4096


@dataclass(frozen=True)
class MembershipEvent:
    """A peer came up or went down. `reason` says why it went down."""

    kind: str  # "up" or "down"
    node: str
    reason: str = ""


class NodeDown(ConnectionError):
    """The peer is not connected (or the connection was lost while waiting)."""


class WrongNode(wire.HandshakeError):
    """The dialed address is another node than the one expected."""


class ClaimedPort(NamedTuple):
    """A listening socket on the port a node claimed, and the process that claimed it."""

    sock: socket.socket
    pid: int


def claim_port(settings: Settings) -> tuple[Settings, ClaimedPort | None]:
    """Several nodes per host: listen on the first free port of `settings.ports`.

    The node's name depends on its port, so the port is claimed when the node
    is made, not when it starts. Bind plus listen is atomic between processes
    (one socket listens on a port), so workers started at once get distinct
    ports and names. With one node per host (the default) nothing happens
    here: `Mesh.start` binds SHOAL_PORT as it always did.
    """
    if settings.nodes_per_host == 1 or settings.own_port:
        return settings, None
    try:
        family, _, _, _, address = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM
        )[0]
    except OSError as exc:
        raise ConfigError(f"NODE_HOST={settings.host!r} cannot be resolved: {exc}") from None
    for port in settings.ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address[0], port, *address[2:]))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(
                f"cannot listen on {join_host_port(settings.host, port)} for the mesh "
                f"({exc.strerror}): is NODE_HOST an address of this host?"
            ) from None
        sock.setblocking(False)
        return replace(settings, own_port=port), ClaimedPort(sock, os.getpid())
    last = settings.port + settings.nodes_per_host - 1
    raise ConfigError(
        f"SHOAL_NODES_PER_HOST={settings.nodes_per_host}: every mesh port "
        f"{settings.port}-{last} on {settings.host} is in use (that many nodes already run "
        "on this host?); raise SHOAL_NODES_PER_HOST on every node of the cluster."
    )


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to a peer, framing included.

    Until the handshake is done, received bytes stay in the decoder and the
    handshake task takes frames one at a time (`next_handshake_frame`); reading
    pauses while more than one handshake frame is buffered, so an
    unauthenticated peer cannot make us hold more than a few KiB. Frames that
    arrive right behind the last handshake frame (the peer's first messages)
    stay buffered too and are dispatched when the connection is established.
    """

    def __init__(
        self, mesh: Mesh, dialed: bool, expected: str | None = None, tls_pending: bool = False
    ) -> None:
        self.mesh = mesh
        self.dialed = dialed
        self.expected = expected
        self.peer_name: str | None = None
        self.claimed_name: str | None = None  # from HELLO, before it is authenticated
        self.peer_host = ""
        self.peer_port = 0
        self.peer_incarnation = b""
        self.address = "?"
        self.established = False
        self.leaving = False
        self.evicted = False  # its handshake slot went to another connection
        self.transport: asyncio.Transport | None = None
        self.decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
        loop = asyncio.get_running_loop()
        self.made = loop.create_future()
        self.closed = loop.create_future()
        self._tls_pending = tls_pending
        self._handshake_data = asyncio.Event()
        self._reading_paused = False
        self.last_received = time.monotonic()
        self.last_sent = time.monotonic()
        self._out: list[bytes] = []
        self._out_size = 0
        self._loop = loop
        self._flush_scheduled = False
        # A frame may go out at once, in its own write, when nothing is queued and
        # no frame went out that way since the loop last came by (`_flush`, or bytes
        # received); the frames after it in the same loop iteration are batched.
        self._direct = True
        self._receiving = False  # dispatching received frames: hold replies for one write
        self._stats = mesh.stats
        self._poke = mesh.busy_poll.poke
        self._max_send_buffer = mesh.settings.max_send_buffer
        self._writable = asyncio.Event()
        self._writable.set()
        #: A sender must wait (`drain`): the peer is behind, or the connection is lost.
        self.blocked = False
        self.paused_since: float | None = None  # monotonic; while the peer is behind
        self.drop_reason: str | None = None
        # AES-GCM records after the handshake (None: plaintext frames, e.g. under TLS).
        self._sealer: crypto.Sealer | None = None
        self._opener: crypto.Opener | None = None

    # asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self.set_transport(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.address = f"{peer[0]}:{peer[1]}"
        if self._tls_pending:
            # Not a byte may reach us before TLS is layered on (`Mesh._start_tls`).
            transport.pause_reading()
        if not self.made.done():
            self.made.set_result(None)

    def set_transport(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        size = len(data)
        self._stats.bytes_received += size
        if not self.established:
            self.decoder.append(data)
            if self.decoder.pending > HANDSHAKE_BUFFER and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            self._handshake_data.set()
            return
        self._direct = True
        if size < wire.GC_PAUSE_FROM:  # the common small read: no GC pause needed
            self._receive(data)
        else:
            # Decoded and handled with the GC paused, so a frame of many small
            # objects costs one pass over them, not one collection per 700.
            with wire.gc_paused(size):
                self._receive(data)
        if self._out:
            self._write_out()

    def _receive(self, data: bytes) -> None:
        try:
            if self._opener is not None:
                data = self._opener.open(data)
            frames = self.decoder.feed(data)
        except (wire.FrameError, crypto.AuthenticationError) as exc:
            self.mesh.report_bad_peer(self, str(exc))
            self.abort()
            return
        # Replies to what we read are queued (`send_encoded`) and go out in one
        # write (one record) at the end of `data_received`, rather than one loop
        # iteration later: a call's round trip is shorter.
        self._receiving = True
        try:
            self._dispatch(frames)
        finally:
            self._receiving = False

    def _dispatch(self, frames: list[Any]) -> None:
        self._stats.frames_received += len(frames)
        mesh = self.mesh
        on_message = mesh._on_frame
        calls = False
        for frame in frames:
            try:
                # Messages go straight to messaging (`Mesh.dispatch` routes the rest).
                if type(frame) is list and frame and type(frame[0]) is int:
                    kind = frame[0]
                    if kind in wire.PAYLOAD_KINDS:
                        calls = calls or kind == wire.CALL
                        on_message(self.peer_name, frame)  # type: ignore[arg-type]
                        continue
                mesh.dispatch(self, frame)
            except wire.FrameError as exc:
                mesh.report_bad_peer(self, str(exc))
                self.abort()
                return
        if calls:  # the caller's next call may follow within µs
            self._poke()

    def connection_lost(self, exc: Exception | None) -> None:
        self.blocked = True
        if not self.closed.done():
            self.closed.set_result(None)
        self._handshake_data.set()
        self._writable.set()
        self.mesh.connection_closed(self)

    def pause_writing(self) -> None:
        self._writable.clear()
        self.blocked = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self._writable.set()
        self.blocked = self.closed.done()
        self.paused_since = None

    # sending ---------------------------------------------------------------
    def send(self, frame: Any) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write."""
        self.send_encoded(wire.encode_frame(frame))

    def send_encoded(self, data: bytes) -> None:
        if self._direct and not self._receiving and not self._out:
            # A lone frame (a call, a reply sent from a task) goes out at once,
            # with nothing scheduled: the next read or `_flush` allows the next one.
            self._direct = False
            self._write(data)
            return
        # The frames that follow it in the same loop iteration are batched into
        # one write (one record, one seal, when encrypted) by `_flush`. Frames
        # queued while received frames are dispatched (replies) go out together
        # at the end of `data_received`.
        self._out.append(data)
        self._out_size += len(data)
        if not self._flush_scheduled and not self._receiving:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._out_size >= WRITE_BATCH:
            # A sender that does not yield must not queue without bound: write
            # now, so the transport's flow control (`drain`) applies, and the
            # peer can start reading while we go on.
            self._write_out()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._direct = True
        self._write_out()

    def _write_out(self) -> None:
        out = self._out
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0], len(out))
        out.clear()
        self._out_size = 0

    def _write(self, data: bytes, frames: int = 1) -> None:
        """Hand `frames` frames to the transport, sealed into records when encryption is on."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        stats = self._stats  # counted here, once a batch rather than once a frame
        stats.frames_sent += frames
        stats.bytes_sent += len(data)
        sealer = self._sealer
        if sealer is None:
            transport.write(data)
        elif len(data) < crypto.SMALL_RECORD:
            transport.write(sealer.seal_small(data))  # one bytes: cheaper than writelines
        else:
            transport.writelines(sealer.seal(data))
        self.last_sent = time.monotonic()
        if self.established and transport.get_write_buffer_size() > self._max_send_buffer:
            # A peer this far behind is not reading: our memory is not its queue.
            self.drop(
                f"it has not read {transport.get_write_buffer_size()} bytes "
                f"(limit {self._max_send_buffer})"
            )

    def drop(self, why: str) -> None:
        """Abort a peer that is alive but not reading; it is down as soon as the loop runs."""
        self.drop_reason = "not reading"
        log.warning("dropping %s at %s: %s", self.peer_name, self.address, why)
        self.abort()

    async def drain(self) -> None:
        """Wait while the peer is slower than us (bounded memory for senders)."""
        if self._writable.is_set() and not self.closed.done():
            return
        await self._writable.wait()
        if self.closed.done():
            raise NodeDown(f"{self.peer_name} is down")

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reject(self, reason: str) -> None:
        """Tell an unauthenticated peer why the handshake failed, then close."""
        self.send_handshake(wire.reject(reason))
        self.close()

    def send_handshake(self, frame: Any) -> None:
        """Write a handshake frame now, in plaintext, ahead of anything sealed later."""
        self._write_out()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.encode_frame(frame))
            self.last_sent = time.monotonic()

    def secure(self, send_key: bytes, receive_key: bytes) -> None:
        """From now on every byte sent and received is an AES-GCM record."""
        self._sealer = crypto.Sealer(send_key)
        self._opener = crypto.Opener(receive_key)

    # handshake -------------------------------------------------------------
    async def next_handshake_frame(self) -> Any:
        """The next frame of the handshake; HandshakeError if the peer sends junk or leaves."""
        while True:
            try:
                frames = self.decoder.feed(max_frames=1)
            except wire.FrameError as exc:
                raise wire.HandshakeError(str(exc)) from None
            if frames:
                if self._reading_paused and self.decoder.pending <= HANDSHAKE_BUFFER:
                    self._resume_reading()
                return frames[0]
            if self.closed.done():
                raise wire.HandshakeError(CLOSED_DURING_HANDSHAKE)
            self._handshake_data.clear()
            await self._handshake_data.wait()

    def finish_handshake(self, max_frame_size: int) -> None:
        """Switch to established mode and deliver what arrived behind the handshake."""
        self.decoder.max_size = max_frame_size
        self.established = True
        self.last_received = time.monotonic()
        if self._reading_paused:
            self._resume_reading()
        if self.decoder.pending:
            try:
                if self._opener is not None:
                    frames = self.decoder.feed(self._opener.open(self.decoder.take_pending()))
                else:
                    frames = self.decoder.feed()
            except (wire.FrameError, crypto.AuthenticationError) as exc:
                self.mesh.report_bad_peer(self, str(exc))
                self.abort()
                return
            self._dispatch(frames)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Mesh:
    """All connections of one node. Owned by `shoal.Node`."""

    def __init__(
        self,
        settings: Settings,
        on_frame: Callable[[str, list[Any]], None],
        on_event: Callable[[MembershipEvent], None],
        claimed: ClaimedPort | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._claimed = claimed  # the listening socket of `claim_port`, used by `start`
        # Several nodes per host: (host, port) -> (no probe before, last delay).
        self._probe_backoff: dict[tuple[str, int], tuple[float, float]] = {}
        self.incarnation = wire.new_incarnation()
        self._key = b""  # wire.cookie_key(cookie), computed off the loop by `start`
        self._on_frame = on_frame
        self._on_event = on_event
        self.connections: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Task[None]] = {}
        self._superseded: set[str] = set()
        self.admission = admission.HandshakeAdmission()
        self._bad_peer_logged = -1.0
        self._bad_peer_quiet = 0
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._server_ssl, self._client_ssl = _tls_contexts(settings)
        self.stats = MeshStats()  # read by shoal.metrics at scrape time
        self.busy_poll = BusyPoll(settings.busy_poll)
        # TLS already encrypts; otherwise AES-GCM records, unless turned off (benchmarks).
        self._encrypt = settings.tls is None and settings.mesh_encryption

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # scrypt takes tens of ms (more on a loaded machine); in a thread it does
        # not stall other nodes or an app sharing this loop. Cached afterwards.
        self._key = await asyncio.to_thread(wire.cookie_key, self.settings.cookie)
        # TLS is layered on in the handshake task (`_start_tls`), so that its
        # deadline, the pending-handshake cap and the bad-peer log cover the TLS
        # handshake too.
        claimed, self._claimed = self._claimed, None
        if claimed is not None:
            if claimed.pid != os.getpid():
                claimed.sock.close()  # this process's copy; the claiming process keeps its own
                raise OSError(
                    errno.EADDRINUSE,
                    f"{self.name} claimed its mesh port in process {claimed.pid}, not in this "
                    "one (forked after the Node was made, e.g. gunicorn --preload?): make "
                    "the Node in each worker process",
                )
            self._server = await loop.create_server(
                lambda: self._accepted(), sock=claimed.sock, backlog=LISTEN_BACKLOG
            )
        else:
            try:
                self._server = await loop.create_server(
                    lambda: self._accepted(),
                    host=self.settings.host,
                    port=self.settings.listen_port,
                    reuse_address=True,
                    backlog=LISTEN_BACKLOG,
                )
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot listen on {self.settings.host}:{self.settings.listen_port} for "
                    f"the mesh ({exc.strerror}); is another node using "
                    f"SHOAL_PORT={self.settings.listen_port} on this NODE_HOST?",
                ) from None
        self._ticker = asyncio.create_task(self._tick(), name="shoal-mesh-heartbeat")

    async def stop(self) -> None:
        """Tell every peer we are leaving, then close all connections."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task in [*self._dialing.values(), *self._tasks]:
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        conns = list(self.connections.values())
        for conn in conns:
            conn.send([wire.LEAVING])
            conn.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=1.0)
        for conn in conns:
            conn.abort()

    @property
    def dialing(self) -> bool:
        """True while a dial is in progress (the first round's dials settle before claims)."""
        return bool(self._dialing)

    @property
    def peers(self) -> list[str]:
        return sorted(self.connections)

    # discovery entry point -------------------------------------------------
    def propose(self, peers: Iterable[Peer], *, known: bool = False) -> None:
        """Dial every proposed peer we are not connected (or connecting) to.

        `known`: a node is there (a peer's member list says so, or the app asks
        `connect`); discovery's proposals of a range's ports are probes, backed
        off where no node of ours answered (`_probe_failed`).
        """
        if self._stopping:
            return
        now = time.monotonic()
        for peer in peers:
            if peer.basename != self.settings.name_query or peer.name == self.name:
                continue
            if peer.name in self.connections or peer.name in self._dialing:
                continue
            backoff = self._probe_backoff.get((peer.host, peer.port))
            if backoff is not None and not known and now < backoff[0]:
                continue
            if len(self._dialing) >= admission.MAX_CONCURRENT_DIALS:
                log.debug(
                    "%d dials in progress; %s waits for a later round",
                    len(self._dialing),
                    peer.name,
                )
                break
            task = asyncio.create_task(self._dial(peer), name=f"shoal-dial-{peer.name}")
            self._dialing[peer.name] = task
            task.add_done_callback(functools.partial(self._dial_done, peer.name))

    # sending ---------------------------------------------------------------
    def connection_to(self, node: str) -> Connection:
        conn = self.connections.get(node)
        if conn is None:
            raise NodeDown(f"{node} is not connected")
        return conn

    def broadcast(self, frame: Any) -> None:
        if not self.connections:
            return
        data = wire.encode_frame(frame)
        for conn in self.connections.values():
            conn.send_encoded(data)

    # dialing ---------------------------------------------------------------
    def _dial_done(self, name: str, _task: asyncio.Task[None]) -> None:
        self._dialing.pop(name, None)

    async def _dial(self, peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.settings.handshake_timeout) as deadline:
                connect_by = loop.time() + self.settings.connect_timeout
                deadline.reschedule(min(connect_by, deadline.when() or connect_by))
                _, conn = await loop.create_connection(
                    lambda: Connection(self, dialed=True, expected=peer.name),
                    host=peer.host,
                    port=peer.port,
                    # From our own address, so peers log and see who we are.
                    local_addr=(self.settings.host, 0),
                    ssl=self._client_ssl,
                    server_hostname=peer.host if self._client_ssl else None,
                    ssl_handshake_timeout=(
                        self.settings.handshake_timeout if self._client_ssl else None
                    ),
                )
                deadline.reschedule(loop.time() + self.settings.handshake_timeout)
                await self._dialer_handshake(conn, peer)
        except (OSError, TimeoutError, wire.HandshakeError) as exc:
            if conn is not None and conn.transport is not None:
                if not conn.transport.is_closing():
                    conn.abort()
            where = f"{peer.name} at {peer.host}:{peer.port}"
            probing = self.settings.nodes_per_host > 1
            if probing and isinstance(exc, ConnectionRefusedError | WrongNode):
                self._probe_failed(peer)
            if isinstance(exc, wire.HandshakeError) and "duplicate" in str(exc):
                log.debug("dial to %s superseded by its own dial", peer.name)
            elif probing and isinstance(exc, WrongNode):
                log.debug("probe of %s: %s", where, exc)  # a node of another service
            elif isinstance(exc, wire.HandshakeError):
                self.stats.handshake_failed(str(exc))
                log.warning("handshake with %s failed: %s", where, exc, extra={"peer": peer.name})
            elif isinstance(exc, ssl.SSLError):
                self.stats.handshake_failed("tls")
                log.warning("TLS handshake with %s failed: %s", where, exc)
            else:
                log.debug("cannot reach %s: %r", where, exc)
        else:
            self._probe_backoff.pop((peer.host, peer.port), None)
        finally:
            self._superseded.discard(peer.name)

    def _probe_failed(self, peer: Peer) -> None:
        """No node of ours at this port of the range: probe it less often."""
        if len(self._probe_backoff) >= MAX_PROBE_BACKOFF_ENTRIES:
            self._probe_backoff.clear()  # forgetting costs only extra probes
        key = (peer.host, peer.port)
        _, delay = self._probe_backoff.get(key, (0.0, 0.5))
        delay = min(2 * delay, MAX_PROBE_BACKOFF)
        self._probe_backoff[key] = (time.monotonic() + delay, delay)

    async def _dialer_handshake(self, conn: Connection, peer: Peer) -> None:
        hello = wire.Hello(
            wire.PROTOCOL_VERSION,
            self.name,
            self.settings.listen_port,
            self.incarnation,
            wire.new_nonce(),
            peer.name,
            self._encrypt,
        )
        conn.send_handshake(hello.to_wire())
        challenge = wire.parse_challenge(await conn.next_handshake_frame())
        if challenge.name != peer.name:
            conn.reject("wrong node")
            raise WrongNode(f"expected {peer.name}, found {wire.safe(challenge.name)}")
        conn.send_handshake(wire.make_proof(self._key, hello, challenge))
        wire.verify_welcome(self._key, hello, challenge, await conn.next_handshake_frame())
        if peer.name in self._superseded or peer.name in self.connections or self._stopping:
            conn.close()
            return
        if self._encrypt:
            to_acceptor, to_dialer = wire.session_keys(
                self._key, hello, challenge.name, challenge.incarnation, challenge.nonce
            )
            conn.secure(to_acceptor, to_dialer)
        self._establish(conn, challenge.name, challenge.incarnation, peer.host, peer.port)

    # accepting -------------------------------------------------------------
    def _accepted(self) -> Connection:
        conn = Connection(self, dialed=False, tls_pending=self._server_ssl is not None)
        task = asyncio.create_task(self._acceptor_handshake(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _acceptor_handshake(self, conn: Connection) -> None:
        await conn.made  # the task starts before the transport calls connection_made
        host = conn.address.rpartition(":")[0]
        task = asyncio.current_task()
        assert task is not None
        slot = self.admission.admit(host, conn.address, functools.partial(self._evict, conn, task))
        if slot is None:
            self.stats.handshake_failed("too many handshakes")
            conn.abort()
            return
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                if self._server_ssl is not None:
                    await self._start_tls(conn, self._server_ssl)
                await self._acceptor_steps(conn)
        except asyncio.CancelledError:
            if not conn.evicted:
                raise
            conn.abort()
        except TimeoutError:
            self.report_bad_peer(conn, "handshake did not finish in time")
            conn.abort()
        except (wire.HandshakeError, OSError) as exc:
            if isinstance(exc, wire.HandshakeError) and str(exc) == CLOSED_DURING_HANDSHAKE:
                log.debug("peer at %s left during the handshake", conn.address)
            else:
                self.report_bad_peer(conn, str(exc))
            if conn.transport is not None and not conn.transport.is_closing():
                conn.abort()
        finally:
            self.admission.release(slot)

    def _evict(self, conn: Connection, task: asyncio.Task[None]) -> None:
        """Admission gave this pending handshake's slot to a newcomer: drop it."""
        conn.evicted = True
        conn.abort()
        task.cancel()

    async def _start_tls(self, conn: Connection, context: ssl.SSLContext) -> None:
        assert conn.transport is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                conn.transport,
                conn,
                context,
                server_side=True,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except ConnectionResetError:
            # What a dialer that refuses our certificate looks like from here.
            raise wire.HandshakeError(
                "TLS handshake failed: the peer closed the connection (does it trust our CA?)"
            ) from None
        except OSError as exc:  # ssl.SSLError included
            raise wire.HandshakeError(f"TLS handshake failed: {exc}") from None
        if transport is None:
            raise wire.HandshakeError(CLOSED_DURING_HANDSHAKE)
        conn.set_transport(transport)

    async def _acceptor_steps(self, conn: Connection) -> None:
        try:
            hello = wire.parse_hello(await conn.next_handshake_frame())
        except wire.HandshakeError as exc:
            if "version" in str(exc):
                conn.reject("version")
            raise
        conn.claimed_name = hello.name
        nonce = wire.new_nonce()
        # Only our name and nonce: we prove nothing until the dialer has.
        conn.send_handshake(wire.make_challenge(self.name, self.incarnation, nonce))
        try:
            wire.verify_proof(
                self._key,
                hello,
                self.name,
                self.incarnation,
                nonce,
                await conn.next_handshake_frame(),
            )
        except wire.HandshakeError as exc:
            if "cookie proof" in str(exc):
                conn.reject("cookie")
            raise
        dialing = self._dialing.get(hello.name)
        if dialing is not None and self.name < hello.name:
            # Our own dial to this peer would win, but it may never get through (the
            # peer may be flooded): let it finish first, then decide. The peer does
            # not wait for us (it supersedes its dial), so this cannot deadlock;
            # bounded well inside our own deadline for this handshake.
            await asyncio.wait([dialing], timeout=self.settings.handshake_timeout / 2)
        basename = hello.name.partition("@")[0]
        host = self._host_of(hello)
        reason = None
        if hello.expected is not None and hello.expected != self.name:
            reason = "wrong node"
        elif basename != self.settings.name_query:
            reason = "basename not in cluster"
        elif host is None:
            reason = "name does not match its port (SHOAL_PORT or SHOAL_NODES_PER_HOST differ)"
        elif hello.encrypt != self._encrypt:
            reason = "encryption setting differs (SHOAL_TLS_* or mesh encryption)"
        elif self._stopping:
            reason = "stopping"
        else:
            reason = self._duplicate_check(hello)
        if reason is not None or host is None:
            reason = reason or "malformed name"
            log.debug("rejecting %s from %s: %s", hello.name, conn.address, reason)
            conn.reject(reason)
            return
        conn.send_handshake(wire.make_welcome(self._key, hello, self.name, self.incarnation, nonce))
        if self._encrypt:
            to_acceptor, to_dialer = wire.session_keys(
                self._key, hello, self.name, self.incarnation, nonce
            )
            conn.secure(to_dialer, to_acceptor)
        self._establish(conn, hello.name, hello.incarnation, host, hello.port)

    def _host_of(self, hello: wire.Hello) -> str | None:
        """The host in a dialer's name, if that is the name its port gives it (else None).

        `basename@host` on SHOAL_PORT (or with one node per host), else
        `basename@host:port`: the address a member list then spreads.
        """
        try:
            basename, host, _ = split_node_name(hello.name, hello.port)
        except ConfigError:
            return None
        return host if self.settings.peer(basename, host, hello.port).name == hello.name else None

    def _duplicate_check(self, hello: wire.Hello) -> str | None:
        """Decide whether an authenticated inbound connection may replace what we have."""
        existing = self.connections.get(hello.name)
        if existing is not None:
            restarted = existing.peer_incarnation != hello.incarnation
            stale = time.monotonic() - existing.last_received > 2 * self.settings.heartbeat_interval
            if existing.dialed and self.name < hello.name and not (restarted or stale):
                return "duplicate"
            return None
        dialing = self._dialing.get(hello.name)
        if dialing is not None:
            if self.name < hello.name:
                return "duplicate"  # our own dial wins; the peer drops its own
            self._supersede(hello.name)
        return None

    def _supersede(self, name: str) -> None:
        """Our pending dial to `name` lost to its dial to us; drop ours when it completes."""
        self._superseded.add(name)

    # membership ------------------------------------------------------------
    def _establish(
        self, conn: Connection, name: str, incarnation: bytes, host: str, port: int
    ) -> None:
        conn.peer_name = name
        conn.peer_incarnation = incarnation
        conn.peer_host = host
        conn.peer_port = port
        old = self.connections.get(name)
        self.connections[name] = conn
        if old is not None:
            old.close()
            self._on_event(MembershipEvent("down", name, "replaced"))
        log.info(
            "node up: %s (%s)", name, "dialed" if conn.dialed else "accepted", extra={"peer": name}
        )
        self._on_event(MembershipEvent("up", name))
        # Tell everybody about the new member so the mesh completes transitively,
        # then handle what the peer sent right behind its last handshake frame.
        self._announce_members()
        conn.finish_handshake(self.settings.max_frame_size)

    def connection_closed(self, conn: Connection) -> None:
        name = conn.peer_name
        if name is None or self.connections.get(name) is not conn:
            return
        del self.connections[name]
        reason = "leaving" if conn.leaving else (conn.drop_reason or "closed")
        log.info("node down: %s (%s)", name, reason, extra={"peer": name})
        self._on_event(MembershipEvent("down", name, reason))

    def _announce_members(self) -> None:
        members = [[c.peer_name, c.peer_host, c.peer_port] for c in self.connections.values()]
        members.append([self.name, self.settings.host, self.settings.listen_port])
        self.broadcast([wire.MEMBERS, members])

    def dispatch(self, conn: Connection, frame: Any) -> None:
        """Route one authenticated frame: membership here, the rest to messaging."""
        if type(frame) is not list or not frame or type(frame[0]) is not int:
            raise wire.FrameError("malformed message")
        kind = frame[0]
        if kind in wire.PAYLOAD_KINDS:
            self._on_frame(conn.peer_name, frame)  # type: ignore[arg-type]  # established
        elif kind == wire.HEARTBEAT:
            return
        elif kind == wire.MEMBERS:
            self._learn_members(frame)
        elif kind == wire.LEAVING:
            conn.leaving = True
            self.connection_closed(conn)
            conn.close()
        else:
            raise wire.FrameError("malformed message")

    def _learn_members(self, frame: list[Any]) -> None:
        """Dial the members a peer knows, within the dial policy (shoal.admission)."""
        if len(frame) != 2 or not isinstance(frame[1], list) or len(frame[1]) > 10_000:
            raise wire.FrameError("malformed MEMBERS")
        peers = []
        for item in frame[1][: admission.MAX_LEARNED_PEERS]:
            if (
                type(item) is list
                and len(item) == 3
                and type(item[0]) is str
                and type(item[1]) is str
                and type(item[2]) is int
                and item[2] in self.settings.ports  # our mesh ports, never another
            ):
                basename = item[0].partition("@")[0]
                peer = self.settings.peer(basename, item[1], item[2])
                if (
                    basename == self.settings.name_query
                    and peer.name == item[0]
                    and admission.learned_address_allowed(peer.host, self.settings.host)
                ):
                    peers.append(peer)
        self.propose(peers, known=True)

    def report_bad_peer(self, conn: Connection, why: str) -> None:
        """Log a dropped peer; unauthenticated ones at most once per second (floods)."""
        if conn.peer_name is not None:
            log.warning("dropping %s at %s: %s", conn.peer_name, conn.address, why)
            return
        if conn.claimed_name is not None:
            # Names in HELLO are printable without spaces (wire.parse_hello): safe to log.
            who = f"unauthenticated peer (claiming to be {conn.claimed_name})"
        else:
            who = "unauthenticated peer"
        if not conn.established:
            self.stats.handshake_failed(why)
        now = time.monotonic()
        if now - self._bad_peer_logged < 1.0:
            self._bad_peer_quiet += 1
            log.debug("dropping %s at %s: %s", who, conn.address, why)
            return
        quiet = self._bad_peer_quiet
        self._bad_peer_logged, self._bad_peer_quiet = now, 0
        more = f" ({quiet} more unauthenticated peers dropped in the last second)" if quiet else ""
        log.warning(
            "dropping %s at %s: %s%s", who, conn.address, why, more, extra={"peer": conn.peer_name}
        )

    # failure detection -----------------------------------------------------
    async def _tick(self) -> None:
        interval = self.settings.heartbeat_interval
        timeout = self.settings.failure_timeout
        heartbeat = wire.encode_frame([wire.HEARTBEAT])
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if now - conn.last_received > timeout:
                    log.warning(
                        "node %s silent for %.1f s: down",
                        conn.peer_name,
                        now - conn.last_received,
                        extra={"peer": conn.peer_name},
                    )
                    conn.abort()
                    self.connection_closed(conn)
                elif conn.paused_since is not None and now - conn.paused_since > timeout:
                    # As good as silent: it has been megabytes behind for as long,
                    # and senders awaiting `drain` must not wait for ever.
                    behind = now - conn.paused_since
                    conn.drop(f"it has not caught up with what we sent for {behind:.1f} s")
                elif now - conn.last_sent >= interval / 2:
                    conn.send_encoded(heartbeat)


def _tls_contexts(settings: Settings) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Mutual TLS: both sides present certificates signed by SHOAL_TLS_CA."""
    if settings.tls is None:
        return None, None
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.tls.ca)
    server.load_cert_chain(settings.tls.cert, settings.tls.key)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls.ca)
    client.load_cert_chain(settings.tls.cert, settings.tls.key)
    # Peers are addressed by IP; the certificate chain (our CA) is what is verified.
    client.check_hostname = False
    return server, client
