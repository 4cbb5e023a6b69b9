"""pytest fixtures over the support helpers. Import the ones you use into a conftest:

from tests.support.fixtures import dns_server, procs  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns_server import LocalDNSServer
from tests.support.procs import Procs


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    """A running `LocalDNSServer` on 127.0.0.1 (UDP+TCP, ephemeral port)."""
    with LocalDNSServer() as server:
        yield server


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes started through it are stopped after the test.

    Their outputs are printed at teardown; pytest shows that only when the
    test failed ("Captured stdout teardown").
    """
    group = Procs()
    try:
        yield group
    finally:
        if group.procs:
            print(group.dump())
        group.close()
