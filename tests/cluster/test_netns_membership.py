"""Membership across real hosts (network namespaces): gossip, a cut cable, healing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.hi import NetnsHiNode
from tests.support.netns import Network, netns_unavailable_reason
from tests.support.procs import wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
    ),
]

FAILURE_TIMEOUT_S = 3.0  # the default SHOAL_FAILURE_TIMEOUT_MS


def test_gossip_forms_a_mesh_and_a_cut_off_node_is_down_within_the_timeout(
    tmp_path: Path,
) -> None:
    with Network(3) as net:
        nodes = [
            NetnsHiNode.start(host, tmp_path, env={"TOPOLOGY_TYPE": "gossip"}) for host in net.hosts
        ]
        for node in nodes:
            node.wait_ready()
        names = sorted(n.name for n in nodes)
        for node in nodes:
            wait_until(
                lambda node=node: node.nodes() == [n for n in names if n != node.name],
                15.0,
                interval=0.1,
                message=f"{node.name} joins by gossip",
            )
        a, b, c = nodes
        c.host.cut()
        cut_at = time.monotonic()
        wait_until(
            lambda: c.name not in (a.nodes() or [c.name]) and c.name not in (b.nodes() or [c.name]),
            FAILURE_TIMEOUT_S + 2.0,
            interval=0.05,
            message="cut-off node is down",
        )
        elapsed = time.monotonic() - cut_at
        # The timeout plus one heartbeat check and the curl polling granularity.
        assert elapsed <= FAILURE_TIMEOUT_S + 0.6, elapsed
        c.host.heal()
        wait_until(
            lambda: a.nodes() == sorted([b.name, c.name]),
            10.0,
            interval=0.1,
            message="healed node is back",
        )
