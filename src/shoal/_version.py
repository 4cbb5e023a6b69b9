"""The installed distribution's version, read from its metadata on first use.

`importlib.metadata` costs a few milliseconds to import, so the lookup waits
until someone asks (`shoal --version`, `shoal.__version__`).
"""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """The version pyproject.toml declares, as installed; `0+unknown` from a bare source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("shoal")
    except PackageNotFoundError:
        return "0+unknown"
