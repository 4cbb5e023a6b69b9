"""Every Python block of README.md and docs/*.md runs, or says why not.

Before a ```python fence, an HTML comment says how the block is tested:
- none: it is run as a script (exit status 0 within a minute);
- `<!-- run: cluster -->`: it is a node's app, run as a real two-node cluster
  (tests/support/quickstart.py says what is checked);
- `<!-- not run: REASON -->`: a fragment, with the reason.
Every block that runs also passes `mypy --strict`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import Procs
from tests.support.quickstart import check_two_node_app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|py|python3)\s*$")
MARK = re.compile(r"^<!--\s*(run|not run):\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str
    mode: str  # "script", "cluster" or "not run"
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if not FENCE.match(lines[i]):
                i += 1
                continue
            start = i
            before = lines[i - 1].strip() if i > 0 else ""
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            mark = MARK.match(before)
            mode, reason = "script", ""
            if mark is not None:
                kind, text = mark.groups()
                if kind == "run" and text == "cluster":
                    mode = "cluster"
                elif kind == "not run":
                    mode, reason = "not run", text
                else:
                    mode, reason = "unknown", before
            found.append(Block(path, start + 1, "\n".join(body) + "\n", mode, reason))
            i += 1
    return found


BLOCKS = blocks()


def test_every_block_is_run_or_says_why_not() -> None:
    assert BLOCKS, "no Python blocks found"
    for block in BLOCKS:
        assert block.mode != "unknown", f"{block.id}: unknown marker {block.reason!r}"
        if block.mode == "not run":
            assert len(block.reason) >= 10, f"{block.id}: say why the block is not run"
    readme = [b for b in BLOCKS if b.path.name == "README.md"]
    assert readme[0].mode == "cluster", "the README's first example is the quick start"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "script"], ids=lambda b: b.id)
def test_a_script_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code)
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"{block.id} failed:\n{run.stdout}\n{run.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "cluster"], ids=lambda b: b.id)
def test_a_cluster_block_runs_on_two_nodes(block: Block, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(block.code)
    with Procs() as procs:
        check_two_node_app(sys.executable, app, procs)


def test_the_blocks_that_run_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for n, block in enumerate(b for b in BLOCKS if b.mode in ("script", "cluster")):
        path = tmp_path / f"block_{n}.py"
        path.write_text(f"# {block.id}\n{block.code}")
        files.append(str(path))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *files,
        ],
        cwd=tmp_path,
        env={**__import__("os").environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
