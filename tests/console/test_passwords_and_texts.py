"""Console passwords (scrypt, policy, the admin route, the audit line) and the console's texts
(every text a template shows has its Chinese). No browser needed here."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_dev.devstack import DevStack
from fleet_server.app import create_app
from fleet_server.auth.models import Role
from fleet_server.auth.passwords import hash_password, verify_password
from fleet_server.console.i18n import ZH
from fleet_server.console.routes import safe_next

TEMPLATES = Path(__file__).resolve().parents[2] / "fleet_server" / "console" / "templates"


def test_a_password_verifies_only_itself_and_a_malformed_hash_never() -> None:
    stored = hash_password("correct-horse-battery", n=2**10)
    assert stored.startswith("scrypt$1024$8$1$")
    assert verify_password("correct-horse-battery", stored)
    assert not verify_password("correct-horse-batterz", stored)
    assert hash_password("correct-horse-battery", n=2**10) != stored  # salted
    for bad in ("", "scrypt$x", "md5$1$2$3$4$5", stored.replace("scrypt", "bcrypt"), "scrypt$1024$8$1$!!$!!"):
        assert not verify_password("correct-horse-battery", bad)


@pytest.fixture
def api(tmp_path: Path) -> Any:
    st = DevStack(tmp_path / "s")  # registry and HTTP only
    assert st.server is not None
    manager = st.server.auth.create_user("wang", Role.MANAGER, ["haidian"])
    client = TestClient(create_app(st.settings, st.server))
    client.st = st  # type: ignore[attr-defined]
    client.h = {
        "admin": {"Authorization": f"Bearer {st.admin_token}"},
        "manager": {"Authorization": f"Bearer {manager}"},
    }  # type: ignore[attr-defined]
    yield client
    st.close()


def test_an_admin_sets_a_password_audited_without_it_and_the_rules_hold(api: Any) -> None:
    url = "/api/v1/users/wang/password"
    assert api.post(url, json={"password": "a-long-enough-password"}, headers=api.h["manager"]).status_code == 403
    r = api.post(url, json={"password": "short"}, headers=api.h["admin"])
    assert r.status_code == 422 and "12 characters" in r.json()["detail"]
    r = api.post("/api/v1/users/nobody/password", json={"password": "a-long-enough-password"}, headers=api.h["admin"])
    assert r.status_code == 422 and "no user" in r.json()["detail"]
    assert api.post(url, json={"password": "a-long-enough-password"}, headers=api.h["admin"]).status_code == 204
    assert api.st.server.auth.check_password("wang", "a-long-enough-password").name == "wang"
    assert api.st.server.auth.check_password("wang", "a-long-enough-passworD") is None
    assert api.st.server.auth.check_password("nobody", "a-long-enough-password") is None
    entry = api.get("/api/v1/audit?action=user.password&target=wang", headers=api.h["admin"]).json()
    assert len(entry) == 1 and entry[0]["actor"] == "admin" and entry[0]["after"] == {"password_set": True}
    with sqlite3.connect(api.st.settings.db_path) as conn:
        dump = "\n".join(conn.iterdump())
    assert "a-long-enough-password" not in dump
    # the bearer token keeps working next to the password
    assert api.get("/api/v1/me", headers=api.h["manager"]).json()["name"] == "wang"


def test_the_login_never_sends_anyone_to_another_site() -> None:
    for target in ("https://evil.example/", "//evil.example", "/\\evil.example", "javascript:alert(1)", "", None):
        assert safe_next(target) == "/"
    assert safe_next("/usage?office=haidian") == "/usage?office=haidian"


def test_every_text_a_template_shows_has_its_chinese() -> None:
    used: set[str] = set()
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text("utf-8")
        used |= set(re.findall(r'_\("([^"]+)"', text)) | set(re.findall(r"_\('([^']+)'", text))
        # labels handed to _() from tuples in the templates: ('key', 'Label')
        used |= {m for m in re.findall(r"\('[a-z_]+', '([^']+)'\)", text) if not m.isdigit()}
    missing = sorted(t for t in used if t not in ZH)
    assert not missing, f"texts without Chinese: {missing}"
