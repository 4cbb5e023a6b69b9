"""A few seconds of the atheris fuzz run (bench/fuzz_wire.py), so it cannot rot.

The real run is longer and separate: `.venv/bin/python bench/fuzz_wire.py
-max_total_time=300` (see the README).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZER = Path(__file__).resolve().parents[2] / "bench" / "fuzz_wire.py"


def test_fuzz_wire_smoke(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(FUZZER), "-runs=50000", "-max_total_time=10", "-timeout=5"],
        cwd=tmp_path,  # libFuzzer writes crash-* files into the working directory
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr
    assert not list(tmp_path.glob("crash-*"))
