"""Several nodes per host (SHOAL_NODES_PER_HOST): names, settings, and what discovery proposes.

With one node per host (the default) every name, port and proposal is what it
always was; with N > 1 a host stands for the N ports SHOAL_PORT..SHOAL_PORT+N-1,
and a node on any but the first carries its port in its name.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from shoal.config import ConfigError, Peer, Settings, parse_hosts, split_node_name
from shoal.discovery.cloudmap import CloudMapStrategy
from shoal.discovery.dns import DNSPollStrategy
from shoal.discovery.gossip import GossipStrategy, encode_beacon, gossip_key
from shoal.discovery.static import StaticStrategy
from tests.discovery.test_gossip import beacon
from tests.support.dns_server import LocalDNSServer

COOKIE = "discovery-test-cookie-6b1f0e3a9c2d4e87"


def settings(**overrides: Any) -> Settings:
    return Settings(
        cookie=COOKIE, basename="hi", name_query="hi", host="10.0.0.1", topology="static"
    ).with_overrides(**overrides)


# -- names and settings -------------------------------------------------------------


def test_one_node_per_host_keeps_the_contract_names_and_port() -> None:
    env = {"RELEASE_COOKIE": COOKIE, "NODE_NAME": "vegeta", "NODE_HOST": "10.0.0.1"}
    s = Settings.from_env(env)
    assert (s.name, s.port, s.listen_port, s.nodes_per_host) == ("vegeta@10.0.0.1", 4370, 4370, 1)
    assert list(s.ports) == [4370]
    # Whatever port a peer is on, its name is basename@host, as before.
    assert s.peer("vegeta", "10.0.0.2", 4999) == Peer("vegeta", "10.0.0.2", 4999)
    assert s.peer("vegeta", "10.0.0.2", 4999).name == "vegeta@10.0.0.2"


def test_names_carry_the_port_on_the_other_ports_of_the_range() -> None:
    s = Settings.from_env(
        {"RELEASE_COOKIE": COOKIE, "NODE_HOST": "10.0.0.1", "SHOAL_NODES_PER_HOST": "4"}
    )
    assert s.nodes_per_host == 4 and list(s.ports) == [4370, 4371, 4372, 4373]
    assert s.name == "hi@10.0.0.1"  # on SHOAL_PORT: the classic name
    assert s.with_overrides(own_port=4372).name == "hi@10.0.0.1:4372"
    assert s.peer("hi", "10.0.0.2", 4370).name == "hi@10.0.0.2"
    assert s.peer("hi", "10.0.0.2", 4373).name == "hi@10.0.0.2:4373"
    assert s.peer("hi", "fd00::2", 4371).name == "hi@[fd00::2]:4371"
    # A port outside the range is a one-node-per-host peer (its own SHOAL_PORT).
    assert s.peer("hi", "10.0.0.2", 4374).name == "hi@10.0.0.2"
    # A name is a valid SHOAL_HOSTS entry, and parses back to its address.
    for name in ("hi@10.0.0.2:4373", "hi@[fd00::2]:4371", "hi@10.0.0.2", "hi@fd00::2"):
        basename, host, port = split_node_name(name, 4370)
        assert s.peer(basename, host, port).name == name
        (entry,) = parse_hosts(name, "hi", 4370)
        assert s.peer(entry.basename, entry.host, entry.port).name == name


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHOAL_NODES_PER_HOST": "0"}, "SHOAL_NODES_PER_HOST=0"),
        ({"SHOAL_NODES_PER_HOST": "33"}, "SHOAL_NODES_PER_HOST=33"),
        ({"SHOAL_NODES_PER_HOST": "four"}, "SHOAL_NODES_PER_HOST='four'"),
        ({"SHOAL_NODES_PER_HOST": "4", "SHOAL_PORT": "65534"}, "goes past port 65535"),
    ],
)
def test_a_bad_nodes_per_host_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"RELEASE_COOKIE": COOKIE, "NODE_HOST": "10.0.0.1", **env})


# -- what each strategy proposes ----------------------------------------------------------


def test_static_host_entries_stand_for_every_port_of_the_range() -> None:
    hosts = parse_hosts("hi@10.0.0.1, 10.0.0.2, hi@10.0.0.3:4372, other@10.0.0.4", "hi", 4370)
    s = settings(hosts=hosts, nodes_per_host=3, own_port=4371)
    assert [p.name for p in StaticStrategy(s).peers] == [
        "hi@10.0.0.1",  # our own host: the other workers (ourselves, on 4371, left out)
        "hi@10.0.0.1:4372",
        "hi@10.0.0.2",
        "hi@10.0.0.2:4371",
        "hi@10.0.0.2:4372",
        "hi@10.0.0.3:4372",  # an explicit port: that node only
    ]
    # The same list with one node per host: exactly what it always gave.
    classic = settings(hosts=hosts)
    assert StaticStrategy(classic).peers == (
        Peer("hi", "10.0.0.2", 4370),
        Peer("hi", "10.0.0.3", 4372),
    )


async def test_dns_proposes_every_port_of_every_address_ours_included() -> None:
    with LocalDNSServer() as dns:
        dns.set_records("hi.local", ["10.0.0.1", "10.0.0.2"])
        common = dict(topology="dns", discovery_endpoint="hi.local", dns_server=dns.address)
        classic = await DNSPollStrategy(settings(**common), lifetime=1).poll()
        assert classic == [Peer("hi", "10.0.0.2", 4370)]
        multi = await DNSPollStrategy(settings(**common, nodes_per_host=2), lifetime=1).poll()
    assert [p.name for p in multi] == [
        "hi@10.0.0.1",
        "hi@10.0.0.1:4371",
        "hi@10.0.0.2",
        "hi@10.0.0.2:4371",
    ]


async def test_cloudmap_proposes_every_port_of_every_instance() -> None:
    client = boto3.client(
        "servicediscovery",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s = settings(
        topology="cloudmap",
        cloudmap_namespace="dbz.local",
        cloudmap_service="hi",
        nodes_per_host=2,
    )
    with Stubber(client) as stubber:
        stubber.add_response(
            "discover_instances",
            {"Instances": [{"InstanceId": "b", "Attributes": {"AWS_INSTANCE_IPV4": "10.0.0.2"}}]},
        )
        peers = await CloudMapStrategy(s, client=client).poll()
    assert [p.name for p in peers] == ["hi@10.0.0.2", "hi@10.0.0.2:4371"]


def test_gossip_takes_beacons_from_the_range_only() -> None:
    s = settings(topology="gossip", nodes_per_host=4, own_port=4371)
    strategy = GossipStrategy(s)
    key = gossip_key(COOKIE)
    for host, port, nonce in [
        ("10.0.0.1", 4371, b"1"),  # ourselves, looped back
        ("10.0.0.1", 4370, b"2"),  # another worker of this host
        ("10.0.0.2", 4373, b"3"),
        ("10.0.0.2", 4374, b"4"),  # outside the range: never dialed
        ("10.0.0.2", 22, b"5"),
    ]:
        strategy.receive(
            encode_beacon(key, beacon(host=host, port=port, nonce=nonce * 16)), (host, 45892)
        )
    assert [p.name for p in strategy._recent_peers()] == ["hi@10.0.0.1", "hi@10.0.0.2:4373"]
    assert strategy.dropped == {"policy": 2}
