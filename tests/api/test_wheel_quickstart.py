"""Acceptance: a new user's two-node app, from the README alone, on the built wheel.

The wheel is built from a copy of this checkout (`pip wheel`: its build backend and
the wheels of its dependencies come from pip's cache or the configured index), then
installed into a fresh virtualenv with `--no-index --find-links` from that
directory only: nothing of this repository's `.venv` or `src/` is on its path.
The README's quick start runs there as two real processes, which must meet,
call, publish and wait_for, run the singleton and the job, and leave cleanly
on SIGTERM (the peer sees `leaving`) and SIGINT, exiting 0. The cookie comes
from the installed `shoal cookie`, as in the README.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.test_docs import BLOCKS
from tests.support.procs import Procs
from tests.support.quickstart import check_two_node_app

ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "build",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".mutation",
    "cdk.out",
    "node_modules",
    "wheels",
)


def _run(argv: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert run.returncode == 0, f"{argv[:4]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_quick_start_works_from_the_built_wheel(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE)
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        timeout=600,
    )
    built = sorted(wheels.glob("shoal-*.whl"))
    assert len(built) == 1, built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheels),
            str(built[0]),
        ],
        timeout=600,
    )
    where = _run(
        [str(python), "-c", "import shoal; print(shoal.__file__)"], timeout=60, cwd=tmp_path
    )
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed wheel, not src/
    cookie = _run([str(venv / "bin" / "shoal"), "cookie"], timeout=60).stdout.strip()

    (quick_start,) = [b for b in BLOCKS if b.mode == "cluster" and b.path.name == "README.md"]
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    app = app_dir / "app.py"
    app.write_text(quick_start.code)
    with Procs() as procs:
        check_two_node_app(str(python), app, procs, cookie=cookie)
