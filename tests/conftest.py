"""Suite-wide hooks: under CI a skip is a failure.

Tests skip when a real part they need is missing here (network namespaces, Postgres, Chromium,
compose, haproxy, hadolint, multicast on loopback, atheris...). On a developer's machine that
is fine and the run lists the skips (`-rs`). In CI (`CI=true`, as GitHub Actions and most CI
services set it) a lost part would make whole areas vanish from the run without a word, so
every skip is turned into a failure that names what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(longrepr: Any) -> str:
    """The skip reason from a skipped report's (path, line, reason) triple."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail(report: Any, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"CI=true and {where} would be skipped: {_reason(report.longrepr)}\n"
        "In CI every real part the tests need must be present (see ./scripts/test)."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        _fail(report, collector.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under scripts/mutation (SHOAL_MUTATION=1), leave out the tests that start node processes:
    a mutant lives only in the pytest process, so they cannot see it and only cost time."""
    if os.environ.get("SHOAL_MUTATION") != "1":
        return
    keep = [item for item in items if "procs" not in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
