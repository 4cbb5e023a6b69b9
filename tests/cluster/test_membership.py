"""Membership with real `hi` processes: mesh forming, DNS polling, failures, leaving."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.support.dns_server import LocalDNSServer
from tests.support.hi import HiNode, hosts_list, time_until
from tests.support.procs import Procs, wait_until


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as running:
        yield running


def static_env(hosts: list[str]) -> dict[str, str]:
    return {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list(hosts)}


def start_static(procs: Procs, hosts: list[str]) -> list[HiNode]:
    nodes = [HiNode.start(procs, h, env=static_env(hosts)) for h in hosts]
    for node in nodes:
        node.wait_ready()
    return nodes


def test_five_static_nodes_form_a_full_mesh(procs: Procs) -> None:
    hosts = [f"127.0.40.{i}" for i in range(2, 7)]
    nodes = start_static(procs, hosts)
    for node in nodes:
        node.wait_nodes([n.name for n in nodes if n is not node])


def test_sigkilled_node_is_down_for_its_peers_within_one_second(procs: Procs) -> None:
    hosts = [f"127.0.41.{i}" for i in range(2, 5)]
    a, b, c = start_static(procs, hosts)
    a.wait_nodes([b.name, c.name])
    b.wait_nodes([a.name, c.name])
    c.proc.kill()
    elapsed = time_until(lambda: c.name not in a.nodes() and c.name not in b.nodes(), 1.0)
    assert elapsed < 1.0


def test_sigtermed_node_is_gone_for_its_peers_within_half_a_second(procs: Procs) -> None:
    hosts = [f"127.0.42.{i}" for i in range(2, 5)]
    a, b, c = start_static(procs, hosts)
    a.wait_nodes([b.name, c.name])
    b.wait_nodes([a.name, c.name])
    c.proc.signal(signal.SIGTERM)
    elapsed = time_until(lambda: c.name not in a.nodes() and c.name not in b.nodes(), 0.5)
    assert elapsed < 0.5
    assert c.proc.wait(10) == 0


def test_wrong_cookie_node_never_joins_and_is_logged(procs: Procs) -> None:
    hosts = ["127.0.43.2", "127.0.43.3", "127.0.43.4"]
    a, b = start_static(procs, hosts[:2])
    wrong = "intruder-cookie-0a1b2c3d4e5f60718293"
    intruder = HiNode.start(procs, hosts[2], env={**static_env(hosts), "RELEASE_COOKIE": wrong})
    intruder.wait_ready()
    a.wait_nodes([b.name])
    # The good nodes log the failed handshakes with the intruder's address.
    wait_until(
        lambda: "127.0.43.4" in a.proc.output() and "cookie" in a.proc.output(),
        5.0,
        message="wrong cookie logged",
    )

    def refusals() -> int:
        """Handshakes with the intruder that `a` logged as failed: one or two per round."""
        return sum(
            "127.0.43.4" in line and "cookie" in line for line in a.proc.output().splitlines()
        )

    seen = refusals()
    # Several discovery rounds later (each one a new refused handshake) it is still outside.
    wait_until(lambda: refusals() >= seen + 4, 10.0, message="four more refused handshakes")
    assert intruder.nodes() == []
    assert a.nodes() == [b.name]
    assert "wrong" not in a.proc.output().replace("wrong cookie", "").replace("is wrong", "")


def test_a_request_waiting_on_one_node_gets_the_event_published_on_another(
    procs: Procs,
) -> None:
    a, b = start_static(procs, ["127.0.44.2", "127.0.44.3"])
    a.wait_nodes([b.name])
    result: dict[str, httpx.Response] = {}

    def wait_on_a() -> None:
        result["response"] = httpx.get(a.url + "/wait/order-42?timeout=10", timeout=15)

    waiter = threading.Thread(target=wait_on_a)
    waiter.start()
    # The webhook lands on B (the load balancer picked it); A's request gets it.
    wait_until(
        lambda: (
            httpx.post(b.url + "/event/order-42", json={"paid": True}, timeout=2).is_success
            and not waiter.is_alive()
        ),
        10.0,
        interval=0.2,
        message="event delivered",
    )
    waiter.join(5)
    response = result["response"]
    assert response.status_code == 200
    event = response.json()["event"]
    assert event["data"] == {"paid": True}
    assert event["from"] == b.name


def test_dns_polling_keeps_services_apart_and_survives_outages(procs: Procs) -> None:
    vegeta_hosts = ["127.0.45.2", "127.0.45.3"]
    krillin_hosts = ["127.0.45.4", "127.0.45.5"]
    late = "127.0.45.6"
    with LocalDNSServer() as dns:
        # One name for all four tasks, as the seed's single Cloud Map service had.
        dns.set_records("app.ecs.local", [*vegeta_hosts, *krillin_hosts])

        def env() -> dict[str, str]:
            return {
                "TOPOLOGY_TYPE": "dns",
                "SERVICE_DISCOVERY_ENDPOINT": "app.ecs.local",
                "SHOAL_DNS_SERVER": dns.address_text,
                "POLLING_INTERVAL": "200",
            }

        vegeta = [HiNode.start(procs, h, basename="vegeta", env=env()) for h in vegeta_hosts]
        krillin = [HiNode.start(procs, h, basename="krillin", env=env()) for h in krillin_hosts]
        for node in vegeta + krillin:
            node.wait_ready()
        vegeta[0].wait_nodes([vegeta[1].name])
        vegeta[1].wait_nodes([vegeta[0].name])
        krillin[0].wait_nodes([krillin[1].name])
        krillin[1].wait_nodes([krillin[0].name])

        # A new task's record appears: it joins its own service only.
        newcomer = HiNode.start(procs, late, basename="vegeta", env=env())
        newcomer.wait_ready()
        dns.set_records("app.ecs.local", [*vegeta_hosts, *krillin_hosts, late])
        vegeta[0].wait_nodes([vegeta[1].name, newcomer.name])
        newcomer.wait_nodes([n.name for n in vegeta])

        # Outages: nobody is disconnected while DNS fails in any way.
        everyone = [*vegeta, newcomer, *krillin]
        before = {n.name: n.nodes() for n in everyone}
        for mode in ("servfail", "timeout"):
            dns.set_mode(mode)
            queries = dns.query_count()
            wait_until(lambda q=queries: dns.query_count() >= q + 2 * len(everyone), 10.0)
            assert {n.name: n.nodes() for n in everyone} == before, mode
        dns.set_mode("ok")
        dns.remove("app.ecs.local")  # NXDOMAIN
        queries = dns.query_count()
        wait_until(lambda: dns.query_count() >= queries + 2 * len(everyone), 10.0)
        assert {n.name: n.nodes() for n in everyone} == before
