"""A full-cluster restart with the Postgres job store (SHOAL_LEASE_DSN, the one setting):
real `hi` processes are all stopped across several ticks and started again. The new leader
knows the last tick the old cluster started, runs the newest missed tick once (`run_once`),
no tick runs twice, and the run history and a job added at run time (with `shoal jobs add`,
through the control socket) survive.

Loopback aliases 127.0.62.x belong to this module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.hi import HiNode, hosts_list
from tests.support.postgres import running_postgres, unavailable_reason
from tests.support.procs import Procs, wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

SHOAL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "shoal")
MISSED = re.compile(r"job 'hi': missed ticks (?:from )?(\S+?)(?:\.\.| to before )(\S+)")


def runs(nodes: list[HiNode], job: str = "hi") -> list[datetime]:
    """The tick of every run of `job`, from the nodes' JSON log lines."""
    return [
        datetime.fromisoformat(r["tick"])
        for n in nodes
        for line in n.proc.output().splitlines()
        if (r := json.loads(line)).get("message", "").startswith("Job running on:")
        and r.get("job") == job
    ]


def shoal(procs: Procs, node: HiNode, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_CONTROL_SOCKET"}
    socket = str(procs.log_dir / f"{node.host}.sock")
    done = subprocess.run(
        [SHOAL, *args, "--json", "--socket", socket],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def job_row(node: HiNode, name: str) -> dict[str, Any] | None:
    jobs = node.cluster()["jobs"]
    return next((row for row in jobs if row["name"] == name), None)


def test_a_full_cluster_restart_keeps_the_last_tick_the_history_and_runtime_jobs(
    procs: Procs,
) -> None:
    hosts = ["127.0.62.2", "127.0.62.3"]
    with running_postgres() as pg:
        env = {
            "TOPOLOGY_TYPE": "static",
            "SHOAL_HOSTS": hosts_list(hosts),
            "HI_JOB_SCHEDULE": "* * * * * *",
            "HI_JOB_MISFIRE": "run_once",
            "SHOAL_LEASE_DSN": pg.dsn,
            "SHOAL_LOG_FORMAT": "json",
        }
        first = [HiNode.start(procs, h, env=env) for h in hosts]
        for node in first:
            node.wait_ready()
        # A job added at run time on one node, to run the app's task "hi" every minute.
        added = shoal(procs, first[1], "jobs", "add", "nightly", "0 0 2 * * *", "hi")
        assert added["task"] == "hi"
        shoal(procs, first[0], "jobs", "pause", "nightly")
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

        def loaded(node: HiNode) -> bool:  # each node loads the hi job's state
            return any(
                json.loads(line)["message"].startswith("job store: 1 job states")
                for line in node.proc.output().splitlines()
            )

        wait_until(lambda: all(loaded(n) for n in second), 10.0, message="states loaded")
        outputs = "".join(n.proc.output() for n in second)
        missed = MISSED.search(outputs)
        assert missed is not None, outputs  # the new leader knew the old last tick...
        assert datetime.fromisoformat(missed[1]) == last + timedelta(seconds=1)
        new = runs(second)
        all_ticks = old + new
        assert len(all_ticks) == len(set(all_ticks))  # ...so no tick ran twice
        assert min(new) > last
        # the newest missed tick ran exactly once (late or just in time); the older ones not
        newest_missed = datetime.fromisoformat(missed[2])
        assert new.count(newest_missed) == 1
        assert not [t for t in new if last < t < newest_missed]

        # The run-time job came back on every node, still paused, from the store.
        for node in second:
            row = job_row(node, "nightly")
            assert row is not None and row["defined"] == "runtime", node.cluster()["jobs"]
            assert row["task"] == "hi" and row["active"] is False
        # The runs of the old cluster are in the history: /cluster and `shoal jobs history`.
        hi = job_row(second[0], "hi")
        assert hi is not None
        assert {datetime.fromisoformat(r["tick"]) for r in hi["history"]} & set(old)
        history = shoal(procs, second[1], "jobs", "history", "hi", "100")
        ticks = [datetime.fromisoformat(r["tick"]) for r in history]
        assert set(old) <= set(ticks)
        assert len(ticks) == len(set(ticks))  # one record per tick
        assert {r["status"] for r in history} == {"ok"}
        assert all(r["attempts"] == 1 and r["node"] for r in history)
