"""Dashboards and alert rules: well-formed, PromQL parsed by promtool, every metric really exported,
and a real Prometheus scrapes the server with the rules loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from fleet_server.app import create_app

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RULE_FILES = sorted(p for p in (ROOT / "dashboards" / "rules").glob("*.yml") if not p.name.endswith(".test.yml"))
RULE_TESTS = sorted((ROOT / "dashboards" / "rules").glob("*.test.yml"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRICS_TOKEN = "metrics-scrape-token-" + "m" * 24


# -- reading the dashboards and rules -------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every query in every dashboard, variables included."""
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(doc):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: panel {panel['title']!r} {target['refId']}", target["expr"]))
        for var in doc["templating"]["list"]:
            if var["type"] == "query":
                out.append(
                    (
                        f"{path.name}: variable ${var['name']}",
                        _label_values_to_promql(var["definition"]),
                    )
                )
    return out


def _rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    ]


def _rule_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", str(r["expr"])) for r in _rules()]


def _label_values_to_promql(definition: str) -> str:
    """Grafana's `label_values(metric, label)` is not PromQL; its metric selector is."""
    m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", definition)
    return m.group(1) if m else definition


def _to_promql(expr: str) -> str:
    """Replace Grafana's variables with values so promtool can parse the query."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables only ever stand in label values
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: names, not functions/labels/keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


# -- the real exporters ---------------------------------------------------------------------------


def _exported(text: str) -> dict[str, str]:
    """Metric family name -> type, from the HELP/TYPE lines (present even before any sample)."""
    types = re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    return {m.group(1): m.group(2) for m in types}


def _is_exported(name: str, exported: dict[str, str]) -> bool:
    if name in exported:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and exported.get(name[: -len(suffix)]) in ("histogram", "summary"):
            return True
    return False


@pytest.fixture
def stack(make_stack: Callable[..., DevStack]) -> DevStack:
    return make_stack(1)


# -- tests ----------------------------------------------------------------------------------------


def test_dashboards_have_what_grafana_needs() -> None:
    assert {p.name for p in DASHBOARDS} >= {"fleet-health.json", "usage.json", "ingest.json"}
    uids = set()
    for path in DASHBOARDS:
        doc = json.loads(path.read_text(encoding="utf-8"))
        where = path.name
        assert doc["title"] and doc["uid"] and doc["uid"] not in uids, where
        uids.add(doc["uid"])
        assert doc["id"] is None, f"{where}: exported dashboards must not pin a database id"
        assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 36, where
        assert doc["time"]["from"] and doc["time"]["to"], where
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        ds = variables.get("datasource")
        assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", (
            f"{where}: needs a Prometheus datasource variable"
        )
        ids = set()
        for panel in _panels(doc):
            title = f"{where}: panel {panel.get('title')!r}"
            assert panel["title"] and panel["type"], title
            assert panel["id"] not in ids, f"{title}: duplicate panel id"
            ids.add(panel["id"])
            pos = panel["gridPos"]
            assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, title
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", f"{title}: use the datasource variable"
            assert panel.get("description"), f"{title}: say what the panel shows"
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), f"{title}: needs targets with unique refIds"
            for target in panel["targets"]:
                assert target["expr"].strip(), title
        # Every variable a query uses is defined (Grafana's own $__ variables aside).
        for panel in _panels(doc):
            for target in panel.get("targets", []):
                for var in re.findall(r"\$\{?(\w+)", target["expr"]):
                    assert var.startswith("__") or var in variables, f"{where}: ${var} is not defined"


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    # promtool 2.42 has no standalone query parser: each expression becomes a recording rule.
    exprs = _dashboard_exprs() + _rule_exprs()
    assert len(exprs) > 30
    rules = [{"record": f"check:expr_{i}", "expr": _to_promql(expr)} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}, allow_unicode=True),
        encoding="utf-8",
    )
    res = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        out = res.stdout + res.stderr
        bad = [f"{where}: {expr}" for i, (where, expr) in enumerate(exprs) if f'"check:expr_{i}"' in out]
        pytest.fail(f"promtool refused expressions:\n{out}\n" + "\n".join(bad))


def test_promtool_check_rules_passes_on_the_alert_rules() -> None:
    assert RULE_FILES
    res = subprocess.run(
        [PROMTOOL, "check", "rules", *map(str, RULE_FILES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    alerts = [r for r in _rules() if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule.get("for") is not None, f"{rule['alert']}: say how long it must hold"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    assert RULE_TESTS
    res = subprocess.run(
        [PROMTOOL, "test", "rules", *map(str, RULE_TESTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_metric_name_extraction_ignores_functions_labels_and_keywords() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, office) "
        '(rate(fleet_ingest_batch_seconds_bucket{office=~"$office"}[5m]))) '
        "/ on (office) group_left sum without (le) (up offset 5m) > bool 1 and vector(0) or "
        "office:fleet_usage_abandon:ratio_1h"
    )
    assert metric_names(expr) == {
        "fleet_ingest_batch_seconds_bucket",
        "up",
        "office:fleet_usage_abandon:ratio_1h",
    }


def test_every_metric_in_dashboards_and_rules_is_exported(stack: DevStack, tmp_path: Path) -> None:
    """Read the names from the real server's and the real agent's /metrics, never from a list."""
    from edge_agent.face import FaceSettings, build_face_service

    assert stack.server is not None
    settings = stack.settings.model_copy(update={"metrics_token": METRICS_TOKEN})
    with TestClient(create_app(settings, stack.server)) as client:
        res = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert res.status_code == 200
        server_text = res.text
    agent = stack.agent("t-000")
    stack.tracked_agents.append(agent)  # type: ignore[attr-defined]
    # The agent's own composition: face login registers its metrics on the agent's registry.
    build_face_service(agent, FaceSettings(camera_source=""))
    agent_text = generate_latest(agent.metrics_registry).decode()
    exported = {**_exported(server_text), **_exported(agent_text)}
    assert "fleet_ingest_queue_depth" in exported and "edge_outbox_pending" in exported

    recorded = {r["record"] for r in _rules() if "record" in r}
    used: dict[str, list[str]] = {}
    for where, expr in _dashboard_exprs() + _rule_exprs():
        for name in metric_names(_to_promql(expr)):
            used.setdefault(name, []).append(where)
    missing = {}
    for name, wheres in sorted(used.items()):
        if ":" in name:
            if name not in recorded:
                missing[name] = wheres  # a recording-rule name that no rule records
        elif not _is_exported(name, exported):
            missing[name] = wheres
    assert not missing, "metrics used but not exported:\n" + "\n".join(
        f"  {n}  (used by {', '.join(sorted(set(w))[:3])})" for n, w in missing.items()
    )


# -- a real Prometheus ----------------------------------------------------------------------------


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as res:
        return json.loads(res.read().decode())


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    doc = _get_json(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


@pytest.fixture
def http_server(stack: DevStack) -> Iterator[int]:
    """The server's HTTP app under uvicorn on a free loopback port, in a thread (like the demo),
    with a metrics token: Prometheus must present it."""
    import uvicorn

    port = free_port()
    settings = stack.settings.model_copy(update={"metrics_token": METRICS_TOKEN})
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, stack.server),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=http.run, name="http", daemon=True)
    thread.start()
    wait_for(lambda: http.started, 15, what="uvicorn to start")
    yield port
    http.should_exit = True
    thread.join(10)


def test_real_prometheus_scrapes_the_server_and_loads_the_rules(http_server: int, tmp_path: Path) -> None:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "fleet-server",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials": METRICS_TOKEN},
                "static_configs": [{"targets": [f"127.0.0.1:{http_server}"]}],
            }
        ],
    }
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - outlives this statement
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def target_up() -> bool:
        try:
            up = _query(base, 'up{job="fleet-server"}')
            depth = _query(base, "fleet_ingest_queue_depth")
        except OSError:
            return False
        return bool(up) and up[0]["value"][1] == "1" and bool(depth)

    not_ok: dict[str, str] = {}

    def rules_evaluated() -> bool:
        groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        not_ok.clear()
        not_ok.update(
            {
                r["name"]: f"{r['health']} {r.get('lastError', '')}".strip()
                for g in groups
                for r in g["rules"]
                if r["health"] != "ok"
            }
        )
        return bool(groups) and not not_ok

    try:
        # A fresh server needed ~6 s for its first sample on 1 s scrapes: poll, never sleep blindly.
        wait_for(target_up, 30, 0.25, what="Prometheus to scrape the fleet server")
        try:
            wait_for(rules_evaluated, 20, 0.25, what="every rule to be evaluated with health ok")
        except TimeoutError as err:
            raise AssertionError(f"rules not healthy: {not_ok}") from err
        groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        expected = {r.get("alert") or r.get("record") for r in _rules()}
        assert loaded == expected
        # The server is scraped, so the "metrics absent" alert (pending from the evaluations before
        # the first scrape) must go inactive: the rules really see the server's metrics.

        def absent_alert_inactive() -> bool:
            groups = _get_json(f"{base}/api/v1/rules?type=alert")["data"]["groups"]
            states = {r["name"]: r["state"] for g in groups for r in g["rules"]}
            return states["FleetServerMetricsAbsent"] == "inactive"

        wait_for(absent_alert_inactive, 15, 0.25, what="FleetServerMetricsAbsent to be inactive")
    except BaseException:
        log.flush()
        print((tmp_path / "prometheus.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
