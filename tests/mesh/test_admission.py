"""The handshake table's rules and the dial policy, as pure functions."""

from __future__ import annotations

import random

import pytest

from shoal.admission import HandshakeAdmission, learned_address_allowed


def fill(table: HandshakeAdmission, host: str, count: int, evicted: list[str]) -> list[object]:
    slots = []
    for i in range(count):
        slot = table.admit(host, f"{host}:{i}", lambda h=host: evicted.append(h))
        assert slot is not None
        slots.append(slot)
    return slots


def test_a_newcomer_takes_the_oldest_slot_of_the_busiest_address() -> None:
    table = HandshakeAdmission(limit=8, per_host=6, rng=random.Random(0))
    table.limit = 10**6  # fill without early drop, then restore the cap
    evicted: list[str] = []
    fill(table, "10.0.0.1", 6, evicted)
    fill(table, "10.0.0.2", 2, evicted)
    table.limit = 8
    newcomer = table.admit("10.0.0.9", "10.0.0.9:1", lambda: evicted.append("10.0.0.9"))
    assert newcomer is not None
    assert evicted == ["10.0.0.1"]
    assert table.total == 8 and table.count("10.0.0.1") == 5
    table.release(newcomer)
    assert table.total == 7


def test_per_address_cap_and_no_eviction_by_the_busiest_itself() -> None:
    table = HandshakeAdmission(limit=6, per_host=4, rng=random.Random(0))
    table.limit = 10**6
    evicted: list[str] = []
    fill(table, "10.0.0.1", 3, evicted)
    fill(table, "10.0.0.2", 3, evicted)
    table.limit = 6
    # Equal shares: nobody is busier than the newcomer's address by more than one.
    assert table.admit("10.0.0.2", "x", lambda: None) is None
    assert evicted == []
    table.limit = 10**6
    fill(table, "10.0.0.3", 4, evicted)
    assert table.admit("10.0.0.3", "x", lambda: None) is None  # its own cap


def test_early_drop_spares_addresses_without_a_slot() -> None:
    table = HandshakeAdmission(limit=100, per_host=100, rng=random.Random(1))
    evicted: list[str] = []
    fill(table, "10.0.0.1", 50, evicted)  # up to half: no drops
    admitted = sum(table.admit("10.0.0.1", "x", lambda: None) is not None for _ in range(50))
    assert 0 < admitted < 50  # some dropped at random as the table fills
    assert all(table.admit(f"10.1.0.{i}", "y", lambda: None) is not None for i in range(5))


@pytest.mark.parametrize(
    ("host", "own", "allowed"),
    [
        ("10.0.0.7", "10.0.0.2", True),
        ("fd00::7", "10.0.0.2", True),
        ("127.0.0.1", "10.0.0.2", False),
        ("::1", "10.0.0.2", False),
        ("169.254.169.254", "10.0.0.2", False),  # the cloud metadata service
        ("fe80::1", "10.0.0.2", False),
        ("224.0.0.1", "10.0.0.2", False),
        ("0.0.0.0", "10.0.0.2", False),
        ("::", "10.0.0.2", False),
        ("255.255.255.255", "10.0.0.2", False),
        ("localhost", "10.0.0.2", False),  # names are not resolved on a peer's word
        ("127.0.0.3", "127.0.0.2", True),  # a node on loopback may reach its neighbours
        ("169.254.0.3", "169.254.0.2", True),
        ("224.0.0.1", "127.0.0.2", False),
    ],
)
def test_dial_policy_for_learned_addresses(host: str, own: str, allowed: bool) -> None:
    assert learned_address_allowed(host, own) is allowed
