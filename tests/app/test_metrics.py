"""GET /metrics of real `hi` nodes, read with prometheus-client's own parser.

Loopback aliases 127.0.61.x belong to this module.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

SHOAL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "shoal")
SCHEDULER = "shoal.scheduler"


def scrape(node: HiNode) -> dict[str, list[Sample]]:
    """Samples by family name (counters without their _total suffix, as the parser names
    them); fails unless the whole body parses."""
    response = node.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    """The value of one sample (by its full name and labels); 0 when absent."""
    for samples in families.values():
        for s in samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_metrics_of_membership_messaging_singletons_and_jobs(procs: Procs, tmp_path: Path) -> None:
    hosts = ["127.0.61.2", "127.0.61.3"]
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(hosts),
        "HI_JOB_SCHEDULE": "* * * * * *",
    }
    a, b = (
        HiNode.start(procs, h, env={**env, "SHOAL_CONTROL_SOCKET": str(tmp_path / f"{h}.sock")})
        for h in hosts
    )
    a.wait_nodes([b.name])
    b.wait_nodes([a.name])
    leader_name = wait_until(lambda: a.cluster()["singletons"].get(SCHEDULER), 10.0)
    leader, other = (a, b) if leader_name == a.name else (b, a)
    wait_until(
        lambda: value(scrape(leader), "shoal_job_runs_total", job="hi", status="ok") >= 2,
        15.0,
        message="two runs of the hi job",
    )

    # A node with another cookie tries to join: a handshake failure, by reason.
    HiNode.start(
        procs,
        "127.0.61.4",
        env={
            **env,
            "SHOAL_HOSTS": hosts_list([*hosts, "127.0.61.4"]),
            "RELEASE_COOKIE": "another-cluster-9c1f0e7d2b4a6385",
        },
    )
    wait_until(
        lambda: any(
            value(scrape(n), "shoal_handshake_failures_total", reason="cookie") >= 1 for n in (a, b)
        ),
        15.0,
        message="a cookie handshake failure",
    )

    # A call from the other node to the leader: `shoal run-job` on the other node's socket.
    ran = subprocess.run(
        [SHOAL, "run-job", "hi", "--socket", str(tmp_path / f"{other.host}.sock")],
        env={k: v for k, v in os.environ.items() if k != "SHOAL_CONTROL_SOCKET"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr

    for node in (a, b):
        m = scrape(node)
        assert value(m, "shoal_nodes") == 1
        assert value(m, "shoal_node_up_total") >= 1
        for name in (
            "shoal_messages_sent_total",
            "shoal_messages_received_total",
            "shoal_bytes_sent_total",
            "shoal_bytes_received_total",
        ):
            assert value(m, name) > 0, name
        assert value(m, "shoal_bytes_sent_total") > value(m, "shoal_messages_sent_total")
        assert value(m, "shoal_singleton_holder", singleton=SCHEDULER, node=leader.name) == 1
        assert value(m, "shoal_singleton_held", singleton=SCHEDULER) == (node is leader)
        # every reason is exported, at zero until it happens
        reasons = {s.labels["reason"] for s in m["shoal_handshake_failures"]}
        assert {"cookie", "timeout", "tls", "protocol"} <= reasons
    lm = scrape(leader)
    assert value(lm, "shoal_singleton_takeovers_total", singleton=SCHEDULER) >= 1
    runs = value(lm, "shoal_job_runs_total", job="hi", status="ok")
    assert runs >= 3  # two ticks and the run-job
    assert value(lm, "shoal_job_duration_seconds_count", job="hi") == runs
    assert value(lm, "shoal_job_lateness_seconds_count", job="hi") == runs
    assert value(lm, "shoal_job_lateness_seconds_bucket", job="hi", le="+Inf") == runs
    om = scrape(other)
    assert value(om, "shoal_call_duration_seconds_count") >= 1
    assert 0 < value(om, "shoal_call_duration_seconds_sum") < 30
    assert value(om, "shoal_job_runs_total", job="hi", status="ok") == 0  # ran on the leader

    # The leader freezes: the other node finds it silent, takes over and counts the
    # ticks that nobody ran during the failure-detection gap (misfire=skip: skipped too).
    leader.proc.signal(signal.SIGSTOP)
    wait_until(
        lambda: value(scrape(other), "shoal_job_missed_ticks_total", job="hi") >= 1,
        20.0,
        message="missed ticks counted after the failover",
    )
    leader.proc.kill()
    m = scrape(other)
    assert value(m, "shoal_nodes") == 0
    assert value(m, "shoal_node_down_total") >= 1
    assert value(m, "shoal_singleton_held", singleton=SCHEDULER) == 1
    assert value(m, "shoal_singleton_takeovers_total", singleton=SCHEDULER) == 1
    missed = value(m, "shoal_job_missed_ticks_total", job="hi")
    skipped = value(m, "shoal_job_skipped_ticks_total", job="hi", reason="misfire")
    assert skipped == missed  # misfire=skip: none of them ran
