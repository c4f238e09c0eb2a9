"""Playbooks run for real: ansible-runner, connection=local, into a temporary root prefix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.config import AgentSettings
from fleet_dev.proc import die_with_parent, free_port, stop, wait_for
from fleet_server.auth.models import Role
from fleet_server.db import migrate
from fleet_server.playbooks import store as playbook_store
from fleet_server.playbooks.routes import build_playbooks_router
from fleet_server.playbooks.schemas import RunDetail
from fleet_server.playbooks.service import PlaybookService, UnknownPlaybook
from tests.playbooks_util import PLAYBOOKS_DIR, REPO, agent_install_vars, files_under, local_inventory

PASSWORD = "pw-first-7Qx9vT2mLk4s"
NEW_PASSWORD = "pw-rotated-R8nW3zYp6cHd"
# A stall bound, not a speed test: four real installs may share two busy cores.
RUN_TIMEOUT_S = 480
# Where a run that ignored root_prefix would have written on this machine.
REAL_PATHS = [
    Path("/etc/kiosk-agent"),
    Path("/opt/kiosk-agent"),
    Path("/opt/kiosk-fleet"),
    Path("/var/lib/kiosk-agent"),
    Path("/etc/systemd/system/kiosk-agent.service"),
]

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("playbooks")


@pytest.fixture(scope="module")
def metrics() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def service(work: Path, metrics: CollectorRegistry, dist: Any) -> Iterator[PlaybookService]:
    """A service on a real SQLite file, running on this machine with `./run.sh dist`'s agent wheel."""
    db = work / "fleet.db"
    migrate(db, playbook_store.migrations)
    svc = PlaybookService(
        db,
        PLAYBOOKS_DIR,
        registry=metrics,
        work_dir=work / "runs",
        inventory=local_inventory(),
        base_extravars={
            "manage_services": False,
            **agent_install_vars(dist),
            "agent_controller_tmp_dir": str(controller_tmp(work)),
        },
        # ansible's own scratch files go under the test directory too, not into ~/.ansible.
        envvars={"ANSIBLE_REMOTE_TEMP": str(work / "ansible-remote-tmp")},
    )
    yield svc
    svc.close()


def controller_tmp(work: Path) -> Path:
    """The controller's scratch folder for the wheelhouse archive (the terminal is this machine too)."""
    folder = work / "controller-tmp"
    folder.mkdir(exist_ok=True)
    return folder


def run(svc: PlaybookService, playbook: str, **extravars: Any) -> RunDetail:
    run_id = svc.start_run(playbook, started_by="tests", extravars=extravars)
    return svc.wait(run_id, timeout_s=RUN_TIMEOUT_S)


def terminal_vars(root: Path, terminal_id: str = "hd-01", password: str = PASSWORD) -> dict[str, Any]:
    return {
        "root_prefix": str(root),
        "terminal_id": terminal_id,
        "office_id": "haidian",
        "terminal_password": password,
        "device_profile": "generic",
        "agent_api_port": API_PORT,
    }


API_PORT = free_port()


@pytest.fixture(scope="module")
def provisioned(service: PlaybookService, work: Path) -> dict[str, Any]:
    """One terminal provisioned twice into the same root: the second run shows idempotence."""
    root = work / "root-hd-01"
    before = {p: p.exists() for p in REAL_PATHS}
    first = run(service, "provision_terminal", **terminal_vars(root))
    token = (root / "etc/kiosk-api/token").read_text().strip() if first.status == "successful" else None
    second = run(service, "provision_terminal", **terminal_vars(root))
    after = (root / "etc/kiosk-api/token").read_text().strip() if second.status == "successful" else None
    assert token == after
    return {"root": root, "first": first, "second": second, "real_before": before, "token_after_second_run": after}


OFFICE_TERMINALS = [f"cy-{i:02d}" for i in range(1, 4)]


@pytest.fixture(scope="module")
def onboarding(service: PlaybookService, work: Path) -> dict[str, Any]:
    """Start onboarding an office of three terminals; it runs next to the other tests' runs."""
    terminals = [
        {
            "terminal_id": t,
            "password": f"pw-{t}-Zr7Lq2Wn",
            "root_prefix": str(work / f"root-{t}"),
            "connection": "local",
            "python": sys.executable,
            "profile": "generic",
        }
        for t in OFFICE_TERMINALS
    ]
    terminals[2]["profile"] = "no-such-model"  # another team's profiles: a missing one is skipped
    run_id = service.start_run(
        "onboard_office", started_by="tests", extravars={"office_id": "chaoyang", "office_terminals": terminals}
    )
    return {"run_id": run_id, "terminals": terminals}


def test_every_playbook_passes_syntax_check(tmp_path: Path) -> None:
    playbooks = sorted(str(p) for p in PLAYBOOKS_DIR.glob("*.yml"))
    assert {Path(p).stem for p in playbooks} >= {
        "provision_terminal",
        "onboard_office",
        "rotate_credentials",
        "collect_diagnostics",
    }
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path),
    }
    done = subprocess.run(
        ["ansible-playbook", "--syntax-check", "-i", "localhost,", *playbooks],
        env=env,
        capture_output=True,
        text=True,
        cwd=PLAYBOOKS_DIR,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_provision_installs_agent_config_unit_and_profile(
    onboarding: dict[str, Any], provisioned: dict[str, Any]
) -> None:
    root: Path = provisioned["root"]
    assert provisioned["first"].status == "successful", provisioned["first"].error
    assert provisioned["first"].changed > 0

    # A/B layout: the release venv in releases/<version>-<sha8>, `current` pointing at it, its
    # completion marker, the launcher outside every release
    home = root / "opt/kiosk-fleet"
    release = os.readlink(home / "current")
    assert release.startswith("releases/0.1.0-") and len(release) == len("releases/0.1.0-") + 8
    assert (home / release / ".complete").is_file()
    assert (home / "launcher.py").read_bytes() == (REPO / "edge_agent/launcher.py").read_bytes()
    venv_python = root / "opt/kiosk-fleet/current/bin/python"
    done = subprocess.run(
        [str(venv_python), "-c", "import edge_agent; print(edge_agent.__file__)"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(root / "opt/kiosk-fleet/current")), "imported from elsewhere"
    assert (root / "opt/kiosk-fleet/current/bin/edge-agent").is_file()

    config = root / "etc/kiosk-agent/agent.yaml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    settings = AgentSettings.from_file(config)  # the agent itself accepts the file
    assert (settings.terminal_id, settings.office_id, settings.username) == ("hd-01", "haidian", "hd-01")
    assert settings.password == PASSWORD
    assert settings.data_dir == root / "var/lib/kiosk-agent"
    token_file = root / "etc/kiosk-api/token"
    assert settings.api_token_file == token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o750
    token = token_file.read_text().strip()
    assert len(token) == 64 and token.isalnum()
    assert provisioned["token_after_second_run"] == token  # a re-run keeps the terminal's token
    assert token not in json.dumps(
        [e.model_dump() for r in (provisioned["first"], provisioned["second"]) for e in r.events]
    )
    # a clean venv: the agent's dependencies came from the wheelhouse, pinned by hash
    assert not (root / "opt/kiosk-fleet/current/lib/python3.11/site-packages/fleet_server").exists()
    assert (root / "opt/kiosk-fleet/current/pyvenv.cfg").read_text().count("include-system-site-packages = false") == 1

    unit = (root / "etc/systemd/system/kiosk-agent.service").read_text()
    assert "Restart=always" in unit
    assert "RestartSec=5" in unit
    assert "WatchdogSec=60" in unit
    assert "User=kiosk-agent" in unit
    assert "SupplementaryGroups=kiosk-api" in unit
    assert f"ExecStart={sys.executable} {home}/launcher.py exec --root {home} --config {config}" in unit
    assert f"ReadWritePaths={root}/var/lib/kiosk-agent {root}/var/log/kiosk-agent {home}" in unit

    profile = root / "etc/kiosk-agent/device-profile.yaml"
    source = REPO / "device_profiles/generic.yaml"
    if source.exists():
        assert profile.read_bytes() == source.read_bytes()
    else:
        assert not profile.exists()


def test_second_provision_changes_nothing(provisioned: dict[str, Any]) -> None:
    second = provisioned["second"]
    assert second.status == "successful", second.error
    assert (second.changed, second.failed) == (0, 0), [
        e.task for e in second.events if e.status in ("changed", "failed")
    ]
    assert not any(
        e.task == "Install the agent package into the virtualenv" and e.status != "skipped" for e in second.events
    )


def test_provision_writes_only_under_root_prefix(provisioned: dict[str, Any], work: Path) -> None:
    root = str(provisioned["root"])
    scratch = controller_tmp(work)
    paths = [p for r in (provisioned["first"], provisioned["second"]) for e in r.events for p in e.paths]
    assert len(paths) > 5
    # the controller's one scratch file (the wheelhouse archive) is the only path elsewhere, and it is gone
    at_controller = {p for p in paths if Path(p).parent == scratch}
    assert len(at_controller) == 1 and not Path(next(iter(at_controller))).exists()
    assert [p for p in paths if not p.startswith(root + "/") and p not in at_controller] == []
    assert {p: p.exists() for p in REAL_PATHS} == provisioned["real_before"]


def test_wheelhouse_goes_over_once_as_one_archive(provisioned: dict[str, Any]) -> None:
    first, second = provisioned["first"], provisioned["second"]
    wheels = provisioned["root"] / "opt/kiosk-fleet/dist/agent-wheels"
    held = {p.name for p in wheels.glob("*.whl")}
    assert held and all(stat.S_IMODE((wheels / n).stat().st_mode) == 0o644 for n in held)
    task = "Unpack the wheelhouse on the terminal"
    assert [e.status for e in first.events if e.task == task] == ["changed"]
    assert [e.status for e in second.events if e.task == task] == ["skipped"]  # same lock: nothing copied


def test_run_and_events_are_stored_without_the_password(
    service: PlaybookService, provisioned: dict[str, Any], work: Path
) -> None:
    first = service.get_run(provisioned["first"].id)
    assert first.playbook == "provision_terminal" and first.target == "hd-01"
    assert first.started_by == "tests" and first.rc == 0
    assert first.started_at and first.finished_at and first.created_at <= first.started_at
    assert first.extravars["terminal_password"] == "***"
    assert first.extravars["terminal_id"] == "hd-01"
    assert {e.status for e in first.events} <= {"ok", "changed", "failed", "skipped"}
    assert first.changed == sum(e.status == "changed" for e in first.events)
    assert all(e.host == "localhost" and e.duration_s is not None for e in first.events)
    assert [r.id for r in service.runs(playbook="provision_terminal")][:2] == [
        provisioned["second"].id,
        provisioned["first"].id,
    ]
    stored = b"".join(p.read_bytes() for p in work.glob("fleet.db*"))
    assert PASSWORD.encode() not in stored
    # The private data dirs hold the extra vars in clear: they go as soon as each run ends.
    assert (work / "runs").is_dir()
    for run_id in (provisioned["first"].id, provisioned["second"].id):
        assert not list((work / "runs").glob(f"run-{run_id}-*"))


@pytest.fixture(scope="module")
def rotated(service: PlaybookService, provisioned: dict[str, Any]) -> dict[str, Any]:
    config = provisioned["root"] / "etc/kiosk-agent/agent.yaml"
    before = config.read_text().splitlines()
    result = run(service, "rotate_credentials", root_prefix=str(provisioned["root"]), terminal_password=NEW_PASSWORD)
    return {"before": before, "after": config.read_text().splitlines(), "run": result, "config": config}


def test_rotate_credentials_changes_only_the_password_line(rotated: dict[str, Any]) -> None:
    assert rotated["run"].status == "successful", rotated["run"].error
    assert rotated["run"].changed == 1
    changed = [(a, b) for a, b in zip(rotated["before"], rotated["after"]) if a != b]
    assert len(rotated["before"]) == len(rotated["after"])
    assert changed == [(f'password: "{PASSWORD}"', f'password: "{NEW_PASSWORD}"')]
    assert AgentSettings.from_file(rotated["config"]).password == NEW_PASSWORD
    assert stat.S_IMODE(rotated["config"].stat().st_mode) == 0o600


class _HealthHandler(BaseHTTPRequestHandler):
    """Stands in for the agent's local API: answers /v1/health like the agent does, to its token only."""

    token = ""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            body = json.dumps({"error": "missing_token"}).encode()
            self.send_response(401)
        else:
            body = json.dumps({"terminal": "hd-01", "ok": True, "outbox": {"depth": 1}}).encode()
            self.send_response(200 if self.path == "/v1/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_collect_diagnostics_packs_health_config_logs_and_outbox_without_secrets(
    service: PlaybookService, rotated: dict[str, Any], provisioned: dict[str, Any], work: Path
) -> None:
    from edge_agent.outbox.store import Outbox

    root: Path = provisioned["root"]
    (root / "var/log/kiosk-agent/agent.log").write_text("INFO edge_agent: connected to broker\n")
    outbox = Outbox(root / "var/lib/kiosk-agent/outbox.db", "hd-01")
    outbox.enqueue(
        "service.completed", {"session": "s-1", "service_code": "TQ02", "duration_s": 95.0, "face_login": True}
    )
    outbox.close()
    _HealthHandler.token = (root / "etc/kiosk-api/token").read_text().strip()
    api = ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    threading.Thread(target=api.serve_forever, name="fake-agent-api", daemon=True).start()
    try:
        result = run(
            service,
            "collect_diagnostics",
            root_prefix=str(root),
            terminal_id="hd-01",
            agent_api_port=api.server_address[1],
            diagnostics_fetch_dir=str(work / "fetched"),
        )
    finally:
        api.shutdown()
        api.server_close()
    assert result.status == "successful", (result.error, [e.message for e in result.events if e.status == "failed"])
    archives = list((root / "var/lib/kiosk-agent/diagnostics").glob("hd-01-*.tar.gz"))
    assert len(archives) == 1
    assert not list((root / "var/lib/kiosk-agent/diagnostics").glob(".staging-*"))
    assert (work / "fetched" / archives[0].name).read_bytes() == archives[0].read_bytes()
    with tarfile.open(archives[0]) as tar:
        members = {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    assert set(members) >= {"health.json", "agent-config.yaml", "outbox.json", "logs/agent.log"}
    assert stat.S_IMODE(archives[0].stat().st_mode) == 0o600
    assert json.loads(members["health.json"])["terminal"] == "hd-01"
    assert b"terminal_id: hd-01" in members["agent-config.yaml"]
    assert b"password" not in members["agent-config.yaml"]
    outbox_doc = json.loads(members["outbox.json"])
    assert outbox_doc["rows"] == 1
    assert outbox_doc["installed"].startswith("kiosk_fleet_agent-0.1.0-py3-none-any.whl sha256:")
    assert " lock sha256:" in outbox_doc["installed"]
    assert b"connected to broker" in members["logs/agent.log"]
    for name, data in members.items():
        assert PASSWORD.encode() not in data and NEW_PASSWORD.encode() not in data, name
        assert _HealthHandler.token.encode() not in data, name


def test_onboard_office_provisions_each_terminal_with_its_own_credentials(
    service: PlaybookService, onboarding: dict[str, Any], work: Path
) -> None:
    terminals = onboarding["terminals"]
    result = service.wait(onboarding["run_id"], timeout_s=RUN_TIMEOUT_S)
    assert result.status == "successful", (result.error, [e.message for e in result.events if e.status == "failed"])
    assert result.target == "chaoyang"
    assert {e.host for e in result.events} == {"localhost", "cy-01", "cy-02", "cy-03"}
    for t in terminals:
        root = Path(t["root_prefix"])
        settings = AgentSettings.from_file(root / "etc/kiosk-agent/agent.yaml")
        assert (settings.terminal_id, settings.office_id, settings.password) == (
            t["terminal_id"],
            "chaoyang",
            t["password"],
        )
        assert (root / "etc/systemd/system/kiosk-agent.service").is_file()
        assert (root / "opt/kiosk-fleet/current/bin/edge-agent").is_file()
    assert not (work / "root-cy-03/etc/kiosk-agent/device-profile.yaml").exists()
    skipped = [e.message for e in result.events if e.host == "cy-03" and e.task == "Report a missing device profile"]
    assert skipped and "no-such-model" in skipped[0]
    for t in terminals:
        assert t["password"] not in json.dumps(result.model_dump())


def test_failed_run_is_recorded_as_failed_and_counted(
    service: PlaybookService, work: Path, metrics: CollectorRegistry
) -> None:
    before = (
        metrics.get_sample_value("fleet_playbook_runs_total", {"playbook": "provision_terminal", "status": "failed"})
        or 0.0
    )
    root = work / "root-incomplete"
    result = run(
        service, "provision_terminal", root_prefix=str(root), terminal_id="hd-09", office_id="haidian"
    )  # no terminal_password: the first task must refuse
    assert result.status == "failed" and result.rc not in (0, None)
    assert result.failed == 1 and result.events[-1].status == "failed"
    assert "terminal_password" in result.events[-1].message
    assert files_under(root) == {}
    assert (
        metrics.get_sample_value("fleet_playbook_runs_total", {"playbook": "provision_terminal", "status": "failed"})
        == before + 1
    )
    with pytest.raises(UnknownPlaybook):
        service.start_run("../pyproject", started_by="tests")


def test_playbook_routes_need_an_admin_and_record_the_run(tmp_path: Path) -> None:
    from fleet_dev.devstack import DevStack
    from fleet_server.app import create_app

    st = DevStack(tmp_path)
    assert st.server is not None
    try:
        migrate(st.settings.db_path, playbook_store.migrations)
        st.server.playbooks = PlaybookService(  # type: ignore[attr-defined]
            st.settings.db_path,
            PLAYBOOKS_DIR,
            registry=CollectorRegistry(),
            work_dir=tmp_path / "runs",
            inventory=local_inventory(),
            base_extravars={"manage_services": False},
            envvars={"ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote-tmp")},
        )
        st.server.admin.playbooks = st.server.playbooks  # runs are started (and audited) by the admin service
        manager = st.server.auth.create_user("m", Role.MANAGER, ["haidian"])
        app = create_app(st.settings, st.server)
        app.include_router(build_playbooks_router())
        client = TestClient(app)  # no lifespan: no broker needed
        admin = {"Authorization": f"Bearer {st.admin_token}"}
        body = {
            "target": "hd-07",
            "extravars": {"root_prefix": str(tmp_path / "root"), "terminal_password": NEW_PASSWORD},
        }

        assert client.get("/api/v1/playbooks").status_code == 401
        assert client.post("/api/v1/playbooks/rotate_credentials/runs", json=body).status_code == 401
        for path in ("/api/v1/playbooks", "/api/v1/playbooks/runs"):
            assert client.get(path, headers={"Authorization": f"Bearer {manager}"}).status_code == 403
        assert (
            client.post(
                "/api/v1/playbooks/rotate_credentials/runs", json=body, headers={"Authorization": f"Bearer {manager}"}
            ).status_code
            == 403
        )

        listed = client.get("/api/v1/playbooks", headers=admin)
        assert listed.status_code == 200
        assert "rotate_credentials" in {p["name"] for p in listed.json()}
        assert client.post("/api/v1/playbooks/nope/runs", json=body, headers=admin).status_code == 404

        started = client.post("/api/v1/playbooks/rotate_credentials/runs", json=body, headers=admin)
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        assert started.json()["status"] in ("queued", "running")
        st.server.playbooks.wait(run_id, timeout_s=RUN_TIMEOUT_S)  # type: ignore[attr-defined]
        detail = client.get(f"/api/v1/playbooks/runs/{run_id}", headers=admin).json()
        # Nothing was provisioned under this root, so the playbook refuses, and says why.
        assert detail["status"] == "failed"
        assert any("provision the terminal first" in e["message"] for e in detail["events"])
        assert detail["extravars"]["terminal_password"] == "***"
        assert client.get("/api/v1/playbooks/runs/999999", headers=admin).status_code == 404
        audit = st.server.auth.store.audit(action="playbook.run")
        assert audit[0]["actor"] == "admin" and audit[0]["target"] == "hd-07"
        assert audit[0]["after"]["run_id"] == run_id
        st.server.playbooks.close()  # type: ignore[attr-defined]
        assert NEW_PASSWORD.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("fleet.db*"))
    finally:
        st.close()


def test_provisioned_agent_runs_under_its_launcher_with_config_and_token(provisioned: dict[str, Any]) -> None:
    """The unit's ExecStart, run by hand: the launcher execs the real wheel's agent from the release
    `current` points to, with the config and token the playbook wrote."""
    import httpx

    root: Path = provisioned["root"]
    token = (root / "etc/kiosk-api/token").read_text().strip()
    log = root / "var/log/kiosk-agent/agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "PYTHON"))}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(root / "opt/kiosk-fleet/launcher.py"),
                "exec",
                "--root",
                str(root / "opt/kiosk-fleet"),
                "--config",
                str(root / "etc/kiosk-agent/agent.yaml"),
            ],
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    base = f"http://127.0.0.1:{API_PORT}"

    def live() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(base + "/v1/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(live, 60, what="the provisioned agent's local API")
        assert httpx.get(base + "/v1/health", timeout=5).status_code == 401
        r = httpx.get(base + "/v1/health", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert r.status_code == 200 and r.json()["terminal"] == "hd-01"
        event = {"type": "service.started", "body": {"session": "pb-1", "service_code": "TQ02"}}
        r = httpx.post(base + "/v1/events", json=event, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert r.status_code == 201, r.text
        # exec, not a child: the launcher's PID is now the agent of the real release path
        exe = os.readlink(f"/proc/{proc.pid}/exe")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert "launcher" not in exe
        real = (root / "opt/kiosk-fleet/current").resolve()
        assert any(part.decode().startswith(str(real) + "/bin/") for part in cmdline), cmdline
        assert (
            httpx.get(base + "/v1/update", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()["running"][
                "release"
            ]
            == real.name
        )
    finally:
        stop(proc)
    assert (root / "opt/kiosk-fleet/clean-stop").is_file()  # SIGTERM: a clean stop, no crash
    assert stat.S_IMODE((root / "var/lib/kiosk-agent/outbox.db").stat().st_mode) == 0o600
