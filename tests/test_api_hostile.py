"""The server's HTTP surface against hostile callers: no 5xx for any input a client can send, nothing
but the liveness probe without a login, metrics behind their own token or the loopback interface,
failed logins slowed and logged per address, files created private."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from fleet_dev.devstack import DevStack
from fleet_server.app import create_app
from fleet_server.auth.models import Role
from fleet_server.auth.throttle import LoginThrottle
from fleet_server.db import connect

HUGE_INTS = [2**63, 2**64 + 7, 10**30, -1, -(2**63) - 1, 0]
LONG_ASCII = "a" * 300
LONG_CJK = "终端" * 150
HOSTILE_STRINGS = [
    LONG_ASCII,
    LONG_CJK,
    "",
    " ",
    "\u202e😀\x00",
    "../../../../etc/passwd",
    "' OR 1=1 --",
    "=cmd|' /C calc'!A0",
    "%00%2e%2e",
]
HOSTILE_DATES = ["0001-01-01", "9999-12-31", "2026-02-30", "-1"]
SANE_PATH = {
    "terminal_id": "t-hd-1",
    "office_id": "haidian",
    "name": "x",
    "run_id": "1",
    "rollout_id": "r-1",
    "sha256": "0" * 64,
}


class FakeClock:
    """A clock the test moves by hand (the throttle's blocks are about time, the test is not)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    st = DevStack(tmp_path / "s")  # registry and HTTP only: no broker needed
    assert st.server is not None
    st.enrol("t-hd-1", "haidian")
    st.enrol("t-cy-1", "chaoyang")
    yield st
    st.close()


def _client(st: DevStack, **settings: Any) -> TestClient:
    app = create_app(st.settings.model_copy(update=settings), st.server)
    # no lifespan: the ingest is not needed; a 500 comes back as a response, not an exception
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def api(stack: DevStack) -> TestClient:
    return _client(stack)


def _admin(st: DevStack) -> dict[str, str]:
    return {"Authorization": f"Bearer {st.admin_token}"}


# -- every route, hostile values ------------------------------------------------------------------


def _deref(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _kind(schema: dict[str, Any], doc: dict[str, Any]) -> str:
    schema = _deref(schema, doc)
    for alt in schema.get("anyOf", []):
        alt = _deref(alt, doc)
        if alt.get("type") != "null":
            return _kind(alt, doc)
    if schema.get("type") == "array":
        return "array"
    if schema.get("format") == "date":
        return "date"
    return str(schema.get("type", "string"))


def _hostile_values(kind: str) -> list[Any]:
    """What a client can put in one parameter: every kind gets every hostile shape, typed or not."""
    values: list[Any] = [*HUGE_INTS, *HOSTILE_STRINGS, "1e309", "NaN", "true"]
    if kind == "date":
        values += HOSTILE_DATES
    return values


def _hostile_bodies(schema: dict[str, Any] | None, doc: dict[str, Any]) -> list[Any]:
    bodies: list[Any] = [None, {}, [], "x", 2**64, [[[[[]]]]] * 50]
    if schema is None:
        return bodies
    props = _deref(schema, doc).get("properties", {})
    for name in props:
        for value in [*HUGE_INTS, *HOSTILE_STRINGS, None, [], {}, [LONG_ASCII] * 300, {LONG_ASCII: LONG_CJK}]:
            bodies.append({name: value})
    for value in [2**63, LONG_ASCII, LONG_CJK, "", -1]:
        bodies.append(dict.fromkeys(props, value))
    return bodies


def _requests(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, request kwargs) for every /api/v1 operation with hostile values, one at a time."""
    for template, ops in doc["paths"].items():
        if not template.startswith("/api/v1"):
            continue
        for method, op in ops.items():
            params = op.get("parameters", [])
            path_names = [p["name"] for p in params if p["in"] == "path"]

            def path(override: dict[str, str], template: str = template) -> str:
                values = {**SANE_PATH, **override}
                return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)

            # a body that passes for the operations that take one, so the parameter is what is judged
            extra: dict[str, Any] = {"json": {}} if method in ("post", "put", "patch") else {}
            for p in params:
                kind = _kind(p.get("schema", {}), doc)
                for value in _hostile_values(kind):
                    if p["in"] == "path":
                        if value == "":
                            continue  # an empty segment is another route, not this one
                        yield method, path({p["name"]: quote(str(value), safe="")}), extra
                    elif p["in"] == "query":
                        sent = [value, value] if kind == "array" else value
                        yield method, path({}), {**extra, "params": {p["name"]: sent}}
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if method in ("post", "put", "patch"):
                for b in _hostile_bodies(body, doc):
                    yield method, path({}), {"json": b}
            if not path_names and not params and method == "get":
                yield method, path({}), {}


def test_no_route_answers_5xx_to_hostile_values_as_admin(stack: DevStack, api: TestClient) -> None:
    doc = api.app.openapi()  # type: ignore[attr-defined]
    admin = _admin(stack)
    failures, sent = [], 0
    for method, path, kwargs in _requests(doc):
        r = api.request(method.upper(), path, headers=admin, **kwargs)
        sent += 1
        if r.status_code >= 500:
            failures.append(f"{method.upper()} {path[:90]} {str(kwargs)[:90]} -> {r.status_code}")
    assert sent > 1000
    assert not failures, f"{len(failures)} of {sent} requests answered 5xx:\n" + "\n".join(failures[:40])


def test_run_id_beyond_sqlite_and_an_overlong_playbook_name_are_refused_as_input(
    stack: DevStack, api: TestClient
) -> None:
    admin = _admin(stack)
    r = api.get(f"/api/v1/playbooks/runs/{2**63}", headers=admin)
    assert r.status_code == 422 and "run_id" in r.json()["detail"]
    assert api.get(f"/api/v1/playbooks/runs/{2**63 - 1}", headers=admin).status_code == 404
    r = api.post(f"/api/v1/playbooks/{'a' * 300}/runs", json={}, headers=admin)
    assert r.status_code == 422 and "name" in r.json()["detail"]
    assert api.post("/api/v1/playbooks/nosuch/runs", json={}, headers=admin).status_code == 404


def test_an_office_with_a_timezone_or_opening_days_the_health_rules_cannot_read_is_refused(
    stack: DevStack, api: TestClient
) -> None:
    base = {"id": "tz-test", "name": "x", "name_en": "x", "district": "x"}
    for bad in ({"timezone": "Mars/Olympus_Mons"}, {"timezone": "../../etc/passwd"}, {"hours": {"xyz": "08:00-17:00"}}):
        r = api.post("/api/v1/offices", json={**base, **bad}, headers=_admin(stack))
        assert r.status_code == 422, (bad, r.text)
    assert api.post("/api/v1/offices", json=base, headers=_admin(stack)).status_code == 201


# -- managers see only their offices --------------------------------------------------------------


def _add_rejects(st: DevStack) -> None:
    with connect(st.settings.db_path) as conn:
        rows = [("t-hd-1", "schema") for _ in range(5)] + [("t-cy-1", "oversized") for _ in range(50)]
        rows += [("t-unknown-9", "unknown_terminal"), (None, "bad_topic")]
        conn.executemany(
            "INSERT INTO rejects (at, terminal, topic, reason, detail, epoch, seq, size)"
            " VALUES ('2026-11-30T10:00:00.000Z', ?, 'fleet/v1/t/x/events', ?, 'd', NULL, NULL, 10)",
            rows,
        )


def test_manager_sees_only_their_offices_rejects_and_counts(stack: DevStack, api: TestClient) -> None:
    assert stack.server is not None
    _add_rejects(stack)
    manager = {"Authorization": f"Bearer {stack.server.auth.create_user('wang', Role.MANAGER, ['haidian'])}"}
    # the newest 50 rejects are chaoyang's: filtering after the LIMIT would leave the manager nothing
    mine = api.get("/api/v1/ingest/rejects?limit=5", headers=manager).json()
    assert [r["terminal"] for r in mine] == ["t-hd-1"] * 5
    assert {r["terminal"] for r in api.get("/api/v1/ingest/rejects?limit=1000", headers=manager).json()} == {"t-hd-1"}
    summary = api.get("/api/v1/ingest/summary", headers=manager).json()
    assert summary["rejects_recent_by_reason"] == {"schema": 5}
    assert set(summary["offices"]) == {"haidian"}
    everything = api.get("/api/v1/ingest/summary", headers=_admin(stack)).json()
    assert everything["rejects_recent_by_reason"] == {
        "schema": 5,
        "oversized": 50,
        "unknown_terminal": 1,
        "bad_topic": 1,
    }
    assert len(api.get("/api/v1/ingest/rejects?limit=1000", headers=_admin(stack)).json()) == 57


# -- nothing public but the liveness probe --------------------------------------------------------


def test_nothing_but_the_liveness_probe_answers_without_a_login(stack: DevStack, api: TestClient) -> None:
    for path in ("/", "/openapi.json"):
        r = api.get(path)
        assert r.status_code == 401, f"{path} answered {r.status_code} without a token"
        assert "office" not in r.text and "haidian" not in r.text
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert api.get(path).status_code == 404
    health = api.get("/healthz")
    assert health.status_code == 200 and set(health.json()) == {"ok"}
    # with a login, the schema and the pointer page are there
    assert api.get("/openapi.json", headers=_admin(stack)).json()["info"]["title"] == "kiosk-fleet server"
    assert api.get("/", headers=_admin(stack)).json()["api"] == "/api/v1"


def test_metrics_need_their_own_token_or_a_loopback_client(stack: DevStack) -> None:
    # no token configured: a remote client is refused, a loopback one (a local Prometheus) is served
    remote = _client(stack)
    r = remote.get("/metrics")
    assert r.status_code == 403 and "FLEET_METRICS_TOKEN" in r.json()["detail"]
    assert "fleet_" not in r.text
    local = TestClient(remote.app, client=("127.0.0.1", 40000))
    assert local.get("/metrics").status_code == 200 and "fleet_ingest_queue_depth" in local.get("/metrics").text
    # token configured: only the token opens it, from anywhere, loopback included
    token = "scrape-" + "s" * 30
    guarded = _client(stack, metrics_token=token)
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=_admin(stack)).status_code == 401  # a user's token is not it
    assert TestClient(guarded.app, client=("127.0.0.1", 40000)).get("/metrics").status_code == 401
    ok = guarded.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and 'fleet_auth_failures_total{reason="metrics_token"} 3.0' in ok.text


# -- failed logins ---------------------------------------------------------------------------------


def _sample(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_failed_logins_are_slowed_logged_and_counted_per_address_without_locking_anyone_out_for_ever(
    stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.server is not None
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    stack.server.auth.throttle = throttle
    app = _client(stack).app
    attacker = TestClient(app, client=("203.0.113.7", 50000))
    neighbour = TestClient(app, client=("203.0.113.7", 50001))  # same address: an office NAT
    elsewhere = TestClient(app, client=("198.51.100.2", 50000))
    manager_token = stack.server.auth.create_user("wang", Role.MANAGER, ["haidian"])
    newcomer_token = stack.server.auth.create_user("zhao", Role.MANAGER, ["haidian"])
    assert neighbour.get("/api/v1/me", headers={"Authorization": f"Bearer {manager_token}"}).status_code == 200

    caplog.set_level(logging.WARNING, logger="fleet_server.auth")
    answers = [
        attacker.get("/api/v1/me", headers={"Authorization": f"Bearer wrong-{i}"}).status_code for i in range(3000)
    ]
    free = throttle.free_failures
    assert answers[:free] == [401] * free
    assert answers[free] == 401  # this failure starts the first block
    assert set(answers[free + 1 :]) == {429}  # the rest wait, unchecked
    blocked = attacker.get("/api/v1/me", headers={"Authorization": "Bearer wrong-x"})
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert "203.0.113.7" in blocked.json()["detail"]
    # logged per address: each counted failure, and the block, with the address in the line
    lines = [r.getMessage() for r in caplog.records if "203.0.113.7" in r.getMessage()]
    assert len(lines) == free + 1 and "refusing that address" in lines[-1]
    metrics = TestClient(app, client=("127.0.0.1", 1)).get("/metrics").text
    assert _sample(metrics, "fleet_auth_failures_total", 'reason="unknown_token"') == free + 1
    assert _sample(metrics, "fleet_auth_failures_total", 'reason="throttled"') == 3000 - free - 1 + 1

    # a token that already worked from this address passes the block; other addresses are untouched
    assert neighbour.get("/api/v1/me", headers={"Authorization": f"Bearer {manager_token}"}).status_code == 200
    assert elsewhere.get("/api/v1/me", headers={"Authorization": f"Bearer {newcomer_token}"}).status_code == 200
    # a colleague whose token never worked from here waits, but never for more than the longest block
    newcomer = {"Authorization": f"Bearer {newcomer_token}"}
    assert neighbour.get("/api/v1/me", headers=newcomer).status_code == 429
    clock.now += throttle.max_block_s
    assert neighbour.get("/api/v1/me", headers=newcomer).status_code == 200
    # each further wrong guess, once a block is over, blocks again for twice as long, up to the cap
    waits = []
    for _ in range(8):
        clock.now += throttle.wait_s("203.0.113.7", "not-a-known-token")
        assert attacker.get("/api/v1/me", headers={"Authorization": "Bearer guess"}).status_code == 401
        waits.append(throttle.wait_s("203.0.113.7", "not-a-known-token"))
    assert waits == sorted(waits) and waits[0] > 0 and waits[-1] == throttle.max_block_s
    # once the attacker stops, the address is forgotten after the window: back to normal answers
    clock.now += throttle.window_s + 1
    assert attacker.get("/api/v1/me", headers={"Authorization": "Bearer wrong-again"}).status_code == 401


# -- files ------------------------------------------------------------------------------------------


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_database_files_are_created_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a usual login umask: files 0644 unless created with a mode
    try:
        st = DevStack(tmp_path / "s")
        assert st.server is not None
        st.enrol("t-hd-1", "haidian")  # a write: the WAL and shared-memory files exist now
        files = sorted((tmp_path / "s").glob("fleet.db*"))
        assert {p.name for p in files} >= {"fleet.db", "fleet.db-wal", "fleet.db-shm"}
        assert all(_private(p) for p in files), {p.name: oct(p.stat().st_mode) for p in files}
        st.close()
        # an existing database someone made world-readable loses the world bits at the next start
        (tmp_path / "s" / "fleet.db").chmod(0o644)
        st = DevStack(tmp_path / "s")
        assert stat.S_IMODE((tmp_path / "s" / "fleet.db").stat().st_mode) == 0o640
        st.close()
    finally:
        os.umask(old)


def test_with_connect_closes_the_connection(stack: DevStack) -> None:
    with connect(stack.settings.db_path, readonly=True) as conn:
        assert conn.execute("SELECT count(*) FROM terminals").fetchone()[0] == 2
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")
    assert stack.server is not None
    with stack.server.reader() as reader:
        reader.execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        reader.execute("SELECT 1")
