"""Read the deployment files the way Docker and docker compose read them.

The tests take commands and settings from the real Dockerfile and compose
file instead of repeating them, so a change there is a change under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
HAPROXY_CFG = DOCKER_DIR / "haproxy.cfg"
CDK_DIR = REPO / "deploy" / "cdk"
VENV_BIN = REPO / ".venv" / "bin"
# Where the Dockerfile puts the virtualenv and the app user's home; outside a
# container the repository's .venv and a per-node directory play their parts.
IMAGE_VENV = "/opt/venv"
IMAGE_HOME = "/home/shoal"


@dataclass
class Stage:
    """One `FROM` stage: its base, name and instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Split a Dockerfile into stages of (KEYWORD, arguments), joining `\\` lines."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def exec_form(text: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD; raises if it is shell form."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not an exec-form array: {text!r}")
    return value


def image_command(stage: Stage) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container runtime joins them."""
    entrypoint = stage.args("ENTRYPOINT")
    cmd = stage.args("CMD")
    return (exec_form(entrypoint[-1]) if entrypoint else []) + (exec_form(cmd[-1]) if cmd else [])


def image_env(stage: Stage, base_path: str) -> dict[str, str]:
    """The ENV of a stage (`KEY=VALUE ...` form), `$VAR`/`${VAR}` expanded in order."""
    env = {"PATH": base_path}
    for text in stage.args("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', text):
            value = value.strip('"')
            env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` substitution."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = variables.get(name)
        if op in (":?", "?") and not current:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not current:
            return arg
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def compose_document() -> dict[str, Any]:
    """The compose file as YAML (anchors and `<<` merges resolved)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def compose_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    """A service's `environment`, interpolated as docker compose would."""
    environment = compose_document()["services"][service].get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: interpolate(str(value), variables) for key, value in environment.items()}


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or the standalone `docker-compose`, whichever works."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus AWS credentials and settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CDK_"))}
    env.update(extra)
    return env
