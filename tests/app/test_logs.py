"""Log formats of real `hi` processes: JSON lines for log tools, dated text by default."""

from __future__ import annotations

import json
import re
import signal
from datetime import datetime
from typing import Any

from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

JOB_LINE = re.compile(
    r"^Job running on: (\S+) with cookie sha256:[0-9a-f]+ from possible hosts: \[(.*)\]$"
)
TEXT_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO|WARNING) ")


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of a process's output, each parsed as one JSON object (fails otherwise)."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"line {number} is not JSON ({exc}): {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def check_common_fields(record: dict[str, Any]) -> None:
    stamp = datetime.fromisoformat(record["timestamp"])
    assert stamp.tzinfo is not None and record["timestamp"][:4].isdigit(), record  # date, zone
    assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), record
    assert isinstance(record["logger"], str) and record["logger"], record
    assert isinstance(record["message"], str), record


def test_json_logs_are_one_object_per_line_with_filterable_fields(procs: Procs) -> None:
    hosts = ["127.0.60.2", "127.0.60.3"]
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(hosts),
        "SHOAL_LOG_FORMAT": "json",
        "HI_JOB_SCHEDULE": "* * * * * *",
    }
    a, b = (HiNode.start(procs, h, env=env) for h in hosts)
    a.wait_nodes([b.name])
    b.wait_nodes([a.name])

    def job_records() -> list[dict[str, Any]]:
        return [
            r
            for n in (a, b)
            for r in json_lines(n.proc.output())
            if JOB_LINE.match(r.get("message", ""))
        ]

    wait_until(lambda: len(job_records()) >= 2, 15.0, message="two job runs")
    for node in (a, b):
        node.proc.signal(signal.SIGTERM)
    for node in (a, b):
        assert node.proc.wait(15) == 0

    for node in (a, b):
        records = json_lines(node.proc.output())
        assert len(records) >= 5
        for record in records:
            check_common_fields(record)
        # uvicorn's own lines go through the same formatter
        assert any(r["logger"].startswith("uvicorn") for r in records), records
        # once started, every line carries the node
        started = next(i for i, r in enumerate(records) if "listening on" in r["message"])
        assert all(r.get("node") == node.name for r in records[started:]), records[started:]
        # membership lines name the peer as a field
        other = b if node is a else a
        ups = [r for r in records if r["message"].startswith("node up:")]
        assert ups and all(r["peer"] == other.name for r in ups), ups
    runs = job_records()
    leader_token = [
        r["token"]
        for n in (a, b)
        for r in json_lines(n.proc.output())
        if r["message"].startswith("singleton shoal.scheduler: running on")
    ]
    assert leader_token and all(isinstance(t, int) for t in leader_token)
    for run in runs:
        match = JOB_LINE.match(run["message"])
        assert match is not None
        assert run["node"] == match[1]  # the contract's line, unchanged, plus fields
        assert run["job"] == "hi" and run["singleton"] == "shoal.scheduler"
        assert run["token"] in leader_token
        tick = datetime.fromisoformat(run["tick"])
        assert tick.tzinfo is not None and tick.microsecond == 0
        assert abs((datetime.fromisoformat(run["timestamp"]) - tick).total_seconds()) < 1.0


def test_text_logs_carry_the_date_and_zone(procs: Procs) -> None:
    node = HiNode.start(
        procs, "127.0.60.4", env={"TOPOLOGY_TYPE": "static", "HI_JOB_SCHEDULE": "* * * * * *"}
    )
    node.wait_ready()
    wait_until(lambda: "Job running on:" in node.proc.output(), 10.0, message="a job run")
    lines = node.proc.output().splitlines()
    assert TEXT_STAMP.match(lines[0]), lines[0]
    job = next(line for line in lines if "Job running on:" in line)
    assert TEXT_STAMP.match(job) and " hi.jobs: Job running on: " in job, job


def test_a_bad_log_format_is_a_configuration_error(procs: Procs) -> None:
    node = HiNode.start(procs, "127.0.60.5", env={"SHOAL_LOG_FORMAT": "xml"})
    assert node.proc.wait(10) == 2
    assert "SHOAL_LOG_FORMAT" in node.proc.output()
