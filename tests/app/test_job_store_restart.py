"""A full-cluster restart with the Postgres job store (SHOAL_JOB_STORE_DSN): real `hi`
processes are all stopped across several ticks and started again; the new leader knows the
last tick the old cluster started, runs the newest missed tick once, and no tick runs twice.

Loopback aliases 127.0.62.x belong to this module.
"""

from __future__ import annotations

import json
import re
import signal
from datetime import datetime, timedelta

import pytest

from tests.support.hi import HiNode, hosts_list
from tests.support.postgres import running_postgres, unavailable_reason
from tests.support.procs import Procs, wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

MISSED = re.compile(r"job 'hi': missed ticks (?:from )?(\S+?)(?:\.\.| to before )(\S+)")


def runs(nodes: list[HiNode]) -> list[datetime]:
    """The tick of every run of the hi job, from the nodes' JSON log lines."""
    return [
        datetime.fromisoformat(r["tick"])
        for n in nodes
        for line in n.proc.output().splitlines()
        if (r := json.loads(line)).get("message", "").startswith("Job running on:")
    ]


def test_a_full_cluster_restart_keeps_the_last_tick(procs: Procs) -> None:
    hosts = ["127.0.62.2", "127.0.62.3"]
    with running_postgres() as pg:
        env = {
            "TOPOLOGY_TYPE": "static",
            "SHOAL_HOSTS": hosts_list(hosts),
            "HI_JOB_SCHEDULE": "* * * * * *",
            "HI_JOB_MISFIRE": "run_once",
            "SHOAL_JOB_STORE_DSN": pg.dsn,
            "SHOAL_LOG_FORMAT": "json",
        }
        first = [HiNode.start(procs, h, env=env) for h in hosts]
        wait_until(lambda: len(runs(first)) >= 3, 15.0, message="three runs")
        for node in first:
            node.proc.signal(signal.SIGTERM)
        for node in first:
            assert node.proc.wait(15) == 0
        old = runs(first)
        last = max(old)
        # Everything is down across several ticks.
        wait_until(
            lambda: datetime.now(last.tzinfo) > last + timedelta(seconds=3.5), 6.0, interval=0.1
        )

        second = [HiNode.start(procs, h, env=env) for h in hosts]
        wait_until(lambda: len(runs(second)) >= 2, 15.0, message="runs after the restart")
        outputs = "".join(n.proc.output() for n in second)
        messages = [json.loads(line)["message"] for line in outputs.splitlines()]
        assert messages.count("job store: 1 job states loaded") == 2
        missed = MISSED.search(outputs)
        assert missed is not None, outputs  # the new leader knew the old last tick...
        assert datetime.fromisoformat(missed[1]) == last + timedelta(seconds=1)
        new = runs(second)
        all_ticks = old + new
        assert len(all_ticks) == len(set(all_ticks))  # ...so no tick ran twice
        assert min(new) > last
        # the newest missed tick ran once (late or just in time); the older ones did not
        newest_missed = datetime.fromisoformat(missed[2])
        assert newest_missed in new
        assert not [t for t in new if last < t < newest_missed]
