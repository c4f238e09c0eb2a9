"""The server API: 401 without a token, 403 for the wrong role, managers see only their offices,
every admin change in the audit log, bad input refused with nothing half-written."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_dev.devstack import DevStack
from fleet_server.app import create_app
from fleet_server.auth.models import Role
from fleet_server.config import ServerSettings


@pytest.fixture
def api(tmp_path: Path) -> Any:
    st = DevStack(tmp_path / "s")  # registry and HTTP only: no broker needed
    assert st.server is not None
    st.enrol("t-hd-1", "haidian")
    st.enrol("t-cy-1", "chaoyang")
    manager = st.server.auth.create_user("wang", Role.MANAGER, ["haidian"])
    auditor = st.server.auth.create_user("li", Role.AUDITOR)
    app = create_app(st.settings, st.server)
    client = TestClient(app)  # no lifespan: the ingest is not needed here
    client.st = st  # type: ignore[attr-defined]
    client.fastapi = app  # type: ignore[attr-defined]
    client.h = {
        "admin": {"Authorization": f"Bearer {st.admin_token}"},  # type: ignore[attr-defined]
        "manager": {"Authorization": f"Bearer {manager}"},
        "auditor": {"Authorization": f"Bearer {auditor}"},
    }
    yield client
    st.close()


def test_every_api_route_needs_a_token(api: Any) -> None:
    paths = {p: ops for p, ops in api.fastapi.openapi()["paths"].items() if p.startswith("/api/v1")}
    assert len(paths) >= 12
    for template, ops in paths.items():
        path = template.replace("{terminal_id}", "t-hd-1").replace("{office_id}", "haidian")
        path = path.replace("{name}", "x").replace("{run_id}", "1")
        for method in ops:
            r = api.request(method.upper(), path, json={})
            assert r.status_code == 401, f"{method} {path} answered {r.status_code} without a token"
            r = api.request(method.upper(), path, headers={"Authorization": "Bearer nope"}, json={})
            # 429 once this client has failed too often: the throttle's own test covers it
            assert r.status_code in (401, 429), f"{method} {path} answered {r.status_code} to a wrong token"


def test_manager_cannot_change_anything_and_sees_only_their_offices(api: Any) -> None:
    m = api.h["manager"]
    assert api.post("/api/v1/terminals", json={"id": "t-new", "office_id": "haidian"}, headers=m).status_code == 403
    assert api.delete("/api/v1/terminals/t-hd-1", headers=m).status_code == 403
    assert api.post("/api/v1/users", json={"name": "x1", "role": "admin"}, headers=m).status_code == 403
    assert api.get("/api/v1/audit", headers=m).status_code == 403
    assert [o["id"] for o in api.get("/api/v1/offices", headers=m).json()] == ["haidian"]
    assert [t["id"] for t in api.get("/api/v1/terminals", headers=m).json()] == ["t-hd-1"]
    assert [t["terminal"] for t in api.get("/api/v1/health/terminals", headers=m).json()] == ["t-hd-1"]
    assert api.get("/api/v1/health/terminals?office=chaoyang", headers=m).status_code == 403
    assert api.get("/api/v1/health/terminals/t-cy-1", headers=m).status_code == 403
    assert api.get("/api/v1/terminals/t-cy-1/streams", headers=m).status_code == 403
    assert set(api.get("/api/v1/ingest/summary", headers=m).json()["offices"]) == {"haidian"}
    # the auditor reads the audit log and nothing else
    a = api.h["auditor"]
    assert api.get("/api/v1/audit", headers=a).status_code == 200
    assert api.get("/api/v1/terminals", headers=a).status_code == 403


def test_admin_changes_are_audited_with_before_and_after_and_no_secrets(api: Any) -> None:
    h = api.h["admin"]
    r = api.post("/api/v1/terminals", json={"id": "t-new-1", "office_id": "fengtai", "tags": ["lobby"]}, headers=h)
    assert r.status_code == 201
    password = r.json()["mqtt_password"]
    assert len(password) >= 24
    r = api.post("/api/v1/terminals/t-new-1/credentials", headers=h)
    new_password = r.json()["mqtt_password"]
    assert r.status_code == 200 and new_password != password
    assert api.delete("/api/v1/terminals/t-new-1", headers=h).status_code == 200
    assert (
        api.post(
            "/api/v1/users", json={"name": "zhao", "role": "manager", "offices": ["fengtai"]}, headers=h
        ).status_code
        == 201
    )
    office = {"id": "tongzhou-2", "name": "通州第二管理部", "name_en": "Tongzhou 2", "district": "通州区"}
    assert api.post("/api/v1/offices", json=office, headers=h).status_code == 201
    log = api.get("/api/v1/audit?limit=50", headers=api.h["auditor"]).json()
    actions = [(e["actor"], e["action"], e["target"]) for e in log if e["actor"] == "admin"]
    assert actions[:5] == [
        ("admin", "office.upsert", "tongzhou-2"),
        ("admin", "user.create", "zhao"),
        ("admin", "terminal.revoke", "t-new-1"),
        ("admin", "terminal.rotate_credentials", "t-new-1"),
        ("admin", "terminal.enrol", "t-new-1"),
    ]
    revoke = next(e for e in log if e["action"] == "terminal.revoke")
    assert revoke["before"]["enabled"] is True and revoke["after"] == {"enabled": False}
    assert all(e["at"].endswith("Z") for e in log)
    # no password, token or hash anywhere in the database or the audit log
    db_bytes = b"".join(p.read_bytes() for p in api.st.root.glob("fleet.db*"))
    for secret in (password, new_password, api.st.admin_token):
        assert secret.encode() not in db_bytes


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"id": "t-x", "office_id": "atlantis"}, 404, "atlantis"),
        ({"id": "t-hd-1", "office_id": "haidian"}, 409, "already enrolled"),
        ({"id": "T X", "office_id": "haidian"}, 422, "id"),
        ({"office_id": "haidian"}, 422, "id"),
        ({"id": "t-ok", "office_id": "haidian", "colour": "red"}, 422, "colour"),
        ({"id": "t-ok", "office_id": "haidian", "profile": "toaster-3000"}, 422, "toaster-3000"),
    ],
)
def test_bad_terminal_input_is_refused_clearly(api: Any, body: dict[str, Any], status: int, words: str) -> None:
    r = api.post("/api/v1/terminals", json=body, headers=api.h["admin"])
    assert r.status_code == status and words in r.json()["detail"]


def test_device_profiles_are_listed_for_readers(api: Any) -> None:
    ids = {p["id"] for p in api.get("/api/v1/profiles", headers=api.h["manager"]).json()}
    assert {"generic", "lobby-floor-32", "wall-21"} <= ids


def test_onboarding_with_one_bad_terminal_enrols_none(api: Any) -> None:
    h = api.h["admin"]
    body = {
        "terminals": [
            {"id": "t-fs-1", "office_id": "fengtai"},
            {"id": "t-fs-2", "office_id": "fengtai"},
            {"id": "t-hd-1", "office_id": "fengtai"},
        ]
    }  # t-hd-1 already exists
    r = api.post("/api/v1/offices/fengtai/onboard", json=body, headers=h)
    assert r.status_code == 409
    with sqlite3.connect(api.st.settings.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM terminals WHERE office_id='fengtai'").fetchone()[0] == 0
    assert (
        api.post(
            "/api/v1/offices/nowhere/onboard", json={"terminals": [{"id": "t-z", "office_id": "nowhere"}]}, headers=h
        ).status_code
        == 404
    )
    body["terminals"] = body["terminals"][:2]
    r = api.post("/api/v1/offices/fengtai/onboard", json=body, headers=h)
    assert r.status_code == 201 and [t["id"] for t in r.json()["terminals"]] == ["t-fs-1", "t-fs-2"]


def test_default_secrets_are_refused_outside_development(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FLEET_ADMIN_TOKEN"):
        ServerSettings(db_path=tmp_path / "x.db", broker_password="p" * 30, admin_token="changeme")
    with pytest.raises(ValueError, match="FLEET_BROKER_PASSWORD"):
        ServerSettings(db_path=tmp_path / "x.db", admin_token="t" * 30)
    ServerSettings(db_path=tmp_path / "x.db", broker_password="p" * 30, admin_token="A" * 32)
