"""Rollouts end to end: the real server (engine ticked by its scheduler), a real Mosquitto, real
agents whose outboxes carry the `update.status` reports through the real ingest.

The terminals' update logic is a *scripted terminal* (ScriptedTerminals below), not the agent's
updater: it listens on the cmd topics with its own MQTT client and answers each new command with
the reports its script says, posted through that terminal's real agent outbox."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_dev.devstack import DevStack
from fleet_dev.proc import wait_for
from fleet_server.app import FleetServer
from fleet_server.auth.errors import NotAllowed
from fleet_server.auth.models import Role, User
from fleet_server.rollouts.engine import EngineSettings
from fleet_server.rollouts.errors import BadPlan
from fleet_server.rollouts.releases import Release, ReleaseCatalog
from fleet_server.rollouts.schemas import RollbackRequest, RolloutPlan
from fleet_wire import topics
from fleet_wire.release import DesiredRelease, decode_desired
from fleet_wire.topics import Channel
from tests.mqtt_util import RawClient

GOOD = ["notified", "downloading", "downloaded", "installing", "on_trial", "committed"]
ADMIN = User("admin", Role.ADMIN)
OTHER_ADMIN = User("second-admin", Role.ADMIN)
SERVER_OPTIONS: dict[str, Any] = {
    "rollout_tick_s": 0.2,
    "health_sweep_s": 0.3,
    "rollout_settings": EngineSettings(resend_initial_s=0.5, resend_max_s=1.0, retry_initial_s=0.2, retry_max_s=0.5),
}
WAIT_S = 40

Script = Callable[[DesiredRelease, int], list[tuple[str, str, str]]]


def good(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
    return [(s, "ok", "") for s in GOOD]


def fails(state: str, reason: str, detail: str = "") -> Script:
    def script(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
        return [("notified", "ok", ""), ("downloading", "ok", ""), (state, reason, detail)]

    return script


def silent(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
    return []


class ScriptedTerminals:
    """Stands in for the terminals' updaters: answers each *new* command id (re-sends of the same
    command are only counted) with the states its script gives, through the terminal's real agent
    outbox. `n` passed to a script counts the commands that terminal got before (0 = first)."""

    def __init__(self, stack: DevStack, agents: dict[str, Any]) -> None:
        self.stack = stack
        self.agents = agents
        self.scripts: dict[str, Script] = {}
        self.default: Script = good
        self.received: dict[str, list[DesiredRelease]] = {}  # every message, re-sends included
        self.answered: dict[str, list[str]] = {}  # command ids answered, per terminal
        self.reports: dict[tuple[str, str, str], int] = {}  # (terminal, rollout, target) -> last report no.
        self.hold: set[str] = set()  # terminals that take commands but do not answer yet
        self.duplicate = False  # post every report twice, the second batch reversed
        self.lock = threading.Lock()
        self.client = RawClient(stack.port, stack.settings.broker_username, stack.server_password)
        self.client.subscribe(topics.subscription(Channel.CMD))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-terminals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for topic, payload in self.client.drain(0.1):
                tid = topics.parse(topic).terminal_id
                cmd = decode_desired(payload)
                with self.lock:
                    self.received.setdefault(tid, []).append(cmd)
                    if cmd.id in self.answered.get(tid, []) or tid in self.hold or tid not in self.agents:
                        continue
                    n = len(self.answered.setdefault(tid, []))
                    self.answered[tid].append(cmd.id)
                    script = self.scripts.get(tid, self.default)
                self.answer(tid, cmd, script(cmd, n))

    def answer(self, tid: str, cmd: DesiredRelease, steps: list[tuple[str, str, str]]) -> None:
        events = []
        for state, reason, detail in steps:
            key = (tid, cmd.rollout, cmd.target)
            self.reports[key] = self.reports.get(key, 0) + 1
            body = {
                "rollout": cmd.rollout,
                "cmd": cmd.id,
                "kind": cmd.kind,
                "target": cmd.target,
                "version": cmd.version,
                "counter": cmd.counter,
                "state": state,
                "report": self.reports[key],
                "reason": reason,
                "detail": detail,
                "running": "1.0.0",
                "metadata_expires": "2099-01-01T00:00:00.000Z",
            }
            events.append(("update.status", body, None))
        if self.duplicate:
            events = events + events[::-1]
        if events:
            self.agents[tid].post_events(events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


@pytest.fixture
def fleet(make_stack: Callable[..., DevStack]) -> Iterator[Callable[..., tuple[DevStack, ScriptedTerminals]]]:
    made: list[ScriptedTerminals] = []

    def build(offices: dict[str, str], *, start_agents: bool = True) -> tuple[DevStack, ScriptedTerminals]:
        stack = make_stack(0, start=False, server_options=dict(SERVER_OPTIONS))
        for tid, office in offices.items():
            stack.enrol(tid, office)
        stack.start_broker()
        stack.start_server()
        assert stack.server is not None and stack.server.link.connected.wait(10)
        catalog = releases()
        stack.server.rollouts.use_releases(catalog)
        stack.catalog = catalog  # type: ignore[attr-defined]
        agents: dict[str, Any] = {}
        if start_agents:
            for tid in offices:
                agents[tid] = start_agent(stack, tid)
        scripted = ScriptedTerminals(stack, agents)
        made.append(scripted)
        if start_agents:
            wait_for(lambda: all(online(stack, t) for t in offices), WAIT_S, what="terminals online")
        return stack, scripted

    yield build
    for s in made:
        s.close()


def start_agent(stack: DevStack, tid: str) -> Any:
    agent = stack.agent(tid, heartbeat_interval_s=1.0)
    updater = getattr(agent, "updater", None)
    if updater is not None:  # the scripted terminal answers instead of the agent's own updater
        updater.submit = lambda payload: None
    stack.tracked_agents.append(agent)  # type: ignore[attr-defined]
    agent.start()
    return agent


def online(stack: DevStack, tid: str) -> bool:
    assert stack.server is not None
    h = stack.server.health.terminal(tid)
    return h is not None and h["state"] == "online"


def releases() -> ReleaseCatalog:
    cat = ReleaseCatalog()
    cat.add(
        Release("agent/agent-2.0.0.whl", "agent", "2.0.0", 20, ("generic",)), rollback_twin="agent/agent-1.0.0-r21.whl"
    )
    cat.add(Release("agent/agent-1.0.0-r21.whl", "agent", "1.0.0", 21, ("generic",)))
    cat.add(Release("config/lobby-only.json", "config", "3", 3, ("lobby-floor-32",)))
    return cat


def plan(**kw: Any) -> RolloutPlan:
    doc: dict[str, Any] = {"release": "agent/agent-2.0.0.whl", "window": "now", "gate_s": 1}
    doc.update(kw)
    return RolloutPlan.model_validate(doc)


def server(stack: DevStack) -> FleetServer:
    assert stack.server is not None
    return stack.server


def rollout(stack: DevStack, rid: str) -> dict[str, Any]:
    return server(stack).rollouts.get(rid)


def states(stack: DevStack, rid: str) -> dict[str, str]:
    return {t["terminal"]: t["state"] for t in server(stack).rollouts.terminals(rid)}


def wait_state(stack: DevStack, rid: str, *wanted: str) -> dict[str, Any]:
    wait_for(lambda: rollout(stack, rid)["state"] in wanted, WAIT_S, what=f"rollout {rid} {wanted}")
    return rollout(stack, rid)


THREE_OFFICES = {
    "t-dc-1": "dongcheng",
    "t-dc-2": "dongcheng",
    "t-hd-1": "haidian",
    "t-hd-2": "haidian",
    "t-xc-1": "xicheng",
    "t-xc-2": "xicheng",
    "t-ft-1": "fengtai",
    "t-ft-2": "fengtai",
}
THREE_WAVES = [
    {"name": "canary", "size": {"count": 1}, "pilot_only": True},
    {"name": "pilots", "pilot_only": True, "soak_s": 0.5},
    {"name": "everyone"},
]


# -- the happy path and a failing canary ------------------------------------------------------------


def test_three_waves_across_offices_all_commit(fleet: Callable[..., tuple[DevStack, ScriptedTerminals]]) -> None:
    stack, scripted = fleet(THREE_OFFICES)
    fs = server(stack)
    created = fs.rollouts.create(plan(id="three-waves", waves=THREE_WAVES), ADMIN)
    waves = created["preview"]["waves"]
    assert [w["size"] for w in waves] == [1, 3, 4]
    assert {t["office"] for t in waves[0]["terminals"]} <= {"dongcheng", "haidian"}
    assert {t["office"] for t in waves[2]["terminals"]} == {"xicheng", "fengtai"}
    done = wait_state(stack, "three-waves", "completed")
    assert set(states(stack, "three-waves").values()) == {"committed"}
    assert [w["state"] for w in done["waves"]] == ["done", "done", "done"]
    assert done["states"] == {"committed": 8}
    # the window was "now" and the command carries the plan's gate
    cmd = scripted.received["t-xc-1"][0]
    assert cmd.window is None and cmd.gate_s == 1 and cmd.counter == 20
    # the audit log has the create
    assert any(a["action"] == "rollout.create" and a["target"] == "three-waves" for a in fs.auth.audit_log())
    # a terminal's update timeline
    timeline = fs.rollouts.terminal_updates("t-xc-1")["timeline"]
    assert [h["to_state"] for h in timeline][-1] == "committed"


def test_failing_canary_halts_wave_one_with_reason_in_words(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet(THREE_OFFICES)
    fs = server(stack)
    scripted.default = fails("rolled_back", "gate_failed", "camera check failed")
    fs.rollouts.create(plan(id="bad-canary", waves=THREE_WAVES), ADMIN)
    halted = wait_state(stack, "bad-canary", "halted")
    canary = [t for t, s in states(stack, "bad-canary").items() if s == "rolled_back"]
    assert len(canary) == 1
    office_name = {"dongcheng": "东城管理部", "haidian": "海淀管理部"}[THREE_OFFICES[canary[0]]]
    reason = halted["reason"]
    assert reason.startswith("wave 1 (canary): 1 of 1 terminals failed, limit 0")
    assert office_name in reason and "did not pass its health gate" in reason and "camera check failed" in reason
    assert halted["waves"][0]["state"] == "halted"
    # several more ticks: no terminal outside wave 1 ever gets a command
    ticks = fs.rollouts.engine.metrics.tick_seconds.collect()[0].samples
    before = next(s.value for s in ticks if s.name.endswith("_count"))
    wait_for(
        lambda: (
            next(
                s.value
                for s in fs.rollouts.engine.metrics.tick_seconds.collect()[0].samples
                if s.name.endswith("_count")
            )
            > before + 5
        ),
        WAIT_S,
        what="more ticks",
    )
    assert set(scripted.received) == set(canary)
    assert fs.rollouts.metrics.halted._value.get() == 1


def test_failure_threshold_percent_waits_for_minimum_sample(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    terms = {f"t-p-{i}": ["dongcheng", "haidian", "xicheng"][i % 3] for i in range(6)}
    stack, scripted = fleet(terms)
    fs = server(stack)
    first = fs.rollouts.preview(plan(waves=[{"name": "all"}]))["waves"][0]["terminals"][0]["terminal"]
    # the first to answer fails; with 20% and a sample of 4 that is no halt yet, and 1 of 6 at the end is within
    scripted.scripts[first] = fails("failed", "install_failed", "pip exit 1")
    for t in terms:
        if t != first:
            scripted.hold.add(t)
    fs.rollouts.create(plan(id="sample", waves=[{"name": "all", "failures": {"percent": 20, "min_sample": 4}}]), ADMIN)
    wait_for(lambda: states(stack, "sample")[first] == "failed", WAIT_S, what="first failure")
    for _ in range(3):
        fs.rollouts.tick()
    assert rollout(stack, "sample")["state"] == "running"  # 1 of 1 failed, but the sample is too small
    scripted.hold.clear()
    done = wait_state(stack, "sample", "completed", "halted")
    assert done["state"] == "completed", done["reason"]
    assert "1 failed within the limit" in done["waves"][0]["note"]
    # the same with two failures halts
    stack2, scripted2 = stack, scripted
    second = next(t for t in terms if t != first)
    scripted2.scripts[second] = fails("failed", "install_failed", "pip exit 1")
    scripted2.scripts[first] = fails("failed", "install_failed", "pip exit 1")
    fs.rollouts.create(
        plan(
            id="sample-2",
            release="agent/agent-1.0.0-r21.whl",
            waves=[{"name": "all", "failures": {"percent": 20, "min_sample": 4}}],
        ),
        ADMIN,
    )
    halted = wait_state(stack2, "sample-2", "halted")
    assert "limit 20% of the finished ones" in halted["reason"]


def test_percent_wave_never_rounds_to_zero_and_sizes_that_cannot_add_up(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, _ = fleet({"t-a-1": "dongcheng", "t-a-2": "haidian", "t-a-3": "xicheng"}, start_agents=False)
    fs = server(stack)
    pv = fs.rollouts.preview(plan(waves=[{"size": {"percent": 1}}, {}]))
    assert [w["size"] for w in pv["waves"]] == [1, 2]
    with pytest.raises(BadPlan, match=r"wave 2 \('big'\): asks for 5 terminals but only 2"):
        fs.rollouts.preview(plan(waves=[{"size": {"count": 1}}, {"name": "big", "size": {"count": 5}}]))
    with pytest.raises(BadPlan, match="in no wave"):
        fs.rollouts.preview(plan(waves=[{"size": {"count": 1}}]))
    with pytest.raises(BadPlan, match="more than 100%"):
        fs.rollouts.preview(plan(waves=[{"size": {"percent": 60}}, {"size": {"percent": 50}}, {}]))
    with pytest.raises(BadPlan, match="not a published release"):
        fs.rollouts.preview(plan(release="agent/nope.whl", waves=[{}]))
    # only terminals whose profile the release lists: none here
    with pytest.raises(BadPlan, match="no enrolled terminal"):
        fs.rollouts.preview(plan(release="config/lobby-only.json", waves=[{}]))
    # over HTTP the same is a 422 naming the wave
    with TestClient(_app(stack)) as http:
        r = http.post(
            "/api/v1/rollouts/preview",
            json={"release": "agent/agent-2.0.0.whl", "waves": [{"size": {"count": 9}}]},
            headers=_auth(stack.admin_token),
        )
        assert r.status_code == 422 and "wave 1: asks for 9" in r.json()["detail"]


def test_an_install_period_that_ends_before_it_starts_is_refused_naming_the_field(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, _ = fleet({"t-p-1": "dongcheng", "t-p-2": "haidian"}, start_agents=False)
    body: dict[str, Any] = {"release": "agent/agent-2.0.0.whl", "waves": [{}], "window": "now"}
    with TestClient(_app(stack)) as http:
        for start, end in (("2026-12-03T06:00:00+08:00", "2026-12-03T02:00:00+08:00"), ("2026-12-03T06:00:00Z",) * 2):
            for path in ("/api/v1/rollouts/preview", "/api/v1/rollouts"):
                r = http.post(
                    path, json={**body, "window_start": start, "window_end": end}, headers=_auth(stack.admin_token)
                )
                assert r.status_code == 422, r.text
                assert r.json()["detail"].startswith("body.window_end:"), r.text
                assert "the install period must end after it starts" in r.json()["detail"]
        # a time without its zone is refused too, naming the field
        r = http.post(
            "/api/v1/rollouts", json={**body, "window_start": "2026-12-03T06:00:00"}, headers=_auth(stack.admin_token)
        )
        assert r.status_code == 422 and r.json()["detail"].startswith("body.window_start:"), r.text
        assert "needs a time zone" in r.json()["detail"]
        assert server(stack).rollouts.list_rollouts() == []  # nothing was created
        # a period the right way round is taken and shown with the rollout
        r = http.post(
            "/api/v1/rollouts",
            json={**body, "id": "with-period", "window_start": "2099-01-01T02:00:00+08:00",
                  "window_end": "2099-01-03T06:00:00+08:00"},
            headers=_auth(stack.admin_token),
        )  # fmt: skip
        assert r.status_code == 201, r.text
        got = http.get("/api/v1/rollouts/with-period", headers=_auth(stack.admin_token)).json()
        assert got["window_start"] == "2099-01-01T02:00:00+08:00" and got["window_end"] == "2099-01-03T06:00:00+08:00"
        wait_for(lambda: server(stack).rollouts.engine.last.terminals == 2, 10, what="an engine tick over it")
        assert [t["sends"] for t in server(stack).rollouts.terminals("with-period")] == [0, 0]  # not before the start


def _app(stack: DevStack) -> Any:
    from fleet_server.app import create_app

    return create_app(stack.settings, server(stack))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- approvals and controls ---------------------------------------------------------------------------


def test_approval_by_creator_refused_other_admin_accepted_and_pause_resume_abort(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet({"t-c-1": "dongcheng", "t-c-2": "haidian", "t-c-3": "xicheng"})
    fs = server(stack)
    fs.rollouts.create(
        plan(
            id="approve-me",
            approval_required=True,
            waves=[{"size": {"count": 1}, "on_success": "wait_for_approval"}, {}],
        ),
        ADMIN,
    )
    assert rollout(stack, "approve-me")["state"] == "awaiting_approval"
    fs.rollouts.tick()
    assert scripted.received == {}  # nothing is sent before the approval
    with pytest.raises(NotAllowed, match="created by 'admin'; a second admin must approve"):
        fs.rollouts.approve("approve-me", ADMIN)
    fs.rollouts.approve("approve-me", OTHER_ADMIN)
    waiting = wait_state(stack, "approve-me", "waiting_approval")
    assert "waiting for an admin to approve wave 2" in waiting["reason"]
    assert len(scripted.received) == 1
    fs.rollouts.pause("approve-me", OTHER_ADMIN, "lunch")
    assert rollout(stack, "approve-me")["reason"] == "paused by second-admin: lunch"
    fs.rollouts.resume("approve-me", OTHER_ADMIN)
    assert rollout(stack, "approve-me")["state"] == "waiting_approval"
    fs.rollouts.approve("approve-me", OTHER_ADMIN)
    # pause while wave 2 runs: held terminals get no command while paused
    for t in ("t-c-1", "t-c-2", "t-c-3"):
        scripted.hold.add(t)
    fs.rollouts.pause("approve-me", ADMIN)
    fs.rollouts.tick()
    sent_before = sum(len(v) for v in scripted.received.values())
    for _ in range(3):
        fs.rollouts.tick()
    assert sum(len(v) for v in scripted.received.values()) == sent_before
    fs.rollouts.resume("approve-me", ADMIN)
    scripted.hold.clear()
    # the held terminals answer the re-send
    wait_state(stack, "approve-me", "completed")
    fs.rollouts.create(plan(id="abort-me", release="agent/agent-1.0.0-r21.whl", waves=[{}]), ADMIN)
    aborted = fs.rollouts.abort("abort-me", ADMIN, "wrong release")
    assert aborted["state"] == "aborted" and aborted["reason"] == "aborted by admin: wrong release"
    actions = [a["action"] for a in fs.auth.audit_log()]
    for action in ("rollout.approve", "rollout.pause", "rollout.resume", "rollout.abort"):
        assert action in actions


def test_retry_failed_only_and_automatic_retry_of_transient_failures(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet({"t-r-1": "dongcheng", "t-r-2": "haidian", "t-r-3": "xicheng"})
    fs = server(stack)

    def flaky(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
        if n < 2:  # the first two attempts cannot download
            return [("notified", "ok", ""), ("downloading", "ok", ""), ("failed", "download_failed", "timeout")]
        return good(cmd, n)

    scripted.scripts["t-r-1"] = flaky
    scripted.scripts["t-r-2"] = fails("failed", "install_failed", "pip exit 1")  # not transient
    fs.rollouts.create(plan(id="retry", waves=[{"failures": {"count": 1}}]), ADMIN)
    wait_for(lambda: states(stack, "retry")["t-r-1"] == "committed", WAIT_S, what="automatic retries")
    t1 = next(t for t in fs.rollouts.terminals("retry") if t["terminal"] == "t-r-1")
    assert t1["attempts"] == 2 and len(scripted.answered["t-r-1"]) == 3
    assert [h["reason"] for h in t1["history"] if h["source"] == "server"] == ["retry", "retry"]
    done = wait_state(stack, "retry", "completed")
    assert done["states"] == {"committed": 2, "failed": 1}
    assert len(scripted.answered["t-r-2"]) == 1  # install_failed is not retried by itself
    # retry failed only: t-r-2 gets a new command, the committed ones nothing
    scripted.scripts["t-r-2"] = good
    got = {t: len(v) for t, v in scripted.answered.items()}
    out = fs.rollouts.retry("retry", ADMIN)
    assert out["retried"] == ["t-r-2"]
    wait_state(stack, "retry", "completed")
    wait_for(lambda: states(stack, "retry")["t-r-2"] == "committed", WAIT_S, what="retried terminal commits")
    assert len(scripted.answered["t-r-2"]) == 2
    assert len(scripted.answered["t-r-1"]) == got["t-r-1"] and len(scripted.answered["t-r-3"]) == got["t-r-3"]


def test_state_timeout_then_offline_terminal_converges_after_coming_back(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet({"t-o-1": "dongcheng", "t-o-2": "haidian"})
    fs = server(stack)

    def stuck(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
        return [("notified", "ok", ""), ("downloading", "ok", "")] if n == 0 else good(cmd, n)

    scripted.scripts["t-o-1"] = stuck
    # t-o-2 is offline for its whole wave: its agent stops before the rollout starts
    agent2 = scripted.agents.pop("t-o-2")
    agent2.stop()
    fs.rollouts.create(
        plan(id="timeouts", waves=[{}], timeouts={"downloading": 1.0}, max_retries=1),
        ADMIN,
    )
    wait_for(
        lambda: any(h["to_state"] == "timed_out" for t in fs.rollouts.terminals("timeouts") for h in t["history"]),
        WAIT_S,
        what="downloading timed out",
    )
    t1 = next(t for t in fs.rollouts.terminals("timeouts") if t["terminal"] == "t-o-1")
    timed = next(h for h in t1["history"] if h["to_state"] == "timed_out")
    assert timed["source"] == "server" and "still downloading for more than 1 s" in timed["detail"]
    wait_for(lambda: states(stack, "timeouts")["t-o-1"] == "committed", WAIT_S, what="retried after the timeout")
    # t-o-2 has had commands re-sent into the void; it comes back and converges
    assert states(stack, "timeouts")["t-o-2"] == "pending"
    assert rollout(stack, "timeouts")["state"] == "running"
    back = start_agent(stack, "t-o-2")
    scripted.agents["t-o-2"] = back
    done = wait_state(stack, "timeouts", "completed")
    assert done["states"] == {"committed": 2}
    assert next(t for t in fs.rollouts.terminals("timeouts") if t["terminal"] == "t-o-2")["sends"] >= 2


def test_later_enrolled_terminal_joins_last_wave_and_gets_it(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet({"t-l-1": "dongcheng", "t-l-2": "xicheng"})
    fs = server(stack)
    fs.rollouts.create(
        plan(id="later", targets={"offices": ["xicheng", "dongcheng"]}, waves=[{"size": {"count": 1}}, {}]), ADMIN
    )
    wait_state(stack, "later", "completed")
    stack.enrol("t-l-3", "xicheng")
    stack.reload_broker()
    scripted.agents["t-l-3"] = start_agent(stack, "t-l-3")
    wait_for(lambda: "t-l-3" in states(stack, "later"), WAIT_S, what="newcomer joined")
    done = wait_state(stack, "later", "completed")
    wait_for(lambda: states(stack, "later").get("t-l-3") == "committed", WAIT_S, what="newcomer committed")
    t3 = next(t for t in fs.rollouts.terminals("later") if t["terminal"] == "t-l-3")
    assert t3["wave"] == 2 and t3["joined_late"]
    assert done["waves"][1]["state"] == "done"


def test_server_restart_mid_rollout_continues(fleet: Callable[..., tuple[DevStack, ScriptedTerminals]]) -> None:
    stack, scripted = fleet({"t-s-1": "dongcheng", "t-s-2": "haidian", "t-s-3": "xicheng"})
    fs = server(stack)
    scripted.hold.update({"t-s-2", "t-s-3"})
    fs.rollouts.create(plan(id="restart", waves=[{"size": {"count": 1}}, {}]), ADMIN)
    first = next(t["terminal"] for t in fs.rollouts.terminals("restart", wave=1))
    scripted.hold.discard(first)
    wait_for(lambda: rollout(stack, "restart")["current_wave"] == 2, WAIT_S, what="wave 2 started")
    stack.stop_server()
    scripted.hold.clear()
    fs2 = stack.start_server()
    assert fs2.link.connected.wait(10)
    fs2.rollouts.use_releases(stack.catalog)  # type: ignore[attr-defined]
    done = wait_state(stack, "restart", "completed")
    assert done["states"] == {"committed": 3}


def test_automatic_rollback_on_halt_converges(fleet: Callable[..., tuple[DevStack, ScriptedTerminals]]) -> None:
    stack, scripted = fleet({"t-b-1": "dongcheng", "t-b-2": "haidian", "t-b-3": "xicheng"})
    fs = server(stack)

    def bad_new_release(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
        if cmd.version == "2.0.0" and cmd.rollout == "goes-bad":
            return [("notified", "ok", ""), ("on_trial", "ok", ""), ("rolled_back", "crash_loop", "")]
        return good(cmd, n)

    scripted.default = bad_new_release
    scripted.scripts["t-b-1"] = good
    fs.rollouts.create(plan(id="goes-bad", waves=[{"failures": {"count": 0}}], on_halt="rollback"), ADMIN)
    old = wait_state(stack, "goes-bad", "rolled_back")
    assert "kept crashing on start" in old["reason"]
    back = old["superseded_by"]
    assert back and rollout(stack, back)["release"] == "agent/agent-1.0.0-r21.whl"
    done = wait_state(stack, back, "completed")
    assert done["states"] == {"committed": 3} and done["parent"] == "goes-bad"
    # a manual rollback of a finished rollout to a named release; one below the counter is refused
    with pytest.raises(BadPlan, match="would refuse the downgrade"):
        fs.rollouts.rollback(back, ADMIN, RollbackRequest(release="agent/agent-2.0.0.whl"))


def test_duplicate_and_out_of_order_reports_are_harmless(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, scripted = fleet({"t-d-1": "dongcheng", "t-d-2": "haidian"})
    fs = server(stack)
    scripted.duplicate = True
    fs.rollouts.create(plan(id="dupes", waves=[{}]), ADMIN)
    done = wait_state(stack, "dupes", "completed")
    assert done["states"] == {"committed": 2}
    for t in fs.rollouts.terminals("dupes"):
        terminal_steps = [h["to_state"] for h in t["history"] if h["source"] == "terminal"]
        assert terminal_steps == GOOD  # each step once, in order, none undone by the reversed copies


def test_manager_and_auditor_read_but_every_control_is_refused(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],
) -> None:
    stack, _ = fleet({"t-m-1": "dongcheng", "t-m-2": "haidian"}, start_agents=False)
    fs = server(stack)
    fs.rollouts.create(plan(id="roles", waves=[{}]), ADMIN)
    manager = fs.auth.create_user("mgr", Role.MANAGER, offices=["dongcheng"])
    auditor = fs.auth.create_user("aud", Role.AUDITOR)
    body = {"release": "agent/agent-2.0.0.whl", "waves": [{}]}
    with TestClient(_app(stack)) as http:
        for token in (_token(manager), _token(auditor)):
            h = _auth(token)
            assert http.get("/api/v1/rollouts", headers=h).status_code == 200
            assert http.get("/api/v1/rollouts/roles", headers=h).json()["id"] == "roles"
            assert http.get("/api/v1/terminals/t-m-1/updates", headers=h).status_code == 200
            seen = {t["terminal"] for t in http.get("/api/v1/rollouts/roles/terminals", headers=h).json()}
            assert seen == ({"t-m-1"} if token == _token(manager) else {"t-m-1", "t-m-2"})
            assert http.post("/api/v1/rollouts", json=body, headers=h).status_code == 403
            for control in ("approve", "pause", "resume", "abort", "retry", "rollback"):
                r = http.post(f"/api/v1/rollouts/roles/{control}", headers=h)
                assert r.status_code == 403, (control, r.text)
                assert "needs admin" in r.json()["detail"]
        r = http.get("/api/v1/terminals/t-m-2/updates", headers=_auth(_token(manager)))
        assert r.status_code == 403 and "may not see terminal 't-m-2'" in r.json()["detail"]
        admin = _auth(stack.admin_token)
        assert http.post("/api/v1/rollouts/roles/pause", json={"note": "x"}, headers=admin).json()["state"] == "paused"
        assert http.get("/api/v1/rollouts/nope", headers=admin).status_code == 404
        assert http.post("/api/v1/rollouts/roles/approve", headers=admin).status_code == 409


def _token(created: str) -> str:
    return created


def test_preview_flags_offline_and_low_disk(fleet: Callable[..., tuple[DevStack, ScriptedTerminals]]) -> None:
    stack, scripted = fleet({"t-f-1": "dongcheng", "t-f-2": "haidian"}, start_agents=False)
    fs = server(stack)
    fs.rollouts.low_disk_pct = 0.0  # every real disk is "low" against a 0% threshold
    scripted.agents["t-f-1"] = start_agent(stack, "t-f-1")
    wait_for(
        lambda: online(stack, "t-f-1") and fs.health.terminal("t-f-1")["disk_pct"] > 0, WAIT_S, what="t-f-1 online"
    )
    pv = fs.rollouts.preview(plan(waves=[{}]))
    flags = {t["terminal"]: t["flags"] for t in pv["waves"][0]["terminals"]}
    assert flags["t-f-1"] == ["low_disk"]  # online, and its disk is over the (lowered) threshold
    assert flags["t-f-2"] == ["missing"]  # never connected: no disk reading to judge
    assert pv["flagged"] == 2
    json.dumps(pv)  # the preview is plain JSON
