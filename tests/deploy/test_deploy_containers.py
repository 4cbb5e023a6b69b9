"""The real image on Debian's Docker engine: built offline with both builders, and a
short rolling restart of the compose cluster under load.

The full proof (every container, both orders, 200 req/s for 60 s) is
`python -m tests.deploy.rolling`; see the README. The short variant here runs
only with SHOAL_DOCKER_ROLLING=1 (otherwise deselected, not skipped: it needs
the machine's 2 cores for itself). These tests skip, saying
why, without root or a Docker engine (scripts/test starts one as root).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import rolling
from tests.deploy.docker_env import (
    build_image,
    build_wheels,
    docker,
    docker_cli_for_buildkit,
    standin_images,
    why_no_docker,
)

TAG = f"shoal-test/hi:pytest{os.getpid()}"


@pytest.fixture(scope="module")
def bases() -> Iterator[tuple[str, str]]:
    reason = why_no_docker()
    if reason:
        pytest.skip(reason)
    images = standin_images()  # cached by tag after the first run
    build_wheels()
    yield images
    docker("rmi", "-f", TAG, f"{TAG}-buildkit", check=False)


def test_image_builds_offline_with_the_classic_builder(bases: tuple[str, str]) -> None:
    build_image(TAG, buildkit=False, base=bases[0])
    (info,) = json.loads(docker("image", "inspect", TAG))
    config = info["Config"]
    assert config["User"].split(":")[0] == "10001"
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["hi"]
    # Only the venv came across: no wheels, no lock, no sources in the runtime image.
    listing = docker("run", "--rm", "--network", "none", "--entrypoint", "ls", TAG, "/tmp", "/")
    assert "build" not in listing.split() and "src" not in listing.split()
    # The library's command came with its own wheel (shoal-hi holds only the app).
    version = docker("run", "--rm", "--network", "none", "--entrypoint", "shoal", TAG, "--version")
    assert version.strip().startswith("shoal 0.")


def test_image_builds_offline_with_buildkit(bases: tuple[str, str]) -> None:
    if docker_cli_for_buildkit() is None:
        pytest.skip("no BuildKit: neither docker buildx nor Debian's docker.io CLI (< 23)")
    build_image(f"{TAG}-buildkit", buildkit=True, base=bases[0])
    version = docker(
        "run", "--rm", "--network", "none", f"{TAG}-buildkit", "--help", check=False
    ) + docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python",
        f"{TAG}-buildkit",
        "-c",
        "import shoal.drain, hi.app; print('imports ok')",
    )
    assert "imports ok" in version


@pytest.mark.rolling
@pytest.mark.parametrize("order", ["ecs", "compose"])
def test_rolling_restart_under_load_drops_nothing(
    bases: tuple[str, str], order: str, tmp_path: Path
) -> None:
    """One container of each service replaced under 100 req/s: no failure, no non-2xx,
    no lost /wait event, every cron tick once. (`python -m tests.deploy.rolling` is
    the full run: every container, 200 req/s, 60 s.)"""
    if shutil.which("hey") is None:
        pytest.skip("the load generator `hey` is not installed (apt-get install hey)")
    image = f"{TAG}-rolling"
    build_image(image, buildkit=False, base=bases[0])
    cluster = rolling.Cluster(f"shoalpytest{os.getpid()}{order}", image, bases[1], tmp_path)
    try:
        cluster.up()
        rolling.wait_clustered(cluster)
        import asyncio

        summary = asyncio.run(
            rolling.measure(cluster, order, rate=100, min_seconds=20, per_service=1)
        )
    finally:
        cluster.down()
        docker("rmi", "-f", image, check=False)
    print(summary.text())
    assert len(summary.replaced) == 2
    assert summary.rate >= 80, summary.text()
    assert summary.failed == 0, summary.text()
    assert not summary.non_2xx, summary.text()
    assert summary.events_lost == 0 and summary.waits > 0, summary.text()
    assert summary.ticks_expected > 0, summary.text()
    assert summary.ticks_missed == 0 and summary.ticks_twice == 0, summary.text()
    assert summary.exit_codes == [0, 0], summary.text()
