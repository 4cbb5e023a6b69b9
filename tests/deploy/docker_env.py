"""The Docker engine and the images the container tests need, made on this machine.

No container registry is reachable here, so the official base images are
replaced by stand-ins built from Debian packages (`mmdebstrap` bookworm) and
passed to the Dockerfile as `BASE_IMAGE`; HAProxy's stand-in is Debian's
haproxy with its config at the official image's path. Each is built once and
then found by its tag, so repeated runs are fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.deploy.deploy_helpers import DOCKERFILE, REPO

PYTHON_BASE = "shoal-test/python-base:bookworm"
HAPROXY_BASE = "shoal-test/haproxy-base:bookworm"
HAPROXY_CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"
_MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result.stdout


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return result.returncode == 0


def why_no_docker() -> str | None:
    """None when the container tests can run; else the reason they skip."""
    if os.geteuid() != 0:
        return "needs root to run the Docker engine"
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        return "Docker is not installed (apt-get install docker.io docker-compose)"
    if not engine_answers():
        return "no Docker engine answers (scripts/test starts dockerd as root)"
    if shutil.which("mmdebstrap") is None and not image_exists(PYTHON_BASE):
        return "needs mmdebstrap to build the stand-in base images (apt-get install mmdebstrap)"
    return None


def image_exists(tag: str) -> bool:
    result = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def standin_images() -> tuple[str, str]:
    """The Python and HAProxy stand-ins, built (one bookworm root file system) if missing."""
    if not image_exists(PYTHON_BASE):
        # python3 + venv as the official slim image has them; haproxy for the second one.
        debootstrap = subprocess.Popen(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates,haproxy",
                "--aptopt=Acquire::Retries 3",
                "bookworm",
                "-",
                *_MIRRORS,
            ],
            stdout=subprocess.PIPE,
        )
        try:
            subprocess.run(
                [
                    "docker",
                    "import",
                    "-c",
                    'CMD ["python3"]',
                    "-c",
                    "ENV LANG=C.UTF-8",
                    "-",
                    PYTHON_BASE,
                ],
                stdin=debootstrap.stdout,
                check=True,
                capture_output=True,
                timeout=1200,
            )
        finally:
            assert debootstrap.stdout is not None
            debootstrap.stdout.close()
            debootstrap.wait(timeout=60)
        if debootstrap.returncode != 0:
            docker("rmi", PYTHON_BASE, check=False)
            raise RuntimeError("mmdebstrap failed to build the Python stand-in")
    if not image_exists(HAPROXY_BASE):
        dockerfile = (
            f"FROM {PYTHON_BASE}\n"
            "STOPSIGNAL SIGUSR1\n"
            f'CMD ["haproxy", "-W", "-db", "-f", "{HAPROXY_CONFIG_PATH}"]\n'
        )
        subprocess.run(
            ["docker", "build", "-q", "--network", "none", "-t", HAPROXY_BASE, "-"],
            input=dockerfile,
            text=True,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return PYTHON_BASE, HAPROXY_BASE


def build_wheels() -> None:
    """deploy/docker/build-wheels: the lock's wheels and the project's, outside the image."""
    subprocess.run(
        [str(REPO / "deploy" / "docker" / "build-wheels")],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=900,
    )


def docker_cli_for_buildkit() -> list[str] | None:
    """A docker CLI that builds with BuildKit: `buildx`, or a CLI with BuildKit built in
    (Debian's 20.10 docker.io); None when neither is installed."""
    probe = subprocess.run(
        ["docker", "buildx", "version"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode == 0:
        return ["docker"]
    debian = Path("/usr/bin/docker")
    if debian.exists():
        version = subprocess.run(
            [str(debian), "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) < 23:
            return [str(debian)]
    return None


def build_image(tag: str, *, buildkit: bool, base: str = PYTHON_BASE) -> float:
    """Build the hi image offline (`--network none`) with one builder; seconds taken."""
    cli = docker_cli_for_buildkit() if buildkit else ["docker"]
    if cli is None:
        raise RuntimeError("no BuildKit builder: neither buildx nor a docker CLI < 23")
    env = {**os.environ, "DOCKER_BUILDKIT": "1" if buildkit else "0"}
    started = time.monotonic()
    result = subprocess.run(
        [
            *cli,
            "build",
            "--network",
            "none",
            "-f",
            str(DOCKERFILE),
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            tag,
            str(REPO),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"image build failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return time.monotonic() - started
