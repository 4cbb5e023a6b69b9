"""Tick lateness: ``.venv/bin/python -m tests.scheduler.bench_lateness [N]``.

Runs a ``* * * * * *`` job for N ticks (default 30) and prints p50/p99/max of the time between
each tick's due instant and the moment the job function started.
"""

from __future__ import annotations

import asyncio
import statistics
import sys

from shoal.scheduler import RunResult, Scheduler


async def measure(ticks: int) -> list[float]:
    results: asyncio.Queue[RunResult] = asyncio.Queue()
    scheduler = Scheduler(node="bench", leading=True)
    scheduler.on_job_stop = lambda job, result: results.put_nowait(result)
    scheduler.add_job("* * * * * *", lambda: None, name="bench")
    async with scheduler:
        return [(await asyncio.wait_for(results.get(), 5)).lateness for _ in range(ticks)]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ticks = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    lateness = [late * 1000 for late in asyncio.run(measure(ticks))]
    print(
        f"tick lateness over {ticks} ticks: p50 {statistics.median(lateness):.3f} ms, "
        f"p99 {percentile(lateness, 99):.3f} ms, max {max(lateness):.3f} ms, "
        f"min {min(lateness):.3f} ms"
    )


if __name__ == "__main__":
    main()
