"""Run-time job definitions converge whatever order their versions arrive in; what comes from
a peer or the command line is validated."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from shoal.jobdefs import JobDef, JobDefs, parse_options
from shoal.scheduler import Scheduler


def registry(node: str = "a@127.0.0.2") -> JobDefs:
    defs = JobDefs(Scheduler(node=node), node)
    defs.task("t", lambda: None)
    return defs


def view(defs: JobDefs) -> dict[str, Any]:
    return {j.name: (str(j.schedule), j.active) for j in defs.scheduler.list_jobs()}


def test_every_order_of_the_same_changes_ends_in_the_same_jobs() -> None:
    changes = [
        JobDef("x", 1, "a", schedule="* * * * * *", task="t"),
        JobDef("x", 2, "b", active=False, schedule="* * * * * *", task="t"),
        JobDef("x", 3, "a", deleted=True),
        JobDef("y", 1, "a", schedule="0 * * * * *", task="t"),
        JobDef("y", 1, "b", schedule="30 * * * * *", task="t"),  # a tie: origin "b" wins
        JobDef("z", 1, "c", schedule="@daily", task="t"),
        JobDef("z", 2, "a", active=False, schedule="@daily", task="t"),
    ]
    outcomes = set()
    for order in itertools.permutations(changes):
        defs = registry()
        for change in order:
            defs.adopt(change)
        outcomes.add(tuple(sorted(view(defs).items())))
    assert outcomes == {(("y", ("30 * * * * *", True)), ("z", ("@daily", False)))}


def test_a_removal_outlives_an_older_addition_heard_later() -> None:
    defs = registry()
    assert defs.adopt(JobDef("x", 5, "b", deleted=True))
    assert not defs.adopt(JobDef("x", 4, "a", schedule="* * * * * *", task="t"))
    assert "x" not in defs.scheduler
    # and the next local change is newer than anything heard
    assert defs.next("x", schedule="@daily", task="t").version == 6


def test_a_job_without_its_task_waits_for_it() -> None:
    defs = JobDefs(Scheduler(node="a"), "a")
    defs.adopt(JobDef("x", 1, "b", schedule="@daily", task="later"))
    assert "x" not in defs.scheduler
    defs.task("later", lambda: None)
    assert "x" in defs.scheduler


def test_a_peer_cannot_replace_a_job_defined_in_code() -> None:
    defs = registry()
    defs.scheduler.add_job("@daily", lambda: None, name="coded")
    defs.adopt(JobDef("coded", 1, "b", schedule="* * * * * *", task="t"))
    defs.adopt(JobDef("coded", 2, "b", deleted=True))
    assert str(defs.scheduler.find_job("coded").schedule) == "@daily"


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"name": "x", "version": 1},  # no origin
        {"name": "x", "version": 0, "origin": "a"},
        {"name": "x", "version": True, "origin": "a"},
        {"name": "x", "version": 1, "origin": "a", "schedule": "@daily"},  # no task
        {"name": "x" * 300, "version": 1, "origin": "a"},
        {"name": "x", "version": 1, "origin": "a", "active": "yes"},
        {"name": "x", "version": 1, "origin": "a", "options": {"fn": "os.system"}},
        {"name": "x", "version": 1, "origin": "a", "options": {"max_attempts": "3"}},
        {"name": "x", "version": 1, "origin": "a", "options": {"overlap": 1}},
        {"name": "x", "version": 1, "origin": "a", "options": {"day_match": "or"}},
    ],
)
def test_malformed_definitions_are_refused(data: Any) -> None:
    with pytest.raises(ValueError):
        JobDef.from_wire(data)


def test_definitions_round_trip() -> None:
    spec = JobDef("x", 3, "a", False, False, "@daily", "t", {"max_attempts": 3, "backoff": 0.5})
    assert JobDef.from_wire(spec.to_wire()) == spec


def test_command_line_options_are_typed() -> None:
    assert parse_options(["max-attempts=3", "backoff=0.5", "overlap=true", "timeout=none"]) == {
        "max_attempts": 3,
        "backoff": 0.5,
        "overlap": True,
        "timeout": None,
    }
    for bad in (["max_attempts"], ["color=red"], ["overlap=maybe"], ["max_attempts=x"]):
        with pytest.raises(ValueError):
            parse_options(bad)


def test_a_peers_definition_that_does_not_fit_here_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    defs = registry()
    assert defs.adopt(JobDef("x", 1, "b", schedule="not cron", task="t"))
    assert defs.adopt(JobDef("y", 1, "b", schedule="@daily", task="t", options={"tz": "Mars/X"}))
    assert "x" not in defs.scheduler and "y" not in defs.scheduler
    assert "run-time job 'x' not applied here" in caplog.text
