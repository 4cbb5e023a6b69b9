"""The published `shoal` wheel: the library alone, its license, and a CLI that runs on the core.

The wheel is built from the repository as `pip wheel` builds it for an index, then
installed into a fresh virtualenv with its required dependencies only.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
USER_EXTRAS = {"web", "uvloop", "aws", "lease", "metrics"}


def run(*command: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # From a copy of what the source distribution holds: a `build/` left in the
    # repository by an older build would otherwise leak stale files into the wheel.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    run(VENV_PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source)
    (built,) = out.glob("shoal-*.whl")
    return built


def test_the_wheel_holds_only_the_library_and_its_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"shoal-{VERSION}.dist-info"
        assert {name.split("/")[0] for name in names} == {"shoal", info}
        assert "shoal/py.typed" in names and "shoal/cli.py" in names
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert license_text == (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert metadata["License-Expression"] == "Apache-2.0"
    # One script, the library's own; the example app is its own distribution.
    scripts = [line for line in entry_points.splitlines() if "=" in line]
    assert scripts == ["shoal = shoal.cli:main"]
    # Only user-facing extras are published; the core pulls no CLI framework.
    assert set(metadata.get_all("Provides-Extra") or []) == USER_EXTRAS
    core = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert sorted(r.split("<")[0].split(">")[0] for r in core) == [
        "cryptography",
        "dnspython",
        "msgpack",
    ]
    assert metadata["Version"] == VERSION
    assert any(
        c.startswith("Programming Language :: Python :: 3.11")
        for c in metadata.get_all("Classifier") or []
    )
    assert any(
        url.startswith("Repository, https://") for url in metadata.get_all("Project-URL") or []
    )


def test_a_fresh_venv_with_the_wheel_runs_the_cli_and_has_no_hi(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # The repository's pip installs into the new venv: the wheel and its required dependencies.
    run(VENV_PYTHON, "-m", "pip", "--python", python, "install", "-q", wheel)
    version = run(venv / "bin" / "shoal", "--version")
    assert version.stdout.strip() == f"shoal {VERSION}"
    helped = run(venv / "bin" / "shoal", "--help")
    for command in ("cookie", "lookup", "status", "nodes", "ping", "connect", "jobs", "remote"):
        assert command in helped.stdout
    installed = run(
        python,
        "-c",
        "import importlib.util as u, shoal; "
        "print(shoal.__version__, u.find_spec('hi') is None, u.find_spec('typer') is None)",
    )
    assert installed.stdout.split() == [VERSION, "True", "True"]
    assert not (venv / "bin" / "hi").exists()
