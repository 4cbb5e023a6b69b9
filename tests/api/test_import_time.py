"""An app's first lines stay light: `import shoal`, `Settings(...)` and `Node(...)`.

The issue's target: 100 ms of CPU in all, asyncio included, when asyncio alone
took about 50 ms (it took about 190 ms, 140 of them urllib.request for the ECS
metadata lookup; later 115-140 ms, mostly dataclasses and the jobs modules).
shoal's own part (the import, then a Settings and a Node) is now about 0.4 of
asyncio's import: the jobs modules wait for `node.start()` or the first use of
`node.jobs`, internal records are NamedTuples or plain classes (a dataclass
compiles its methods at import), and standard modules that only one feature
needs (zoneinfo, json, urllib.parse, random, ...) are imported where used.

Measured in fresh interpreters, with bytecode compiled once beforehand (as
`pip install` does; this suite may run with PYTHONDONTWRITEBYTECODE set), as CPU
time. The absolute figure depends on the machine's state, not only on the code:
on the 2-core project VM `import asyncio` takes 50-60 ms of CPU while another
process keeps a core busy and 85-100 ms when the machine is otherwise idle. So
the test bounds shoal's part as a ratio to asyncio's import, measured in the same
interpreter: 0.38-0.45 in either state. The bound, 0.6, is what 100 ms in all
allows when asyncio takes 60 ms (shoal then has 40 ms), and an import the size of
urllib.request's (0.25-0.3 of asyncio's) fails it. The absolute figures are printed.

`python -X importtime -c "import shoal"` shows where the time goes.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
from pathlib import Path

RUNS = 9
RATIO_BOUND = 0.6

MEASURE = (
    "import os, time\n"
    "t = time.process_time()\n"
    "import asyncio\n"
    "a = time.process_time()\n"
    "from shoal import Node, Settings\n"
    "Node(Settings(cookie=os.environ['COOKIE'], host='127.0.0.1', topology='static'))\n"
    "print((a - t) * 1000, (time.process_time() - a) * 1000)\n"
)


def test_an_apps_first_lines_cost_a_fraction_of_asyncios_import(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # compiled once, outside the repo
    env["COOKIE"] = secrets.token_urlsafe(32)
    subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True, capture_output=True)
    asyncio_ms: list[float] = []
    shoal_ms: list[float] = []
    for _ in range(RUNS):
        run = subprocess.run(
            [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True
        )
        base, own = map(float, run.stdout.split())
        asyncio_ms.append(base)
        shoal_ms.append(own)
    ratio = statistics.median(own / base for own, base in zip(shoal_ms, asyncio_ms, strict=True))
    print(
        f"import asyncio {statistics.median(asyncio_ms):.1f} ms CPU, then import shoal, "
        f"Settings, Node {statistics.median(shoal_ms):.1f} ms (medians of {RUNS} runs): "
        f"{ratio:.2f} of asyncio's import"
    )
    assert ratio <= RATIO_BOUND, f"shoal's part took {ratio:.2f} of asyncio's import time"


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
