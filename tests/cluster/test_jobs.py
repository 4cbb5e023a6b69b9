"""The seed's cron job on real `hi` processes: one run per tick, through kills and deploys."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.support import job_log
from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, WaitTimeout, wait_until

SCHEDULER = "shoal.scheduler"


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as running:
        yield running


def env(all_hosts: list[str], **extra: str) -> dict[str, str]:
    return {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(all_hosts),
        "HI_JOB_SCHEDULE": "* * * * * *",
        **extra,
    }


def holder(node: HiNode) -> str | None:
    holder: str | None = node.cluster()["singletons"].get(SCHEDULER)
    return holder


def start_cluster(
    procs: Procs, hosts: list[str], all_hosts: list[str], **extra: str
) -> list[HiNode]:
    nodes = [HiNode.start(procs, h, env=env(all_hosts, **extra)) for h in hosts]
    for node in nodes:
        node.wait_ready()
    for node in nodes:
        node.wait_nodes([n.name for n in nodes if n is not node])
    wait_until(lambda: all(holder(n) is not None for n in nodes), 10.0, message="a holder")
    return nodes


def now_second() -> int:
    local = time.localtime()
    return local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec


def assert_one_run_per_tick(procs: Procs, first: int, last: int) -> None:
    counts = job_log.ticks_between(job_log.runs([p.output() for p in procs.procs]), first, last)
    missed = [t for t, n in counts.items() if n == 0]
    doubled = [t for t, n in counts.items() if n > 1]
    assert not missed and not doubled, f"missed {missed}, run twice {doubled}\n{procs.dump()}"


@pytest.mark.slow
def test_three_nodes_run_each_tick_exactly_once_for_a_minute(procs: Procs) -> None:
    hosts = [f"127.0.50.{i}" for i in range(2, 5)]
    start_cluster(procs, hosts, hosts)
    first = now_second() + 1
    wait_until(lambda: now_second() >= first + 60, 65.0, interval=0.5)
    assert_one_run_per_tick(procs, first, first + 59)


def test_sigkill_of_the_holder_fails_over_within_a_second(procs: Procs) -> None:
    """SIGKILL the holder while a run is in progress: another node holds the scheduler within
    a second, and every tick from before the kill to after it ran exactly once (the tick the
    dead holder had started is not run again; the next one is not lost)."""
    hosts = [f"127.0.51.{i}" for i in range(2, 5)]
    nodes = start_cluster(procs, hosts, hosts, HI_JOB_SECONDS="0.5")
    first = now_second() + 1

    def in_progress() -> tuple[int, str] | None:
        """A tick after `first` that some node (the holder) has started and not finished."""
        found = job_log.runs([n.proc.output() for n in nodes])
        return next(((r.tick, r.node) for r in found if r.tick > first and r.ended is None), None)

    try:
        killed_tick, leader_name = wait_until(in_progress, 10.0, interval=0.01)
    except WaitTimeout:
        pytest.fail(f"no run in progress\n{procs.dump()}")
    leader = next(n for n in nodes if n.name == leader_name)
    others = [n for n in nodes if n is not leader]
    now = datetime.now()  # local time, as the log stamps
    killed_at = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    leader.proc.kill()
    wait_until(lambda: all(holder(n) not in (None, leader_name) for n in others), 5.0)
    # Measured from the new holder's own log stamp, not by polling HTTP (slow on a busy machine).
    takeovers = job_log.tokens([n.proc.output() for n in others])
    taken_at = min(at for at, node, _ in takeovers if at >= killed_at - 0.01)
    assert taken_at - killed_at < 1.0, (killed_at, takeovers)
    last = killed_tick + 3
    wait_until(
        lambda: any(
            r.tick >= last and r.ended is not None
            for r in job_log.runs([n.proc.output() for n in others])
        ),
        6.0,
        message="three ticks after the failover",
    )
    found = job_log.runs([p.output() for p in procs.procs])
    ran_by = {r.tick: r.node for r in found if first <= r.tick <= last}
    assert leader_name in ran_by.values() and len(set(ran_by.values())) == 2, ran_by
    assert_one_run_per_tick(procs, first, last)


def test_sigterm_while_the_job_runs_hands_over_without_overlap(procs: Procs) -> None:
    hosts = [f"127.0.52.{i}" for i in range(2, 5)]
    nodes = start_cluster(
        procs, hosts, hosts, HI_JOB_SCHEDULE="*/2 * * * * *", HI_JOB_SECONDS="1.2"
    )
    leader = next(n for n in nodes if n.name == holder(nodes[0]))
    # Wait until a run has started on the holder and is still going.
    wait_until(
        lambda: any(
            r.ended is None and r.node == leader.name for r in job_log.runs([leader.proc.output()])
        ),
        5.0,
        interval=0.01,
        message="a run in progress",
    )
    leader.proc.signal(signal.SIGTERM)
    assert leader.proc.wait(15) == 0
    others = [n for n in nodes if n is not leader]
    wait_until(
        lambda: sum(1 for r in job_log.runs([n.proc.output() for n in others]) if r.ended) >= 2,
        10.0,
        message="runs after the handover",
    )
    runs = job_log.runs([n.proc.output() for n in nodes])
    interrupted = next(r for r in runs if r.node == leader.name and r.ended is not None)
    after = [r for r in runs if r.started > interrupted.started]
    assert after, procs.dump()
    # The run that was going completed, nothing overlapped it, and the next
    # tick (two seconds later) ran on the new holder: the gap is within one tick.
    assert interrupted.ended is not None
    assert after[0].started >= interrupted.ended
    assert after[0].started - interrupted.started <= 2.0 + 0.2
    for earlier, later in itertools.pairwise(runs):
        assert earlier.ended is not None and later.started >= earlier.ended, procs.dump()


def test_rolling_replacement_of_every_node_misses_no_tick(procs: Procs) -> None:
    old_hosts = [f"127.0.53.{i}" for i in range(2, 5)]
    new_hosts = [f"127.0.53.{i}" for i in range(5, 8)]
    all_hosts = old_hosts + new_hosts
    old = start_cluster(procs, old_hosts, all_hosts)
    first = now_second() + 1
    current = list(old)
    for old_node, new_host in zip(old, new_hosts, strict=True):
        new = HiNode.start(procs, new_host, env=env(all_hosts))
        new.wait_ready()
        current.append(new)
        for node in current:
            node.wait_nodes([n.name for n in current if n is not node])
        old_node.proc.signal(signal.SIGTERM)
        assert old_node.proc.wait(15) == 0
        current.remove(old_node)
        for node in current:
            node.wait_nodes([n.name for n in current if n is not node], timeout=5)
        # Let a tick or two pass on the new membership before the next step.
        step_done = now_second()
        wait_until(lambda s=step_done: now_second() >= s + 2, 3.0, interval=0.05)
    last = now_second() - 1
    # Let the final second's run be logged before counting.
    wait_until(lambda: now_second() >= last + 2, 3.0, interval=0.1)
    assert last - first >= 3
    assert_one_run_per_tick(procs, first, last)
    assert holder(current[0]) in {n.name for n in current}
