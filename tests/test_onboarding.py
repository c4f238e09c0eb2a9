"""Onboarding one of the 12 non-pilot offices end to end, and revocation cutting a terminal off."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_dev.devstack import service_events
from fleet_dev.proc import wait_for
from fleet_server.app import create_app
from fleet_wire import topics
from fleet_wire.topics import Channel
from tests.mqtt_util import RawClient


def test_onboard_non_pilot_office_terminals_report_and_revoked_one_is_cut_off(make_stack: Any) -> None:
    st = make_stack(0, server_options={"health_sweep_s": 0.3})
    assert st.server is not None
    client = TestClient(create_app(st.settings, st.server))
    admin = {"Authorization": f"Bearer {st.admin_token}"}
    office = next(o for o in client.get("/api/v1/offices", headers=admin).json() if o["id"] == "fangshan")
    assert office["pilot"] is False and office["name"] == "房山管理部"
    body = {"terminals": [{"id": f"fangshan-{i:02d}", "office_id": "fangshan"} for i in (1, 2, 3)]}
    r = client.post("/api/v1/offices/fangshan/onboard", json=body, headers=admin)
    assert r.status_code == 201, r.text
    creds = {t["id"]: t["mqtt_password"] for t in r.json()["terminals"]}
    # the broker was reloaded with the new accounts: simulated terminals of the office connect
    agents = []
    for tid, password in creds.items():
        st.passwords[tid], st.offices[tid] = password, "fangshan"
        agent = st.agent(tid, heartbeat_interval_s=1.0)
        st.tracked_agents.append(agent)
        agent.start()
        agent.post_events(list(service_events(20, tid)))
        agents.append(agent)
    wait_for(lambda: st.stored() == 60, 20, what="60 events from the new office")

    def states() -> dict[str, str]:
        return {
            h["terminal"]: h["state"]
            for h in client.get("/api/v1/health/terminals?office=fangshan", headers=admin).json()
        }

    wait_for(lambda: set(states().values()) == {"online"}, 20, what="new terminals online")
    # revoke one: its connection is cut and it can no longer publish anything
    assert client.delete("/api/v1/terminals/fangshan-03", headers=admin).status_code == 200
    wait_for(lambda: not agents[2].link.connected, 15, what="revoked terminal disconnected")
    agents[2].post_events(list(service_events(5, "after-revoke")))
    spy = RawClient(st.port, st.settings.broker_username, st.server_password)
    spy.subscribe(topics.topic("fangshan-03", Channel.EVENTS))
    try:
        assert spy.drain(wait_s=3.0) == []
    finally:
        spy.close()
    assert st.stored("fangshan-03") == 20 and agents[2].outbox.depth == 5  # kept, not lost, not sent
    assert agents[2].link.auth_failures >= 1
    assert "fangshan-03" not in {t["terminal"] for t in client.get("/api/v1/health/terminals", headers=admin).json()}
    # the other two carry on
    agents[0].post_events(list(service_events(5, "still-here")))
    wait_for(lambda: st.stored("fangshan-01") == 25, 10, what="fangshan-01 still reporting")


@pytest.mark.timeout(900)
def test_onboard_office_by_playbook_then_terminals_run_from_the_config_it_wrote(
    make_stack: Any, tmp_path: Any, dist: Any
) -> None:
    import sys

    from edge_agent.agent import Agent
    from edge_agent.config import AgentSettings
    from tests.playbooks_util import agent_install_vars, local_inventory

    options = {
        "inventory": local_inventory(),
        "envvars": {"ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-tmp")},
        "base_extravars": {
            "manage_services": False,
            **agent_install_vars(dist),  # the real agent wheel, installed hash-pinned from its wheelhouse
            "agent_heartbeat_interval_s": 1,
        },
    }
    st = make_stack(0, server_options={"health_sweep_s": 0.3, "playbook_options": options})
    assert st.server is not None
    roots = {}

    def site_vars(t: Any) -> dict[str, Any]:
        roots[t.id] = tmp_path / f"root-{t.id}"
        return {"root_prefix": str(roots[t.id]), "connection": "local", "python": sys.executable}

    st.server.admin.onboard_terminal_vars = site_vars
    client = TestClient(create_app(st.settings, st.server))
    admin = {"Authorization": f"Bearer {st.admin_token}"}
    body = {"terminals": [{"id": f"tongzhou-{i:02d}", "office_id": "tongzhou"} for i in (1, 2)], "run_playbook": True}
    r = client.post("/api/v1/offices/tongzhou/onboard", json=body, headers=admin)
    assert r.status_code == 201, r.text
    run_id = r.json()["playbook_run"]["id"]
    run = st.server.playbooks.wait(run_id, timeout_s=480)
    assert run.status == "successful", run
    detail = client.get(f"/api/v1/playbooks/runs/{run_id}", headers=admin).json()
    assert detail["status"] == "successful" and detail["events"]
    agents = []
    for tid, root in roots.items():
        cfg = root / "etc" / "kiosk-agent" / "agent.yaml"
        assert oct(cfg.stat().st_mode & 0o777) == "0o600"
        settings = AgentSettings.from_file(cfg)  # production settings, as a real terminal reads them
        assert settings.terminal_id == tid and settings.office_id == "tongzhou" and settings.broker_port == st.port
        agent = Agent(settings)
        st.tracked_agents.append(agent)
        agent.start()
        agent.post_events(list(service_events(10, tid)))
        agents.append(agent)
    wait_for(lambda: st.stored() == 20, 30, what="events from the provisioned terminals")

    def states() -> set[str]:
        return {h["state"] for h in client.get("/api/v1/health/terminals?office=tongzhou", headers=admin).json()}

    wait_for(lambda: states() == {"online"}, 20, what="provisioned terminals online")
    audit = client.get("/api/v1/audit", headers=admin).json()
    assert {"office.onboard", "playbook.run"} <= {e["action"] for e in audit}
