"""An app's first lines stay light: `import shoal`, `Settings(...)` and `Node(...)`.

The issue's target: 100 ms of CPU in all, asyncio included (it took about 190
ms, 140 of them urllib.request for the ECS metadata lookup; later 115-140 ms,
mostly dataclasses and the jobs modules). asyncio alone takes about 50 ms on
the 2-core project machine; shoal's own part (the import, then a Settings and
a Node) about 20 ms: the jobs modules wait for `node.start()` or the first use
of `node.jobs`, internal records are NamedTuples or plain classes (a dataclass
compiles its methods at import), and standard modules that only one feature
needs (zoneinfo, json, urllib.parse, random, ...) are imported where used.

Measured in fresh interpreters, with bytecode compiled once beforehand (as
`pip install` does; this suite may run with PYTHONDONTWRITEBYTECODE set), as the
CPU time: wall-clock time on a machine shared with the rest of the suite
measures the neighbours, and CPU time still grows under load (shared cores and
caches), so the best of up to 20 runs counts: about 20 ms for shoal's part,
idle or next to two CPU-bound processes. shoal's bound is 30 ms, below the 50 ms
target, so that an import the size of urllib.request's (15 ms more) fails it;
the total's (100 ms) alone would not catch that.

`python -X importtime -c "import shoal"` shows where the time goes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

RUNS = 20
OWN_BOUND_MS = 30.0
TOTAL_BOUND_MS = 100.0

MEASURE = (
    "import os, time\n"
    "t = time.process_time()\n"
    "import asyncio\n"
    "a = time.process_time()\n"
    "from shoal import Node, Settings\n"
    "Node(Settings(cookie=os.environ['COOKIE'], host='127.0.0.1', topology='static'))\n"
    "print((time.process_time() - a) * 1000, (time.process_time() - t) * 1000)\n"
)


def test_an_apps_first_lines_are_light(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # compiled once, outside the repo
    env["COOKIE"] = secrets.token_urlsafe(32)
    subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True, capture_output=True)
    own: list[float] = []
    total: list[float] = []
    for _ in range(RUNS):
        run = subprocess.run(
            [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True
        )
        shoal_ms, total_ms = map(float, run.stdout.split())
        own.append(shoal_ms)
        total.append(total_ms)
        if min(own) <= OWN_BOUND_MS and min(total) <= TOTAL_BOUND_MS:
            break
    print(
        f"import shoal, Settings, Node: {min(total):.1f} ms CPU from a bare interpreter, "
        f"{min(own):.1f} ms after asyncio (best of {len(own)} runs)"
    )
    assert min(own) <= OWN_BOUND_MS, f"shoal's part took {min(own):.1f} ms"
    assert min(total) <= TOTAL_BOUND_MS, f"asyncio and shoal took {min(total):.1f} ms"


def test_the_jobs_modules_wait_for_the_node_to_use_them() -> None:
    """What the timing above relies on, checked exactly: which modules load when."""
    code = (
        "import os, sys\n"
        "from shoal import Node, Settings\n"
        "node = Node(Settings(cookie=os.environ['COOKIE'], host='127.0.0.1', topology='static'))\n"
        "late = ('shoal.jobs', 'shoal.scheduler', 'shoal.cron', 'zoneinfo', 'json',\n"
        "        'urllib.request', 'cryptography')\n"
        "print(*[m for m in late if m in sys.modules])\n"
        "node.jobs\n"
        "from shoal import JobNotFound, RunContext\n"
        "print(RunContext.__module__, JobNotFound.__module__, 'shoal.jobs' in sys.modules)\n"
    )
    env = {**os.environ, "COOKIE": secrets.token_urlsafe(32)}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.splitlines() == ["", "shoal.jobmodel shoal.jobmodel True"]
