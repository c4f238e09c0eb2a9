"""The agent's local HTTP API for the kiosk app: good input stored, bad input refused with reasons,
and nobody but the kiosk app (holding the terminal's API token, on a loopback Host) gets in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edge_agent.agent import Agent
from edge_agent.api import create_api
from edge_agent.config import AgentSettings

TOKEN = "kiosk-api-token-" + "7f3a9c1e" * 6


def write_token(path: Path, token: str = TOKEN, mode: int = 0o640) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    # not started: the API stores into the outbox whether or not the office uplink is up
    a = Agent(
        AgentSettings(
            environment="production",
            terminal_id="t-api",
            office_id="haidian",
            password="x",
            data_dir=tmp_path,
            outbox_max_rows=10,
            api_token_file=write_token(tmp_path / "api.token"),
        )
    )
    yield a
    a.outbox.close()


@pytest.fixture
def client(agent: Any) -> Any:
    # TestClient's default Host is "testserver", which the API refuses like any foreign name
    with TestClient(
        create_api(agent), base_url="http://127.0.0.1:8700", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        yield c


GOOD = {
    "type": "service.completed",
    "body": {"session": "k-1", "service_code": "DK02", "duration_s": 95.5, "face_login": True},
}


def test_posted_event_is_stored_and_numbered(client: Any, agent: Any) -> None:
    r = client.post("/v1/events", json=GOOD)
    assert r.status_code == 201, r.text
    assert r.json() == {"seq": 1, "epoch": agent.outbox.epoch, "type": "service.completed", "replayed": False}
    assert agent.outbox.depth == 1


@pytest.mark.parametrize(
    "payload, where",
    [
        ({"type": "service.completed", "body": {"session": "k", "duration_s": 3}}, "body"),
        ({"type": "service.teleported", "body": {}}, "type"),
        ({"body": {}}, "body.type"),
        ({"type": "service.completed", "body": {**GOOD["body"], "duration_s": -1}}, "body"),
        ({"type": "service.completed", "body": GOOD["body"], "ts": "2026-11-27T10:00:00"}, "body.ts"),
        ({"type": "service.completed", "body": GOOD["body"], "colour": "red"}, "body.colour"),
    ],
)
def test_bad_event_gets_422_with_reason_and_nothing_is_stored(
    client: Any, agent: Any, payload: dict[str, Any], where: str
) -> None:
    r = client.post("/v1/events", json=payload)
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["error"] and doc["detail"] and doc["where"] == where
    assert agent.outbox.depth == 0


def test_not_json_and_oversized_bodies_are_refused(client: Any, agent: Any) -> None:
    r = client.post("/v1/events", content=b"\x00garbage", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = client.post("/v1/events", content=b"{" + b" " * 70_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert agent.outbox.depth == 0


def test_full_outbox_answers_507_and_counts_the_refusal(client: Any, agent: Any) -> None:
    for i in range(10):
        body = {**GOOD["body"], "session": f"k-{i}"}
        assert client.post("/v1/events", json={"type": "service.completed", "body": body}).status_code == 201
    r = client.post("/v1/events", json=GOOD)
    assert r.status_code == 507 and r.json()["error"] == "outbox_full"
    metrics = client.get("/metrics").text
    assert "edge_outbox_refused_total 1.0" in metrics
    assert "edge_outbox_pending 10.0" in metrics


def test_health_explains_problems_in_plain_words(client: Any) -> None:
    doc = client.get("/v1/health").json()
    assert doc["terminal"] == "t-api" and doc["ok"] is False
    assert any("broker" in p for p in doc["problems"])
    assert doc["outbox"]["depth"] == 0


def test_production_settings_refuse_empty_password_and_public_bind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="EDGE_PASSWORD"):
        AgentSettings(terminal_id="t-1", data_dir=tmp_path)
    with pytest.raises(ValueError, match="loopback"):
        AgentSettings(terminal_id="t-1", password="p", api_host="0.0.0.0", data_dir=tmp_path)


def test_face_routes_may_carry_camera_frames_larger_than_event_posts(client: Any, agent: Any) -> None:
    frame = {"image": "A" * 200_000}
    # no face router in this app: the request gets past the size gate and is simply not found
    assert client.post("/v1/face/verify", json=frame).status_code == 404
    assert client.post("/v1/events", json={"type": "service.completed", "body": frame}).status_code == 413
    over = agent.settings.face.max_request_bytes + 1
    assert client.post("/v1/face/verify", json={"image": "A" * over}).status_code == 413
    assert (
        client.post("/v1/peripherals/readings", json={"peripheral": "printer", "fault": "x" * 70_000}).status_code
        == 413
    )


def test_terminal_disk_full_answers_507_in_plain_words_and_keeps_running(client: Any, agent: Any) -> None:
    db = agent.outbox._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    big = {"type": "peripheral.fault", "body": {"peripheral": "printer", "code": "jam", "message": "x" * 400}}
    codes = [client.post("/v1/events", json=big).status_code for _ in range(40)]
    assert 507 in codes
    r = client.post("/v1/events", json=big)
    assert r.status_code == 507 and r.json()["error"] == "storage_failed"
    assert "nothing was stored" in r.json()["detail"]
    db.execute("PRAGMA max_page_count=1073741823")
    assert client.post("/v1/events", json=GOOD).status_code == 201
    held = agent.outbox.all_seqs()
    assert held == list(range(1, len(held) + 1))  # no holes: refused events took no seq


def test_retry_with_the_same_idempotency_key_stores_nothing_new(client: Any, agent: Any) -> None:
    keyed = {**GOOD, "key": "kiosk-7f3a-0001"}
    first = client.post("/v1/events", json=keyed)
    again = client.post("/v1/events", json=keyed)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["seq"] == first.json()["seq"] and again.json()["replayed"] is True
    by_header = client.post("/v1/events", json=GOOD, headers={"Idempotency-Key": "kiosk-7f3a-0002"})
    assert by_header.status_code == 201
    assert client.post("/v1/events", json=GOOD, headers={"Idempotency-Key": "kiosk-7f3a-0002"}).status_code == 200
    assert agent.outbox.depth == 2
    assert client.post("/v1/events", json={**GOOD, "key": "bad key!"}).status_code == 422


def test_idempotency_keys_survive_restart_and_receipts(tmp_path: Path) -> None:
    from edge_agent.outbox import Outbox
    from fleet_wire.receipt import Receipt

    box = Outbox(tmp_path / "o.db", "t-1")
    body = GOOD["body"]
    first = box.enqueue("service.completed", body, key="k-00000001")
    box.confirm(Receipt("t-1", box.epoch, first.seq))  # stored at the centre and deleted here
    box.close()
    box = Outbox(tmp_path / "o.db", "t-1")  # the agent restarted meanwhile
    again = box.enqueue("service.completed", body, key="k-00000001")
    assert again.replayed and again.seq == first.seq and box.depth == 0
    mixed = box.enqueue_many([("service.completed", body, None)] * 3, keys=["k-00000001", None, "k-00000002"])
    assert [m.replayed for m in mixed] == [True, False, False] and box.depth == 2
    box.close()


def test_same_idempotency_key_with_a_different_event_is_409_and_stores_nothing(client: Any, agent: Any) -> None:
    keyed = {**GOOD, "key": "kiosk-7f3a-0009"}
    assert client.post("/v1/events", json=keyed).status_code == 201
    other = {**keyed, "body": {**GOOD["body"], "duration_s": 12.0}}
    r = client.post("/v1/events", json=other)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "idempotency_key_reused" and r.json()["where"] == "key"
    assert "different request" in r.json()["detail"] and "nothing was stored" in r.json()["detail"]
    assert client.post("/v1/events", json=keyed).status_code == 200  # the real retry still replays
    assert agent.outbox.depth == 1


ROUTES = [
    ("POST", "/v1/events", GOOD),
    ("GET", "/v1/health", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/peripherals", None),
    ("POST", "/v1/peripherals/readings", {"peripheral": "printer", "readings": {"paper_left_pct": 5}}),
    ("POST", "/v1/face/identify", {"image": "AAAA"}),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no-such-route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_but_liveness_needs_the_api_token(
    client: Any, agent: Any, method: str, path: str, body: Any
) -> None:
    for headers, code in [
        ({"Authorization": ""}, "missing_token"),
        ({"Authorization": "Bearer " + "0" * len(TOKEN)}, "bad_token"),
        ({"Authorization": TOKEN}, "bad_token"),  # no scheme
        ({"Authorization": f"Basic {TOKEN}"}, "bad_token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "bad_token"),
    ]:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == code and "token" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert agent.outbox.depth == 0
    assert client.request(method, path, json=body).status_code not in (401, 421)


def test_liveness_probe_answers_without_a_token_and_says_nothing(client: Any) -> None:
    r = client.get("/v1/live", headers={"Authorization": ""})
    assert r.status_code == 200 and r.content == b""
    assert client.post("/v1/live", headers={"Authorization": ""}).status_code == 401


@pytest.mark.parametrize(
    "host",
    ["kiosk.attacker.example", "kiosk.attacker.example:8700", "127.0.0.1.attacker.example", "10.0.0.5:8700",
     "localhost.:8700", "[::2]:8700", "127.0.0.1:87x0", ""],
)  # fmt: skip
def test_a_foreign_host_header_is_refused_even_with_the_token(client: Any, agent: Any, host: str) -> None:
    # a page that rebinds its own DNS name to 127.0.0.1 still sends its own name as Host
    r = client.post("/v1/events", json=GOOD, headers={"Host": host})
    assert r.status_code == 421 and r.json()["error"] == "wrong_host"
    assert client.get("/v1/live", headers={"Host": host}).status_code == 421
    assert agent.outbox.depth == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8700", "localhost:1", "LOCALHOST", "[::1]", "[::1]:8700"])
def test_loopback_host_headers_are_served(client: Any, host: str) -> None:
    assert client.get("/v1/health", headers={"Host": host}).status_code == 200


def test_production_refuses_to_serve_without_a_usable_token_file(tmp_path: Path) -> None:
    from edge_agent.api.guard import ApiTokenUnusable

    def api_with(**settings: Any) -> Any:
        a = Agent(AgentSettings(terminal_id="t-api", password="x", data_dir=tmp_path / "d", **settings))
        try:
            return create_api(a)
        finally:
            a.outbox.close()

    with pytest.raises(ApiTokenUnusable, match="api_token_file is not set"):
        api_with()
    with pytest.raises(ApiTokenUnusable, match="mode 644"):
        api_with(api_token_file=write_token(tmp_path / "t1", mode=0o644))
    with pytest.raises(ApiTokenUnusable, match="mode 660"):
        api_with(api_token_file=write_token(tmp_path / "t2", mode=0o660))
    with pytest.raises(ApiTokenUnusable, match="32 or more"):
        api_with(api_token_file=write_token(tmp_path / "t3", token="short", mode=0o600))
    with pytest.raises(ApiTokenUnusable, match="cannot be read"):
        api_with(api_token_file=tmp_path / "missing")
    assert api_with(api_token_file=write_token(tmp_path / "t4", mode=0o600)) is not None
    # development may run without one, when it says so
    assert api_with(environment="development") is not None


def test_face_settings_come_from_the_face_section_of_agent_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_FACE_IDENTIFY_THRESHOLD", "0.5")  # still fills what the file leaves out
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "environment: test\nterminal_id: t-face\nface:\n  threshold: 0.52\n  camera_source: /dev/video2\n"
        "  max_image_bytes: 1048576\n  enabled: false\n"
    )
    face = AgentSettings.from_file(cfg).face
    assert (face.threshold, face.camera_source, face.enabled, face.identify_threshold) == (
        0.52,
        "/dev/video2",
        False,
        0.5,
    )
    assert face.max_request_bytes < 4 * 1024 * 1024  # the API's face body limit follows the image limit
    cfg.write_text("environment: test\nterminal_id: t-face\nface:\n  treshold: 0.52\n")
    with pytest.raises(ValueError, match=r"face\.treshold"):
        AgentSettings.from_file(cfg)
