"""The installables, tried as an operator would: `./run.sh dist`'s wheels, each in a clean venv.

The agent wheel is installed offline from its own wheelhouse with hash checking and run against a
real Mosquitto; the server wheel is installed in another clean venv and started as
`fleet-server run`. Neither venv can import the other deliverable or the dev package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from fleet_dev.devstack import DevStack
from fleet_dev.dist import Built
from fleet_dev.proc import die_with_parent, free_port, wait_for

pytestmark = pytest.mark.slow


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(meta).decode()


def _clean_venv(where: Path) -> Path:
    """A venv without pip (pip is driven from outside with --python) and without system packages."""
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(where)
    return where / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
         *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _cannot_import(python: Path, module: str, cwd: Path) -> bool:
    proc = subprocess.run([str(python), "-c", f"import {module}"], cwd=cwd, capture_output=True, timeout=60)
    return proc.returncode != 0


def _get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# -- what is inside -------------------------------------------------------------------------------


def test_agent_wheel_holds_the_agent_and_the_wire_contract_only(dist: Built) -> None:
    names = _names(dist.agent_wheel)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"edge_agent", "fleet_wire"}
    assert not any("/sim/" in n or n.startswith(("fleet_server/", "fleet_dev/")) for n in names)
    assert "fleet_wire/catalog/service_items.yaml" in names
    meta = _metadata(dist.agent_wheel)
    assert "Name: kiosk-fleet-agent" in meta
    for dep in ("paho-mqtt", "pydantic", "fastapi", "uvicorn", "prometheus-client"):
        assert f"Requires-Dist: {dep}" in meta, dep
    assert 'extra == "face"' in meta and "Requires-Dist: ansible" not in meta
    assert "agent" in dist.agent_wheel.name


def test_agent_lock_pins_every_dependency_wheel_by_hash(dist: Built) -> None:
    assert dist.agent_lock is not None and dist.wheelhouse is not None
    pins = [ln for ln in dist.agent_lock.read_text().splitlines() if ln and not ln.startswith("#")]
    names = {p.split("==")[0] for p in pins}
    assert {"paho-mqtt", "pydantic", "pydantic-core", "fastapi", "uvicorn", "prometheus-client", "pyyaml"} <= names
    assert all(" --hash=sha256:" in p for p in pins)
    assert not any(n.startswith("kiosk-fleet") for n in names)


def test_server_wheel_carries_its_data_and_no_agent_code(dist: Built) -> None:
    names = _names(dist.server_wheel)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fleet_server", "fleet_wire"}
    repo = Path(__file__).resolve().parent.parent
    for profile in (repo / "device_profiles").glob("*.yaml"):
        assert f"fleet_server/data/device_profiles/{profile.name}" in names
    for playbook in (repo / "playbooks").glob("*.yml"):
        assert f"fleet_server/data/playbooks/{playbook.name}" in names
    assert "fleet_server/data/playbooks/roles/kiosk_agent/tasks/main.yml" in names
    assert "fleet_server/seed/offices.yaml" in names and "fleet_wire/catalog/service_items.yaml" in names
    assert not any(n.startswith("fleet_dev/") or n.startswith("fleet_server/devstack") for n in names)
    assert "server" in dist.server_wheel.name


# -- installed and run ----------------------------------------------------------------------------


def test_agent_wheel_installs_offline_and_runs_against_a_real_broker(dist: Built, tmp_path: Path) -> None:
    assert dist.agent_lock is not None and dist.wheelhouse is not None
    python = _clean_venv(tmp_path / "venv")
    _pip(python, "--no-index", "--find-links", str(dist.wheelhouse), "--require-hashes", "-r", str(dist.agent_lock))
    _pip(python, "--no-index", "--no-deps", str(dist.agent_wheel))
    for module in ("fleet_server", "fleet_dev", "edge_agent.sim"):
        assert _cannot_import(python, module, tmp_path), f"{module} is importable from the agent's venv"

    st = DevStack(tmp_path / "stack")
    try:
        st.enrol("wheel-01", "haidian")
        st.start_broker()
        st.start_server()
        token_file = tmp_path / "api-token"
        token = "wheel-test-token-0123456789abcdef"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        api_port = free_port()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EDGE_API_TOKEN_FILE": str(token_file)}
        for key, value in st.agent_settings("wheel-01", api_port=api_port).items():
            env[f"EDGE_{key.upper()}"] = str(value)
        log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the child owns it
        agent = subprocess.Popen(
            [str(tmp_path / "venv" / "bin" / "edge-agent"), "run"], cwd=tmp_path, env=env, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            assert st.server is not None
            wait_for(lambda: st.server is not None and st.server.health.terminal("wheel-01") is not None
                     and st.server.health.terminal("wheel-01")["state"] == "online",  # type: ignore[index]
                     timeout_s=60, what="the wheel-installed agent online at the server")  # fmt: skip
            body = json.dumps({"type": "service.completed", "key": "wheel-test-0001",
                               "body": {"session": "w-1", "service_code": "TQ02", "duration_s": 95.0,
                                        "face_login": False}}).encode()  # fmt: skip
            req = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/v1/events", data=body, method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        assert resp.status == 201
                        break
                except urllib.error.HTTPError as err:
                    pytest.fail(f"the agent refused the event: {err.code} {err.read()[:500]!r}")
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            wait_for(lambda: st.stored("wheel-01") >= 1, timeout_s=30, what="the event stored at the server")
        finally:
            agent.terminate()
            agent.wait(15)
            log.close()
        assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        st.close()


def _server_env(tmp_path: Path, port: int, broker_port: int, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "FLEET_ENVIRONMENT": "development",
        "FLEET_DB_PATH": str(tmp_path / "srv" / "fleet.db"),
        "FLEET_BROKER_PORT": str(broker_port),
        "FLEET_BROKER_PASSWORD": "not-used-here",
        "FLEET_BROKER_ACCOUNTS": "none",
        "FLEET_ADMIN_TOKEN": "wheel-admin-token-0123456789abcdef",
        "FLEET_HTTP_PORT": str(port),
        **extra,
    }


def test_server_wheel_installs_and_serves_its_bundled_data(dist: Built, tmp_path: Path) -> None:
    python = _clean_venv(tmp_path / "venv")
    _pip(python, str(dist.server_wheel))
    for module in ("edge_agent", "fleet_dev"):
        assert _cannot_import(python, module, tmp_path), f"{module} is importable from the server's venv"
    server_bin = tmp_path / "venv" / "bin" / "fleet-server"

    # a missing data folder stops the start with one line naming the setting
    refused = subprocess.run(
        [str(server_bin), "run"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=_server_env(tmp_path, free_port(), free_port(), FLEET_PROFILES_DIR=str(tmp_path / "nowhere")),
    )  # fmt: skip
    assert refused.returncode == 2
    assert "FLEET_PROFILES_DIR" in refused.stderr and "Traceback" not in refused.stderr

    port = free_port()
    env = _server_env(tmp_path, port, free_port())
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([str(server_bin), "run"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)  # fmt: skip
    try:
        base, token = f"http://127.0.0.1:{port}", env["FLEET_ADMIN_TOKEN"]

        def up() -> bool:
            try:
                return _get(f"{base}/healthz")[0] == 200
            except OSError:
                return False

        wait_for(up, timeout_s=60, what="the wheel-installed server answering /healthz")
        status, profiles = _get(f"{base}/api/v1/profiles", token)
        assert status == 200
        assert {"generic", "lobby-floor-32", "wall-21"} <= {p["id"] for p in json.loads(profiles)}
        status, playbooks = _get(f"{base}/api/v1/playbooks", token)
        assert status == 200
        assert {"provision_terminal", "onboard_office"} <= {p["name"] for p in json.loads(playbooks)}
        status, offices = _get(f"{base}/api/v1/offices", token)
        assert status == 200 and len(json.loads(offices)) == 18
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
