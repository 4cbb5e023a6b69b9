"""A short nemesis run per singleton mode (bench/nemesis.py): random faults, no tick run twice.

The long runs (10 minutes and more per mode) are documented in the README;
this keeps the fault suite and its checker from rotting, and catches gross
regressions. The paused-holder race has its own focused test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import netns_unavailable_reason
from tests.support.postgres import unavailable_reason

NEMESIS = Path(__file__).resolve().parents[2] / "bench" / "nemesis.py"
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
    ),
]


@pytest.mark.parametrize("mode", ["quorum", "lease", "mesh"])
def test_a_minute_of_faults_runs_no_tick_twice(mode: str, tmp_path: Path) -> None:
    if mode == "lease" and unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    result = subprocess.run(
        [
            sys.executable,
            str(NEMESIS),
            "--mode",
            mode,
            "--minutes",
            "1",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    faults = re.search(r"faults \{(.*?)\}", out)
    assert faults is not None, out
    assert sum(int(n) for n in re.findall(r": (\d+)", faults[1])) >= 3, out
    assert re.search(r"^ticks run twice: 0 ", out, re.M), out
    ticks = re.search(r"^ticks (\d+); runs (\d+)", out, re.M)
    assert ticks is not None and int(ticks[2]) >= int(ticks[1]) // 3, out
