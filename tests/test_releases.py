"""Releases on the server, over real HTTP: fleetctl release end to end, publish verification and
its refusals, rollback twins and republish, the /tuf routes (Range, no login), re-signing and
the expiry metric."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from securesystemslib.signer._crypto_signer import CryptoSigner

from fleet_dev import releases as rel
from fleet_server.auth.models import Role
from fleet_server.cli import EXIT_USAGE
from fleet_server.db import connect
from fleet_server.releases import bundle as bundles
from fleet_server.releases.client import ReleaseClientError
from fleet_server.releases.service import ReleaseService
from fleet_server.releases.signing import SignedRelease, sign_bundle
from fleet_server.releases.tufmeta import now_utc
from tests.release_util import Repo, agent, fleetctl, running_repo


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    with running_repo(tmp_path) as r:
        yield r


def run(url: str, token: str, *args: str) -> Any:
    return fleetctl(url, token, *args)


def timestamp_version(repo: Repo) -> int:
    return int(repo.stack.server.releases.repo.timestamp().signed.version)


def test_fleetctl_release_from_keystore_to_published_list(repo: Repo, tmp_path: Path) -> None:
    st, url, token = repo.stack, repo.url, repo.stack.admin_token
    ks_dir = tmp_path / "ks2"
    r = run(url, token, "release", "keys", "init", "--keystore", str(ks_dir))
    assert r.exit_code == 0, r.output
    assert "online-key.pem" in r.output.replace("\n", "")
    for pem in (ks_dir / "keys").glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600, pem
    assert stat.S_IMODE((ks_dir / "online-key.pem").stat().st_mode) == 0o600
    r = run(url, token, "release", "keys", "list", "--keystore", str(ks_dir))
    assert r.exit_code == 0 and "face-model" in r.output and "root version 1" in r.output
    # this server is already set up from another keystore: refused in plain words
    r = run(url, token, "release", "init-server", "--keystore", str(ks_dir))
    assert r.exit_code == EXIT_USAGE and "already initialised" in r.output
    dist = rel.write_agent_dist(tmp_path / "dist", "2.0.0")
    bundle = tmp_path / "bundle"
    r = run(url, token, "release", "build", "--dist", str(dist), "--out", str(bundle), "--profiles", "generic")
    assert r.exit_code == 0 and "agent 2.0.0" in r.output, r.output
    r = run(url, token, "release", "publish", str(bundle))
    assert r.exit_code == EXIT_USAGE and "not signed yet" in r.output
    r = run(url, token, "release", "sign", str(bundle), "--keystore", str(repo.keystore.folder))
    assert r.exit_code == 0 and "agent/1/kiosk_fleet_agent-2.0.0-py3-none-any.whl" in r.output, r.output
    r = run(url, token, "release", "publish", str(bundle))
    assert r.exit_code == 0 and "published agent release agent/1/" in r.output, r.output
    r = run(url, token, "release", "list")
    assert r.exit_code == 0 and "2.0.0" in r.output and "generic" in r.output
    r = run(url, token, "release", "trust")
    assert r.exit_code == 0 and "timestamp" in r.output and "online key" in r.output
    rec = st.server.releases.get("agent/1/kiosk_fleet_agent-2.0.0-py3-none-any.whl")
    assert rec is not None and rec.counter == 1 and rec.profiles == ("generic",) and rec.kind == "agent"
    assert st.server.auth.audit_log(action="release.publish")[0]["actor"] == "admin"
    # the files are on the server now: a second upload sends nothing
    signed = SignedRelease.from_doc(json.loads((bundle / bundles.SIGNED_FILE).read_text()))
    assert repo.rc.upload_missing({d: bundle / "files" / n for d, n in signed.files.items()}) == []


def test_agent_release_signs_a_rollback_twin_of_the_one_it_replaces(repo: Repo) -> None:
    svc = repo.stack.server.releases
    first = agent(repo, "1.0.0")
    assert first.twin is None and svc.rollback_twin(first.path) is None
    second = agent(repo, "1.1.0")
    assert second.counter == 2 and second.twin == "agent/3/kiosk_fleet_agent-1.0.0-py3-none-any.whl"
    assert svc.rollback_twin(second.path) == second.twin
    twin = svc.get(second.twin)
    assert twin is not None and twin.version == "1.0.0" and twin.counter == 3
    assert twin.restores == first.path and twin.rolls_back == second.path
    assert "rollback of agent 1.1.0" in twin.notes and "to 1.0.0" in twin.notes
    old = svc.get(first.path)
    assert old is not None and twin.sha256 == old.sha256
    # the next release goes above the twin
    third = agent(repo, "1.2.0")
    assert third.counter == 4
    # its twin restores 1.1.0, the release it replaces (not 1.0.0 again through 1.1.0's twin)
    assert third.twin == "agent/5/kiosk_fleet_agent-1.1.0-py3-none-any.whl"
    assert [r.counter for r in svc.list("agent")] == [5, 4, 3, 2, 1]
    c = repo.client()
    c.refresh()
    got = c.fetch(second.twin)
    assert got.info is not None and got.info.counter == 3 and got.sha256 == old.sha256
    r = httpx.get(
        f"{repo.url}/api/v1/releases/{second.path}", headers={"Authorization": f"Bearer {repo.stack.admin_token}"}
    )
    assert r.status_code == 200 and r.json()["rollback_twin"] == second.twin


def test_republish_signs_an_earlier_release_under_a_higher_counter(repo: Repo) -> None:
    first = agent(repo, "1.0.0")
    agent(repo, "1.1.0")  # counters 2 and its twin 3
    r = run(
        repo.url, repo.stack.admin_token, "release", "republish", first.path, "--keystore", str(repo.keystore.folder)
    )
    assert r.exit_code == 0 and "counter 4" in r.output, r.output
    rec = repo.stack.server.releases.get("agent/4/kiosk_fleet_agent-1.0.0-py3-none-any.whl")
    assert rec is not None and rec.version == "1.0.0" and rec.restores == first.path and rec.rolls_back is None
    assert "republished agent 1.0.0" in rec.notes


def test_publish_refusals_say_what_is_wrong_and_change_nothing(repo: Repo, tmp_path: Path) -> None:
    agent(repo, "1.0.0")
    before = timestamp_version(repo)
    dist = rel.write_agent_dist(tmp_path / "dist", "1.1.0")
    bundle = tmp_path / "b"
    bundles.build_agent(dist, bundle, profiles=["*"])
    state = repo.rc.current(repo.keystore)
    signed = sign_bundle(bundle, repo.keystore, state)
    files = {d: bundle / "files" / n for d, n in signed.files.items()}

    # files never uploaded
    with pytest.raises(ReleaseClientError) as err:
        repo.rc.publish(signed)
    assert err.value.status == 422 and "never uploaded" in str(err.value)
    repo.rc.upload_missing(files)

    # signed by a key root does not trust for targets
    assert signed.targets is not None
    forged = SignedRelease.from_doc(signed.to_doc())
    assert forged.targets is not None
    forged.targets.signatures.clear()
    forged.targets.sign(CryptoSigner.generate_ed25519())
    with pytest.raises(ReleaseClientError) as err:
        repo.rc.publish(forged)
    assert err.value.status == 422 and "not signed by enough of the keys trusted for targets" in str(err.value)

    # a counter that does not go up (signed as if nothing had been published)
    state.counters = {"agent": 0, "config": 0, "face_model": 0}
    low = sign_bundle(bundle, repo.keystore, state)
    with pytest.raises(ReleaseClientError) as err:
        repo.rc.publish(low)
    assert err.value.status == 409 and "release counter 1 is not above 1" in str(err.value)

    # the face-model role needs both of its keys
    models = tmp_path / "m"
    models.mkdir()
    (models / "model.onnx").write_bytes(b"m" * 1000)
    fb = tmp_path / "fb"
    bundles.build_face_model(models, fb, version="m1", threshold=0.62, profiles=["*"])
    two = repo.keystore.signers("face-model")
    one_key = sign_bundle(fb, repo.keystore, repo.rc.current(repo.keystore))
    md = one_key.delegated["face-model"]
    md.signatures.clear()
    md.sign(two[0])
    with pytest.raises(ReleaseClientError) as err:
        repo.rc.publish(one_key, fb / "files")
    assert err.value.status == 422 and "face-model" in str(err.value) and "1/2" in str(err.value)

    assert timestamp_version(repo) == before
    # the honest one still goes through, and only once
    repo.rc.publish(signed)
    with pytest.raises(ReleaseClientError) as err:
        repo.rc.publish(signed)
    assert err.value.status == 409 and "the next one is 4" in str(err.value)


def test_only_admins_publish_and_without_the_online_key_the_server_says_so(repo: Repo, tmp_path: Path) -> None:
    st = repo.stack
    token = st.server.auth.create_user("mgr", Role.MANAGER, offices=["haidian"])
    mgr = rel.client(repo.url, token)
    with pytest.raises(ReleaseClientError) as err:
        mgr.counters()
    assert err.value.status == 403
    assert mgr.list() == []  # reading is for every logged-in user
    mgr.http.close()
    st.settings.tuf_paths()[1].unlink()
    with pytest.raises(ReleaseClientError) as err:
        agent(repo, "1.0.0")
    assert err.value.status == 503 and "FLEET_TUF_ONLINE_KEY" in str(err.value)


def test_tuf_routes_serve_ranges_without_login_and_nothing_else_does(repo: Repo) -> None:
    pub = agent(repo, "1.0.0", size=10_000)
    rec = repo.stack.server.releases.get(pub.path)
    assert rec is not None
    url = f"{repo.url}/tuf/targets/agent/1/{rec.sha256}.kiosk_fleet_agent-1.0.0-py3-none-any.whl"
    whole = httpx.get(url)
    assert whole.status_code == 200 and len(whole.content) == 10_000
    part = httpx.get(url, headers={"Range": "bytes=9000-"})
    assert part.status_code == 206 and part.headers["content-range"] == "bytes 9000-9999/10000"
    assert part.content == whole.content[9000:]
    assert httpx.get(url, headers={"Range": "bytes=20000-"}).status_code == 416
    assert httpx.get(f"{repo.url}/tuf/metadata/1.root.json").status_code == 200
    assert httpx.get(f"{repo.url}/tuf/metadata/timestamp.json").headers["cache-control"] == "no-cache"
    assert httpx.get(f"{repo.url}/tuf/metadata/..%2Ffleet.db").status_code == 404
    assert httpx.get(f"{repo.url}/tuf/targets/agent/1/kiosk_fleet_agent-1.0.0-py3-none-any.whl").status_code == 404
    assert httpx.get(f"{repo.url}/api/v1/releases").status_code == 401
    assert httpx.get(f"{repo.url}/api/v1/releases/trust").status_code == 401


def test_resign_job_keeps_the_timestamp_fresh_and_the_metric_reports_expiry(repo: Repo) -> None:
    fleet = repo.stack.server
    tuf = fleet.releases.repo
    v0 = timestamp_version(repo)
    job = fleet.scheduler.get_job("tuf-resign")
    assert job is not None
    job.func()
    assert timestamp_version(repo) == v0  # a fresh timestamp is left alone
    later = now_utc() + timedelta(hours=13)
    tuf.clock = lambda: later  # the server's clock, half a day on
    job.func()
    ts = tuf.timestamp().signed
    assert ts.version == v0 + 1 and ts.expires == later + timedelta(days=1)
    tuf.clock = lambda: later + timedelta(days=4)  # snapshot past half its week
    job.func()
    assert tuf.snapshot().signed.expires == later + timedelta(days=11)
    text = generate_latest(fleet.metrics_registry).decode()
    assert 'fleet_tuf_resigned_total{role="timestamp"} 2.0' in text
    lines = {
        ln.split(" ")[0]: float(ln.split(" ")[1])
        for ln in text.splitlines()
        if ln.startswith("fleet_tuf_metadata_expires_seconds{")
    }
    assert set(lines) == {
        f'fleet_tuf_metadata_expires_seconds{{role="{r}"}}'
        for r in ("root", "targets", "face-model", "snapshot", "timestamp")
    }
    assert lines['fleet_tuf_metadata_expires_seconds{role="timestamp"}'] == 86400.0
    doc = fleet.releases.trust()
    assert doc["initialised"] and doc["roles"][0]["role"] == "timestamp"
    c = repo.client()
    c.refresh()
    assert c.expires() <= fleet.releases.expiries()["timestamp"]


def test_config_release_carries_whole_number_settings_only(repo: Repo, tmp_path: Path) -> None:
    pub = rel.publish_config(
        repo.rc, repo.keystore, {"heartbeat_interval_s": 30.0, "log_level": "INFO"}, "c1", tmp_path
    )
    assert pub.path == "config/1/settings-c1.json"
    c = repo.client()
    c.refresh()
    info = c.release(pub.path)
    assert info.kind == "config" and info.settings == {"heartbeat_interval_s": 30, "log_level": "INFO"}
    (tmp_path / "bad.yaml").write_text("face_threshold: 0.62\n")
    with pytest.raises(bundles.BundleError) as err:
        bundles.build_config(tmp_path / "bad.yaml", tmp_path / "bad", version="c2", profiles=["*"])
    assert "face_threshold" in str(err.value) and "milli" in str(err.value)
    assert [r.kind for r in repo.stack.server.releases.list("config")] == ["config"]


def test_keystore_holder_re_signs_targets_face_model_and_root_before_they_expire(repo: Repo) -> None:
    pub = agent(repo, "1.0.0")
    tuf = repo.stack.server.releases.repo
    before = tuf.expiries()
    versions = tuf.role_versions()
    ks = str(repo.keystore.folder)
    for role in ("targets", "face-model", "root"):
        r = run(repo.url, repo.stack.admin_token, "release", "resign", "--keystore", ks, "--role", role)
        assert r.exit_code == 0, r.output
    after = tuf.role_versions()
    assert after["targets"] == versions["targets"] + 1 and after["face-model"] == versions["face-model"] + 1
    assert tuf.root().signed.version == 2
    assert all(tuf.expiries()[r] >= before[r] for r in ("targets", "face-model", "root"))
    c = repo.client()
    c.refresh()
    assert c.release(pub.path).version == "1.0.0"


def test_releases_the_database_missed_are_recorded_again_at_start(repo: Repo) -> None:
    """A crash between the repository's commit and the database row: the next start lists it."""
    pub = agent(repo, "1.0.0")
    fleet = repo.stack.server
    with connect(fleet.settings.db_path) as conn:
        conn.execute("DELETE FROM releases")
    assert fleet.releases.get(pub.path) is None
    again = ReleaseService(fleet.releases.repo, fleet.settings.db_path, CollectorRegistry())
    try:
        rec = again.get(pub.path)
        assert rec is not None and rec.counter == 1 and rec.version == "1.0.0"
    finally:
        again.close()


def test_malformed_metadata_is_refused_with_the_field_named(repo: Repo) -> None:
    h = {"Authorization": f"Bearer {repo.stack.admin_token}"}
    r = httpx.post(f"{repo.url}/api/v1/releases/publish", json={"targets": {"signed": {"_type": "targets"}}}, headers=h)
    assert r.status_code == 422 and "missing field" in r.json()["detail"]
    r = httpx.post(f"{repo.url}/api/v1/releases/publish", json={"delegated": {"nope": {}}}, headers=h)
    assert r.status_code == 422 and "delegates no role 'nope'" in r.json()["detail"]
    r = httpx.put(f"{repo.url}/api/v1/releases/files/{'0' * 64}", content=b"abc", headers=h)
    assert r.status_code == 422 and "upload it again" in r.json()["detail"]
    assert not repo.stack.server.releases.repo.has_blob("0" * 64)
