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
    a.released("s", "b")  # b's word does not end a's confirmation
    assert abs(a.prepare("s", (3, "c"))["age"] - 0.7) < 1e-9


def test_learning_raises_the_promise_only() -> None:
    a = acceptor(Clock())
    a.learn("s", (3, "c"))
    a.learn("s", (2, "z"))
    assert a.highest("s") == (3, "c")
    assert a.highest("t") == (0, "")  # nothing promised yet: a claimant starts at token 1
    assert not a.confirm("s", (2, "z"))["ok"]


def test_malformed_ballots_are_refused() -> None:
    assert parse_ballot([1, "a"]) == (1, "a")
    assert parse_ballot([0, ""]) == (0, "")  # what an acceptor that promised nothing names
    assert parse_ballot((2**62 - 1, "a")) == (2**62 - 1, "a")
    for bad in (None, [1], [True, "a"], ["1", "a"], [1, 2], [-1, "a"], [2**62, "a"], "1a"):
        assert parse_ballot(bad) is None


def test_refusals_name_the_ballot_to_beat_and_say_why() -> None:
    """The replies are the wire format: a claimant learns "promised" (the ballot to beat),
    and a refused tick's "why" reaches the operator's log."""
    clock = Clock()
    a = Acceptor(WINDOW, clock=clock, wall=lambda: 5000.0)
    a.learn("s", (3, "c"))  # a restarted node learns its peers' ballots while fenced
    fenced = {"ok": False, "promised": [3, "c"], "why": "acceptor just started"}
    assert a.prepare("s", (4, "a")) == fenced
    assert a.confirm("s", (4, "a")) == fenced
    clock.now += WINDOW
    higher = {"ok": False, "promised": [3, "c"], "why": "promised a higher ballot"}
    assert a.prepare("s", (2, "a")) == higher
    assert a.confirm("s", (2, "a")) == higher
    assert a.confirm("s", (4, "a"), "job", 5000.5) == {
        "ok": False,
        "promised": [4, "a"],
        "why": "tick before acceptor start",
    }
    assert a.confirm("s", (4, "a"), "job", 6000.0) == {"ok": True, "promised": [4, "a"]}
    assert a.confirm("s", (4, "a"), "job", 6000.0) == {
        "ok": False,
        "promised": [4, "a"],
        "why": "tick already confirmed",
    }


def test_a_ballot_learned_from_a_peer_is_still_promised_to_its_claimant() -> None:
    """A peer's state may tell us of a claimant's ballot before its own prepare arrives."""
    a = acceptor(Clock())
    a.learn("s", (1, "a"))
    assert a.prepare("s", (1, "a")) == {"ok": True, "promised": [1, "a"], "age": None}


def test_a_promise_in_between_does_not_hide_an_older_confirmation() -> None:
    """h was confirmed, then a claimant promised: the next claimant still waits out h."""
    clock = Clock()
    a = acceptor(clock)
    assert a.confirm("s", (1, "h"))["ok"]
    clock.now += 0.5
    assert a.prepare("s", (2, "a")) == {"ok": True, "promised": [2, "a"], "age": 0.5}
    clock.now += 0.5
    assert a.prepare("s", (3, "b")) == {"ok": True, "promised": [3, "b"], "age": 0.5}


def test_only_the_holder_itself_can_cancel_the_wait_and_repeats_are_harmless() -> None:
    """Peers repeat "not holding" in every state message, also for names never promised here."""
    clock = Clock()
    a = acceptor(clock)
    a.released("t", "b")  # never promised here: nothing to do
    assert a.confirm("s", (1, "h"))["ok"]
    clock.now += 0.5
    a.released("s", "x")  # another node's word does not end h's confirmation
    assert a.prepare("s", (2, "b"))["age"] == 0.5
    b = acceptor(clock)
    assert b.confirm("s", (1, "h"))["ok"]
    b.released("s", "h")
    b.released("s", "h")
    assert b.prepare("s", (2, "b"))["age"] is None


def test_a_job_without_a_tick_is_a_plain_confirmation() -> None:
    a = acceptor(Clock())
    assert a.confirm("s", (1, "a"), "job") == {"ok": True, "promised": [1, "a"]}
    assert a.confirm("s", (1, "a"), "job", 6000.0)["ok"]


def test_a_ballot_learned_before_its_prepare_still_gets_the_old_holders_age() -> None:
    """A peer's state names a's ballot before a's prepare arrives: a still waits out h."""
    clock = Clock()
    a = acceptor(clock)
    assert a.confirm("s", (4, "h"))["ok"]
    clock.now += 0.5
    a.learn("s", (5, "a"))
    assert a.prepare("s", (5, "a")) == {"ok": True, "promised": [5, "a"], "age": 0.5}


def test_a_retried_prepare_still_gets_the_old_holders_age() -> None:
    """The first reply was lost: the same ballot asks again and must not count itself."""
    clock = Clock()
    a = acceptor(clock)
    assert a.confirm("s", (4, "h"))["ok"]
    clock.now += 0.5
    assert a.prepare("s", (5, "a"))["age"] == 0.5
    clock.now += 0.5
    assert a.prepare("s", (5, "a"))["age"] == 1.0
    assert a.confirm("s", (5, "a"))["ok"]
    clock.now += 0.25
    assert a.prepare("s", (5, "a"))["age"] == 1.25  # its own confirmation neither
    assert a.prepare("s", (6, "b"))["age"] == 0.0  # but the next claimant waits a out


def test_the_claimant_saying_it_holds_nothing_keeps_the_old_holders_age() -> None:
    """a's state ("not holding", sent while it claims) must not erase h's confirmation."""
    clock = Clock()
    a = acceptor(clock)
    assert a.confirm("s", (4, "h"))["ok"]
    clock.now += 0.5
    a.learn("s", (5, "a"))
    a.released("s", "a")
    assert a.prepare("s", (5, "a"))["age"] == 0.5
    b = acceptor(clock)
    assert b.confirm("s", (4, "h"))["ok"]
    assert b.prepare("s", (5, "a"))["ok"]
    clock.now += 0.5
    b.released("s", "a")
    assert b.prepare("s", (6, "c"))["age"] == 0.5  # h's confirmation, not a's promise


def test_claimants_saying_they_hold_nothing_never_hide_the_old_holder() -> None:
    """Two failed claimants in a row, both saying so: h's confirmation is still waited out."""
    clock = Clock()
    a = acceptor(clock)
    assert a.confirm("s", (4, "h"))["ok"]
    clock.now += 0.25
    assert a.confirm("s", (5, "a"))["ok"]
    clock.now += 0.25
    assert a.prepare("s", (6, "c"))["ok"]
    a.released("s", "a")
    a.released("s", "c")
    assert a.prepare("s", (7, "d"))["age"] == 0.5
