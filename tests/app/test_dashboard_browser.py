"""The `hi` page in a real browser (Debian's Chromium): what a person sees, and that it
keeps itself up to date when the cluster changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, Chromium
from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as running:
        yield running


def test_page_shows_the_cluster_and_follows_it(procs: Procs, tmp_path: Path) -> None:
    hosts = ["127.0.13.2", "127.0.13.3"]
    env = {"TOPOLOGY_TYPE": "static", "SHOAL_HOSTS": hosts_list(hosts, "vegeta")}
    a = HiNode.start(procs, hosts[0], basename="vegeta", env=env)
    a.wait_ready()
    with Chromium() as browser:
        page = browser.open(a.url + "/")
        wait_until(lambda: a.name in page.text(), 10.0, message="page shows this node")
        assert "vegeta" in page.text()
        assert "vegeta@127.0.13.3" not in page.text()

        # A second instance starts: the open page shows it without a reload.
        b = HiNode.start(procs, hosts[1], basename="vegeta", env=env)
        b.wait_ready()
        wait_until(lambda: b.name in page.text(), 10.0, message="page shows the new peer")
        wait_until(
            lambda: "Job running" in page.text() or "ran on" in page.text().lower(),
            10.0,
            message="page shows the job",
        )
        # The recent runs, from the history every node keeps: tick, node, status, attempts.
        wait_until(
            lambda: "Recent runs" in page.text() and "1 attempt" in page.text(),
            10.0,
            message="page shows the recent runs",
        )
        page.screenshot(tmp_path / "vegeta.png")
        assert (tmp_path / "vegeta.png").stat().st_size > 10_000

        # And when it stops, the page drops it.
        b.proc.terminate()
        wait_until(lambda: b.name not in page.text(), 10.0, message="page drops the peer")
