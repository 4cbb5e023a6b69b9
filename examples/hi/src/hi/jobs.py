"""The seed's cron job: log where it runs, once per cluster, on `HI_JOB_SCHEDULE`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from shoal import ConfigError, Node
from shoal.cron import CronError, CronSchedule
from shoal.scheduler import RunContext

log = logging.getLogger("hi.jobs")

DEFAULT_SCHEDULE = "*/5 * * * * *"


def add_hi_job(node: Node, env: Mapping[str, str]) -> None:
    """Register the job; a bad `HI_JOB_SCHEDULE` or `HI_JOB_SECONDS` is a ConfigError."""
    schedule = env.get("HI_JOB_SCHEDULE") or DEFAULT_SCHEDULE
    try:
        CronSchedule.parse(schedule)
    except CronError as exc:
        raise ConfigError(f"HI_JOB_SCHEDULE: {exc}") from None
    work_text = env.get("HI_JOB_SECONDS") or "0"
    try:
        work = float(work_text)  # simulated work, to show handovers of a running job
    except ValueError:
        raise ConfigError(f"HI_JOB_SECONDS={work_text!r} is not a number.") from None
    if not 0 <= work <= 3600:
        raise ConfigError(f"HI_JOB_SECONDS={work_text!r}: expected 0 to 3600 seconds.")

    misfire = env.get("HI_JOB_MISFIRE") or "skip"
    if misfire not in ("skip", "run_once"):
        raise ConfigError(f"HI_JOB_MISFIRE={misfire!r}: use skip or run_once.")

    @node.job(schedule, name="hi", misfire=misfire)
    async def hi_job(ctx: RunContext) -> None:
        peers = ", ".join(node.nodes())
        log.info(
            "Job running on: %s with cookie %s from possible hosts: [%s]",
            node.name,
            node.cookie_fingerprint,
            peers,
        )
        # For fault-injection checkers (bench/nemesis.py): which tick, under which token.
        lead = node.singletons.snapshot().get("shoal.scheduler") or {}
        log.info(
            "Job tick on: %s tick %s token %s", node.name, ctx.tick.isoformat(), lead.get("token")
        )
        if work:
            started = time.monotonic()
            await asyncio.sleep(work)
            log.info("Job done on: %s after %.3f s", node.name, time.monotonic() - started)

    node.jobs.task("hi")(hi_job)  # run-time jobs may run it too: `shoal jobs add NAME SCHED hi`
