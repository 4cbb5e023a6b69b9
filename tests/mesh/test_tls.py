"""Mutual TLS on the mesh (SHOAL_TLS_CERT/KEY/CA): peers are verified by the CA.

Certificates are made at test time. Nodes with certificates from the cluster's
CA form a mesh; a node whose certificate comes from another CA, or that speaks
plain TCP, never joins, in either direction, and the TLS node logs it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

import pytest

from shoal.node import Node
from tests.mesh.certs import CA
from tests.mesh.conftest import NodeFactory, peer_of
from tests.support.procs import async_wait_until

HANDSHAKE_TIMEOUT = 1.0
# The mesh's TLS upgrade needs asyncio's loop (shoal.loop.TLS_REASON).
pytestmark = pytest.mark.asyncio_loop


@pytest.fixture
def cluster_ca(tmp_path: Path) -> CA:
    return CA.create(tmp_path, "cluster-ca")


@pytest.fixture(autouse=True)
def mesh_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="shoal")
    return caplog


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def tls_node(
    make_node: NodeFactory, hosts: object, ca: CA, tmp_path: Path, **kwargs: object
) -> Node:
    host = hosts()  # type: ignore[operator]
    return await make_node(
        host=host, tls=ca.issue(tmp_path, host), handshake_timeout=HANDSHAKE_TIMEOUT, **kwargs
    )


async def test_nodes_with_the_clusters_ca_form_a_mesh_over_tls(
    make_node: NodeFactory, hosts: object, cluster_ca: CA, tmp_path: Path
) -> None:
    a = await tls_node(make_node, hosts, cluster_ca, tmp_path)
    b = await tls_node(make_node, hosts, cluster_ca, tmp_path, peers=[peer_of(a)])
    c = await tls_node(make_node, hosts, cluster_ca, tmp_path, peers=[peer_of(b)])
    await async_wait_until(
        lambda: all(len(n.nodes()) == 2 for n in (a, b, c)), timeout=5, message="full mesh"
    )
    a.register("echo", lambda payload, _sender: payload)
    assert await c.call(a.name, "echo", {"over": "tls"}) == {"over": "tls"}
    assert b.mesh is not None
    conn = b.mesh.connection_to(a.name)
    assert conn.transport is not None
    assert conn.transport.get_extra_info("ssl_object") is not None  # really TLS


async def test_a_node_with_another_cas_certificate_is_refused(
    make_node: NodeFactory,
    hosts: object,
    cluster_ca: CA,
    tmp_path: Path,
    mesh_logs: pytest.LogCaptureFixture,
) -> None:
    good = await tls_node(make_node, hosts, cluster_ca, tmp_path)
    rogue_ca = CA.create(tmp_path, "rogue-ca")
    # Same cookie: only the certificate is wrong.
    rogue = await tls_node(make_node, hosts, rogue_ca, tmp_path, peers=[peer_of(good)])
    assert good.mesh is not None
    good.mesh.propose([peer_of(rogue)])

    def logged() -> bool:
        found = warnings(mesh_logs)
        inbound = any("TLS handshake failed" in w and "dropping" in w for w in found)
        outbound = any(
            f"TLS handshake with {rogue.name} at {rogue.settings.host}:{rogue.settings.port}" in w
            for w in found
        )
        return inbound and outbound

    await async_wait_until(logged, timeout=5, message="both TLS failures logged")
    assert good.nodes() == [] and rogue.nodes() == []


async def test_a_plain_tcp_node_cannot_join_a_tls_node(
    make_node: NodeFactory,
    hosts: object,
    cluster_ca: CA,
    tmp_path: Path,
    mesh_logs: pytest.LogCaptureFixture,
) -> None:
    secure = await tls_node(make_node, hosts, cluster_ca, tmp_path)
    plain = await make_node([peer_of(secure)], handshake_timeout=HANDSHAKE_TIMEOUT)
    assert secure.mesh is not None
    secure.mesh.propose([peer_of(plain)])

    def logged() -> bool:
        found = warnings(mesh_logs)
        # The TLS node, dialed in plain TCP: the HELLO is no TLS ClientHello.
        inbound = any("dropping" in w and "TLS handshake failed" in w for w in found)
        # The TLS node dialing the plain one: its ClientHello is no frame for the plain node.
        plain_drops = any("dropping" in w and "exceeds the limit" in w for w in found)
        return inbound and plain_drops

    await async_wait_until(logged, timeout=5, message="both refusals logged")
    assert secure.nodes() == [] and plain.nodes() == []


async def test_silent_and_garbage_clients_are_dropped_before_tls_completes(
    make_node: NodeFactory, hosts: object, cluster_ca: CA, tmp_path: Path
) -> None:
    node = await tls_node(make_node, hosts, cluster_ca, tmp_path)
    started = time.monotonic()
    silent_reader, silent_writer = await asyncio.open_connection(
        node.settings.host, node.settings.port
    )
    garbage_reader, garbage_writer = await asyncio.open_connection(
        node.settings.host, node.settings.port
    )
    garbage_writer.write(b"\x16\x03\x01" + bytes(range(256)) * 4)

    async def closed(reader: asyncio.StreamReader) -> float:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 2):
            try:
                while await reader.read(4096):
                    pass
            except ConnectionResetError:
                pass
        return time.monotonic() - started

    silent_after, garbage_after = await asyncio.gather(
        closed(silent_reader), closed(garbage_reader)
    )
    silent_writer.close()
    garbage_writer.close()
    assert garbage_after < HANDSHAKE_TIMEOUT
    assert HANDSHAKE_TIMEOUT * 0.9 <= silent_after <= HANDSHAKE_TIMEOUT + 1.0
    assert node.mesh is not None
    await async_wait_until(lambda: node.mesh.admission.total == 0, timeout=2)  # type: ignore[union-attr]


async def test_a_client_without_a_certificate_is_refused(
    make_node: NodeFactory, hosts: object, cluster_ca: CA, tmp_path: Path
) -> None:
    node = await tls_node(make_node, hosts, cluster_ca, tmp_path)
    context = ssl.create_default_context(cafile=str(cluster_ca.path))
    context.check_hostname = False
    # TLS 1.3 reports the missing client certificate after the handshake, on read.
    with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection(
            node.settings.host, node.settings.port, ssl=context
        )
        try:
            await asyncio.wait_for(reader.readexactly(1), HANDSHAKE_TIMEOUT + 1)
        finally:
            writer.close()


async def test_the_ca_chain_is_verified_not_the_address_a_certificate_names(
    make_node: NodeFactory, hosts: object, cluster_ca: CA, tmp_path: Path
) -> None:
    """Peers are dialed by IP: one certificate shared by every node (issued for some other
    address, as with a certificate in a shared secret) is enough, if our CA signed it."""
    shared = cluster_ca.issue(tmp_path, "10.9.9.9")
    a = await make_node(host=hosts(), tls=shared)  # type: ignore[operator]
    b = await make_node(host=hosts(), tls=shared, peers=[peer_of(a)])  # type: ignore[operator]
    await async_wait_until(
        lambda: a.name in b.nodes() and b.name in a.nodes(), timeout=5, message="connected"
    )
