"""The components a Node is made of do not import the Node back.

`singleton`, `jobs` and `control` each depend on a small Protocol of what they
use from their node (`SingletonHost`, `JobsHost`, `ControlHost`; mypy checks
that `Node` satisfies them where it builds them), so each can be read and
tested on its own, and there is no import circle through `shoal.node`, not
even one for type checking.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "shoal"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("component", ["singleton", "jobs", "control"])
def test_a_component_does_not_import_the_node(component: str) -> None:
    imported = imported_modules(SRC / f"{component}.py")
    assert "shoal.node" not in imported, f"shoal/{component}.py imports shoal.node"
