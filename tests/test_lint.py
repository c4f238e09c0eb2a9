"""House style is checked like behaviour: ruff lint and format, mypy strict over the three deliverable
packages and the dev package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINTED = ["fleet_wire", "edge_agent", "fleet_server", "fleet_dev", "bench", "tests"]
TYPED = ["fleet_wire", "edge_agent", "fleet_server", "fleet_dev"]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: it is a dev dependency (pip install -e '.[dev]')"
    return found


def test_ruff_finds_nothing() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", "--output-format", "concise", *LINTED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_applied() -> None:
    out = subprocess.run(
        [_tool("ruff"), "format", "--check", *LINTED], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, "run `ruff format` on:\n" + out.stdout + out.stderr


def test_mypy_strict_finds_nothing() -> None:
    """Strict typing over the three deliverable packages and the dev package (settings in pyproject.toml)."""
    packages = [arg for p in TYPED for arg in ("-p", p)]
    out = subprocess.run([_tool("mypy"), "--no-incremental", *packages], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
