"""Face login is optional: without its packages the agent still builds its API and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.face

SCRIPT = """
import logging, sys
sys.modules["dlib"] = None  # as if dlib-bin were not installed
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from edge_agent.__main__ import _face_routers
from edge_agent.agent import Agent
from edge_agent.api.app import create_api
from edge_agent.config import AgentSettings
agent = Agent(AgentSettings(environment="test", terminal_id="t-noface", data_dir=sys.argv[1]))
routers = _face_routers(agent)
app = create_api(agent, extra_routers=routers)
face_routes = sum("/v1/face" in getattr(r, "path", "") for r in app.routes)
print("routers", len(routers), "face routes", face_routes)
agent.outbox.close()
"""


def test_agent_builds_without_face_packages_and_logs_why(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert "routers 0 face routes 0" in proc.stdout
    assert "face login is unavailable on this terminal" in proc.stdout
