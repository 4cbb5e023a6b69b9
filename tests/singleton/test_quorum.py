"""The quorum acceptor's rules (quorum.py), with a fake clock: promises, confirmations, ticks."""

from __future__ import annotations

from shoal.quorum import Acceptor, majority, parse_ballot

WINDOW = 2.5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def acceptor(clock: Clock, wall: float = 5000.0) -> Acceptor:
    a = Acceptor(WINDOW, clock=clock, wall=lambda: wall)
    clock.now += WINDOW  # past the start-up fence
    return a


def test_majority_of_the_expected_cluster() -> None:
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_a_higher_ballot_fences_off_older_holders() -> None:
    a = acceptor(Clock())
    assert a.prepare("s", (1, "a"))["ok"]
    assert a.confirm("s", (1, "a"))["ok"]
    assert a.prepare("s", (2, "b"))["ok"]
    refused = a.confirm("s", (1, "a"))
    assert not refused["ok"] and refused["promised"] == [2, "b"]
    assert not a.prepare("s", (1, "z"))["ok"]


def test_a_tick_is_confirmed_once_whoever_asks() -> None:
    a = acceptor(Clock())
    assert a.confirm("s", (1, "a"), "job", 6000.0)["ok"]
    assert not a.confirm("s", (1, "a"), "job", 6000.0)["ok"]
    assert not a.confirm("s", (2, "b"), "job", 6000.0)["ok"]
    assert not a.confirm("s", (2, "b"), "job", 5999.0)["ok"]
    assert a.confirm("s", (2, "b"), "job", 6001.0)["ok"]
    assert a.confirm("s", (2, "b"), "other", 6000.0)["ok"]


def test_a_restarted_acceptor_is_silent_for_a_window_and_refuses_older_ticks() -> None:
    clock = Clock()
    a = Acceptor(WINDOW, clock=clock, wall=lambda: 5000.0)
    assert not a.prepare("s", (1, "a"))["ok"]
    assert not a.confirm("s", (1, "a"))["ok"]
    clock.now += WINDOW
    assert not a.confirm("s", (1, "a"), "job", 5000.5)["ok"]  # it may have run before we started
    assert a.confirm("s", (1, "a"), "job", 5001.0)["ok"]


def test_a_new_holder_learns_how_long_ago_the_old_one_was_confirmed() -> None:
    clock = Clock()
    a = acceptor(clock)
    a.prepare("s", (1, "a"))
    a.confirm("s", (1, "a"))
    clock.now += 0.7
    assert abs(a.prepare("s", (2, "b"))["age"] - 0.7) < 1e-9
    a.released("s", "b")  # b says it stopped: nothing to wait out
    assert a.prepare("s", (3, "c"))["age"] is None


def test_learning_raises_the_promise_only() -> None:
    a = acceptor(Clock())
    a.learn("s", (3, "c"))
    a.learn("s", (2, "z"))
    assert a.highest("s") == (3, "c")
    assert not a.confirm("s", (2, "z"))["ok"]


def test_malformed_ballots_are_refused() -> None:
    assert parse_ballot([1, "a"]) == (1, "a")
    for bad in (None, [1], [True, "a"], ["1", "a"], [1, 2], [-1, "a"], [2**63, "a"], "1a"):
        assert parse_ballot(bad) is None
