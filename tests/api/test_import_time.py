"""`import shoal` stays light: no HTTP client, no cryptography, no optional extra.

The issue's target is 100 ms (it took about 190 ms, 140 ms of it urllib.request
for the ECS metadata lookup). Measured on the 2-core project machine, idle,
after the jobs work of issue 10 merged: asyncio alone 50 ms of CPU, shoal's own
part about 64 ms, the whole import 115-143 ms; shoal's part is mostly the
creation of about twenty dataclasses (Settings has some sixty fields) and the
jobs modules that every Node uses. The target is not met yet (see the README).

Measured in fresh interpreters, with bytecode compiled once beforehand (as
`pip install` does; this suite may run with PYTHONDONTWRITEBYTECODE set), as the
CPU time of the import: wall-clock time on a machine shared with the rest of
the suite measures the neighbours, and CPU time still grows under load (shared
cores and caches), so the best of up to 20 runs counts. The bounds leave room
for that load and still fail on a heavy import such as urllib.request's.

`python -X importtime -c "import shoal"` shows where the time goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUNS = 20
SHOAL_BOUND_MS = 100.0
TOTAL_BOUND_MS = 200.0

MEASURE = (
    "import time\n"
    "t = time.process_time()\n"
    "import asyncio\n"
    "a = time.process_time()\n"
    "import shoal\n"
    "print((time.process_time() - a) * 1000, (time.process_time() - t) * 1000)\n"
)


def test_import_shoal_is_light(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # compiled once, outside the repo
    subprocess.run([sys.executable, "-c", "import shoal"], env=env, check=True)
    own: list[float] = []
    total: list[float] = []
    for _ in range(RUNS):
        run = subprocess.run(
            [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True
        )
        shoal_ms, total_ms = map(float, run.stdout.split())
        own.append(shoal_ms)
        total.append(total_ms)
        if min(own) <= SHOAL_BOUND_MS and min(total) <= TOTAL_BOUND_MS:
            break
    print(
        f"import shoal: {min(total):.1f} ms CPU from a bare interpreter, "
        f"{min(own):.1f} ms after asyncio (best of {len(own)} runs)"
    )
    assert min(own) <= SHOAL_BOUND_MS, f"shoal's own import took {min(own):.1f} ms"
    assert min(total) <= TOTAL_BOUND_MS, f"import shoal took {min(total):.1f} ms"
