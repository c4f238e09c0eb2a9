"""The local API under attack, against a real agent process (`python -m edge_agent run`) over real HTTP.

A chunked body of 200 MB, anonymous callers, a DNS-rebinding page's Host header, an unusable token
file: each refused, and the agent's memory stays flat while it refuses.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fleet_dev.proc import die_with_parent, free_port, stop, wait_for
from tests.http_util import chunked_upload, rss_kib

TOKEN = "hostile-test-token-" + "c0ffee42" * 6
UPLOAD_BYTES = 200 * 1024 * 1024
# Generous: the agent answers 413 after 64 KiB (events) or ~11 MB (face); the old code held it all.
RSS_GROWTH_LIMIT_KIB = 100 * 1024
GOOD = {
    "type": "service.completed",
    "body": {"session": "h-1", "service_code": "TQ02", "duration_s": 30.0, "face_login": False},
}

pytestmark = pytest.mark.timeout(180)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {TOKEN}", **headers},
            timeout=10,
        )


def agent_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(
        EDGE_ENVIRONMENT="production",
        EDGE_TERMINAL_ID="t-hostile",
        EDGE_PASSWORD="not-a-real-password",
        EDGE_BROKER_PORT=str(free_port()),  # no broker: the API works while the uplink is down
        EDGE_DATA_DIR=str(tmp_path / "data"),
        EDGE_API_PORT=str(port),
        EDGE_FACE_ENABLED="false",  # the face prefix keeps its own body limit without the models
    )
    env.update(extra)
    return env


def token_file(tmp_path: Path, mode: int = 0o640) -> Path:
    path = tmp_path / "api.token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    port = free_port()
    log = tmp_path / "agent.log"
    env = agent_env(tmp_path, port, EDGE_API_TOKEN_FILE=str(token_file(tmp_path)))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    ap = AgentProcess(proc, port, tmp_path / "data", log)

    def live() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(live, 60, what="the agent's local API")
        yield ap
    finally:
        stop(proc)


def _depth(ap: AgentProcess) -> int:
    with ap.client() as c:
        return int(c.get("/v1/health").json()["outbox"]["depth"])


@pytest.mark.parametrize(
    ("path", "head"),
    [
        ("/v1/events", b'{"type":"peripheral.fault","body":{"peripheral":"printer","code":"jam","message":"'),
        ("/v1/face/verify", b'{"citizen_id":"110101199001011234","image":"'),
    ],
    ids=["events", "face"],
)
def test_chunked_body_far_over_the_limit_is_refused_while_reading_and_memory_stays_flat(
    agent: AgentProcess, path: str, head: bytes
) -> None:
    before = rss_kib(agent.proc.pid)
    up = chunked_upload(
        agent.port, path, total_bytes=UPLOAD_BYTES, head=head, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    after = rss_kib(agent.proc.pid)
    growth = after["VmHWM"] - before["VmRSS"]  # the peak while the upload ran, not a sample
    print(
        json.dumps(
            {
                "path": path,
                "offered_mb": UPLOAD_BYTES >> 20,
                "sent_before_answer_mb": round(up.sent_bytes / 2**20, 1),
                "rss_before_mb": round(before["VmRSS"] / 1024, 1),
                "rss_peak_mb": round(after["VmHWM"] / 1024, 1),
                "status": up.status,
            }
        )
    )
    assert up.status == 413, (up.status, up.body[:300])
    assert json.loads(up.body)["error"] == "too_large"
    assert growth < RSS_GROWTH_LIMIT_KIB, f"agent grew by {growth / 1024:.0f} MB for a refused body"
    assert up.sent_bytes < UPLOAD_BYTES  # it stopped reading long before the end
    assert agent.proc.poll() is None
    assert _depth(agent) == 0
    with agent.client() as c:
        assert c.post("/v1/events", json=GOOD).status_code == 201  # and it keeps serving


def test_anonymous_callers_and_rebinding_pages_get_nothing_from_the_real_agent(agent: AgentProcess) -> None:
    base = f"http://127.0.0.1:{agent.port}"
    for method, path in [("POST", "/v1/events"), ("GET", "/v1/health"), ("GET", "/metrics"),
                         ("POST", "/v1/face/identify"), ("POST", "/v1/face/erase"), ("GET", "/docs")]:  # fmt: skip
        r = httpx.request(method, base + path, json={"citizen_id": "110101199001011234"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "missing_token", (path, r.text)
    # a web page in the kiosk's browser whose DNS name now points at 127.0.0.1: its Host is its own
    with agent.client(Host=f"kiosk-promo.example:{agent.port}") as rebound:
        r = rebound.post("/v1/events", json=GOOD)
        assert r.status_code == 421 and r.json()["error"] == "wrong_host"
        assert rebound.post("/v1/face/identify", json={"image": "AAAA"}).status_code == 421
    assert httpx.get(base + "/v1/live", timeout=10).content == b""
    assert _depth(agent) == 0
    with agent.client() as c:
        assert c.post("/v1/events", json=GOOD).status_code == 201


def test_outbox_files_of_the_running_agent_are_owner_only(agent: AgentProcess) -> None:
    with agent.client() as c:
        assert c.post("/v1/events", json=GOOD).status_code == 201
    files = sorted(agent.data_dir.glob("outbox.db*"))
    assert [f.name for f in files] == ["outbox.db", "outbox.db-shm", "outbox.db-wal"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}


@pytest.mark.parametrize("problem", ["unset", "world_readable", "empty"])
def test_production_agent_refuses_to_start_without_a_usable_token_file(tmp_path: Path, problem: str) -> None:
    extra = {}
    if problem != "unset":
        path = token_file(tmp_path, mode=0o644 if problem == "world_readable" else 0o600)
        if problem == "empty":
            path.write_text("\n")
        extra["EDGE_API_TOKEN_FILE"] = str(path)
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run"],
        env=agent_env(tmp_path, free_port(), **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration is not usable" in done.stderr
    assert {"unset": "api_token_file is not set", "world_readable": "mode 644", "empty": "32 or more"}[problem] in (
        done.stderr
    )
