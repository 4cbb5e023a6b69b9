"""`import shoal` stays light: the issue's bound is 100 ms (it took about 190 ms).

Measured in fresh interpreters, with bytecode compiled once beforehand (as
`pip install` does; this suite may run with PYTHONDONTWRITEBYTECODE set), as the
CPU time of the import: wall-clock time on a machine shared with the rest of
the suite measures the neighbours, and CPU time still grows under load (shared
cores and caches), so the best of up to 20 runs counts. Two figures:

- what shoal adds to a process that already imported asyncio (which any asyncio
  app has): at most 50 ms; about 10-15 ms on an idle machine, 35 ms on this
  project's loaded 2-core machine (urllib.request alone used to cost 140 ms);
- the whole `import shoal` from a bare interpreter: at most 100 ms on an idle
  machine (about 30 ms there); the assertion allows 150 ms, for a machine
  loaded by the rest of the suite (asyncio alone then takes 50 ms).

`python -X importtime -c "import shoal"` shows where the time goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUNS = 20
SHOAL_BOUND_MS = 50.0
TOTAL_BOUND_MS = 150.0

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
