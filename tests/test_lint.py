"""House style is checked like behaviour: ruff over every package, benchmark and test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is a dev dependency (pip install -e '.[dev]')"
    out = subprocess.run([ruff, "check", "--output-format", "concise", "fleet_wire", "edge_agent",
                          "fleet_server", "bench", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
