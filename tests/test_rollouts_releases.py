"""Rollouts over the real TUF-backed release service: a published agent release, a failing
canary that halts the rollout, and the automatic rollback to the release's signed rollback twin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fleet_dev import releases as rel
from fleet_dev.devstack import DevStack
from fleet_server.rollouts.errors import UnknownRelease
from fleet_wire.release import DesiredRelease
from tests.release_util import serve
from tests.test_rollouts import ADMIN, ScriptedTerminals, fleet, good, plan, rollout, server, wait_state  # noqa: F401


def test_halted_rollout_rolls_back_to_the_signed_twin(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],  # noqa: F811
    tmp_path: Path,
) -> None:
    stack, scripted = fleet({"t-tuf-1": "dongcheng", "t-tuf-2": "haidian", "t-tuf-3": "xicheng"})
    fs = server(stack)
    fs.rollouts.use_releases(fs.releases)  # the server's own release service, not the test catalogue
    http, thread, url = serve(stack)
    rc = rel.client(url, stack.admin_token)
    try:
        ks = rel.make_keystore(tmp_path / "keystore")
        rel.install_online_key(ks, stack.settings)
        rel.set_up_server(rc, ks)
        work = tmp_path / "work"
        rel.publish_agent(rc, ks, rel.write_agent_dist(work / "d1", "1.0.0"), work)
        second = rel.publish_agent(rc, ks, rel.write_agent_dist(work / "d2", "1.1.0"), work)
        assert second.twin is not None

        def script(cmd: DesiredRelease, n: int) -> list[tuple[str, str, str]]:
            if cmd.target == second.path:
                return [("notified", "ok", ""), ("on_trial", "ok", ""), ("rolled_back", "gate_failed", "printer")]
            return good(cmd, n)

        scripted.default = script
        try:
            fs.rollouts.preview(plan(release="agent/9/nope.whl", waves=[{}]))
        except UnknownRelease as err:
            assert "not a published release" in str(err)
        else:
            raise AssertionError("an unpublished release was accepted")
        created = fs.rollouts.create(
            plan(id="tuf-canary", release=second.path, waves=[{"size": {"count": 1}}, {}], on_halt="rollback"), ADMIN
        )
        assert created["rollout"]["version"] == "1.1.0" and created["rollout"]["counter"] == second.counter
        old = wait_state(stack, "tuf-canary", "rolled_back")
        assert "wave 1: 1 of 1 terminals failed" in old["waves"][0]["note"]
        back = rollout(stack, old["superseded_by"])
        assert back["release"] == second.twin and back["version"] == "1.0.0" and back["counter"] > second.counter
        done = wait_state(stack, back["id"], "completed")
        assert done["terminals"] == 1 and done["states"] == {"committed": 1}  # only the canary was reached
        # the engine's automatic rollback is in the audit log under its own name
        assert any(a["actor"] == "rollout-engine" and a["action"] == "rollout.rollback" for a in fs.auth.audit_log())
    finally:
        rc.http.close()
        http.should_exit = True
        thread.join(5)
