"""Fixtures for tests that run real `hi` processes (helpers live in tests/support)."""

from __future__ import annotations

from tests.support.fixtures import procs  # noqa: F401
