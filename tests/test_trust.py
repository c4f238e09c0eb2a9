"""The terminal's TUF client against a real server over HTTP: verified fetches, Range resume, and
each refusal for real with its reason (tampered file, wrong key, expired, rollback, 2-of-2 signed
once), plus a root rotation the client follows."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import Timestamp
from tuf.api.metadata import Metadata

from edge_agent.update import trust as trust_mod
from edge_agent.update.trust import TrustError
from fleet_dev import releases as rel
from fleet_server.releases.keystore import Keystore
from fleet_server.releases.tufmeta import now_utc, to_bytes
from tests.release_util import Repo, agent, fleetctl, running_repo


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    with running_repo(tmp_path) as r:
        yield r


def test_fetch_verifies_an_agent_release_and_its_wheels(repo: Repo) -> None:
    pub = agent(repo, "1.0.0")
    c = repo.client()
    c.refresh()
    info = c.release(pub.path)
    assert info.kind == "agent" and info.version == "1.0.0" and info.counter == pub.counter == 1
    got = c.fetch(pub.path)
    assert got.info == info and got.file.name == "kiosk_fleet_agent-1.0.0-py3-none-any.whl"
    assert hashlib.sha256(got.file.read_bytes()).hexdigest() == got.sha256 and got.file.stat().st_size == got.length
    for w in info.wheels:
        wheel = c.fetch(w.path)
        assert wheel.info is None and wheel.sha256 == w.sha256 and wheel.file.parent.name == "wheels"
    assert c.expires() > now_utc()
    with pytest.raises(TrustError) as err:
        c.release("agent/99/nothing.whl")
    assert err.value.reason == "unknown_target"
    with pytest.raises(TrustError) as err:
        c.release(info.wheels[0].path)
    assert err.value.reason == "not_a_release"


def test_a_verified_file_already_downloaded_is_not_fetched_again(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    pub = agent(repo, "1.0.0")
    c = repo.client()
    c.refresh()
    first = c.fetch(pub.path)
    calls: list[str] = []
    real = trust_mod._RangeFetcher.fetch_from

    def counting(self: Any, url: str, start: int) -> Any:
        calls.append(url)
        return real(self, url, start)

    monkeypatch.setattr(trust_mod._RangeFetcher, "fetch_from", counting)
    again = repo.client()
    again.refresh()
    assert again.fetch(pub.path).file == first.file and calls == []


class CuttingFetcher(trust_mod._RangeFetcher):
    """FAKE: a link that drops after `cut` bytes of a target body (a fault a loopback server
    will not produce on demand)."""

    def __init__(self, cut: int) -> None:
        super().__init__(5.0)
        self.cut = cut
        self.starts: list[int] = []

    def fetch_from(self, url: str, start: int) -> Any:
        self.starts.append(start)
        offset, chunks = super().fetch_from(url, start)

        def cut_short() -> Iterator[bytes]:
            sent = 0
            for chunk in chunks:
                if sent + len(chunk) > self.cut:
                    yield chunk[: self.cut - sent]
                    raise trust_mod.tuf_errors.DownloadError("connection reset (fake)")
                sent += len(chunk)
                yield chunk

        return offset, cut_short()


def test_interrupted_download_resumes_with_a_range_request(repo: Repo) -> None:
    pub = agent(repo, "1.0.0", size=300_000)
    c = repo.client()
    c.refresh()
    cutter = CuttingFetcher(cut=100_000)
    c._fetcher = cutter
    with pytest.raises(TrustError) as err:
        c.fetch(pub.path)
    assert err.value.reason == "download_failed"
    part = c.downloads_dir / (pub.path + ".part")
    assert part.stat().st_size == 100_000 and not (c.downloads_dir / pub.path).exists()
    # a fresh client (the next poll) resumes from byte 100000 through the real server's 206
    seen: list[int] = []
    again = repo.client()
    again.refresh()
    real = again._fetcher.fetch_from

    def record(url: str, start: int) -> Any:
        seen.append(start)
        offset, chunks = real(url, start)
        assert offset == start
        return offset, chunks

    again._fetcher.fetch_from = record  # type: ignore[method-assign]
    got = again.fetch(pub.path)
    assert seen == [100_000] and got.length == 300_000 and not part.exists()
    assert hashlib.sha256(got.file.read_bytes()).hexdigest() == got.sha256


def test_tampered_file_on_the_server_is_refused(repo: Repo) -> None:
    pub = agent(repo, "1.0.0")
    sha = repo.rc.list("agent")[0]["sha256"]
    blob = repo.stack.settings.tuf_paths()[0] / "blobs" / sha
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    with open(blob, "r+b") as f:  # in place: the served target is a hard link to it
        f.write(bytes(data))
    c = repo.client()
    c.refresh()
    with pytest.raises(TrustError) as err:
        c.fetch(pub.path)
    assert err.value.reason == "tampered" and "sha256" in str(err.value)
    assert not (c.downloads_dir / pub.path).exists()


def _timestamp_signed_by(
    repo: Repo, signer: CryptoSigner, *, version_delta: int = 1, expires_in: timedelta = timedelta(days=1)
) -> None:
    tuf_dir = repo.stack.settings.tuf_paths()[0]
    path = tuf_dir / "metadata" / "timestamp.json"
    md: Metadata[Timestamp] = Metadata.from_bytes(path.read_bytes())
    md.signed.version += version_delta
    md.signed.expires = now_utc() + expires_in
    md.signatures.clear()
    md.sign(signer)
    path.write_bytes(to_bytes(md))


def test_metadata_signed_by_a_wrong_key_is_refused(repo: Repo) -> None:
    agent(repo, "1.0.0")
    _timestamp_signed_by(repo, CryptoSigner.generate_ed25519())
    c = repo.client()
    with pytest.raises(TrustError) as err:
        c.refresh()
    assert err.value.reason == "bad_signature"


def test_expired_timestamp_is_refused(repo: Repo) -> None:
    pub = agent(repo, "1.0.0")
    # the online signer re-signs, as the server would with a clock two days back
    repo.stack.server.releases.repo.resign_timestamp(now_utc() - timedelta(days=2))
    c = repo.client()
    with pytest.raises(TrustError) as err:
        c.refresh()
    assert err.value.reason == "expired" and "clock" in str(err.value)
    # the scheduled re-signing brings it back
    assert repo.stack.server.releases.resign_due() == ["timestamp"]
    c = repo.client()
    c.refresh()
    assert c.release(pub.path).counter == 1


def test_older_metadata_after_newer_is_a_rollback(repo: Repo) -> None:
    agent(repo, "1.0.0")
    tuf_dir = repo.stack.settings.tuf_paths()[0]
    old = (tuf_dir / "metadata" / "timestamp.json").read_bytes()
    agent(repo, "1.1.0")
    c = repo.client()
    c.refresh()
    (tuf_dir / "metadata" / "timestamp.json").write_bytes(old)  # a mirror serving yesterday's state
    c = repo.client()
    with pytest.raises(TrustError) as err:
        c.refresh()
    assert err.value.reason == "metadata_rollback"


def test_face_model_role_signed_by_one_of_two_keys_is_refused(repo: Repo) -> None:
    models = repo.work / "model"
    models.mkdir(parents=True)
    (models / "w600k.onnx").write_bytes(b"weights" * 500)
    pub = rel.publish_face_model(repo.rc, repo.keystore, models, 0.62, "m1", repo.work)
    c = repo.client()
    c.refresh()
    info = c.release(pub.path)
    assert info.kind == "face_model" and info.threshold_milli == 620 and info.files == (pub.path,)
    assert c.fetch(pub.path).length == 3500
    # a compromised server (it has the online key) writes face-model v3 signed by one key only
    repo_ = repo.stack.server.releases.repo
    versions = repo_.role_versions()
    md = repo_.targets_role("face-model", versions)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(repo.keystore.signers("face-model")[0])
    (repo_.metadata_dir / f"{md.signed.version}.face-model.json").write_bytes(to_bytes(md))
    versions["face-model"] = md.signed.version
    repo_._write_snapshot(repo_._online_signer(repo_.root().signed), versions, now_utc())
    c = repo.client("t2")
    c.refresh()
    with pytest.raises(TrustError) as err:
        c.release(pub.path)
    assert err.value.reason == "bad_signature"


def test_client_follows_a_root_rotation_and_a_retired_release_key(repo: Repo) -> None:
    first = agent(repo, "1.0.0")
    c = repo.client()
    c.refresh()
    # v2: all root keys replaced (signed by old and new), through fleetctl; v3: a new release
    # key; v4: the old release key retired (targets re-signed with the new one in the same publish)
    r = fleetctl(
        repo.url, repo.stack.admin_token, "release", "keys", "rotate-root", "--keystore", str(repo.keystore.folder)
    )
    assert r.exit_code == 0 and "root version 2" in r.output, r.output
    repo.keystore = Keystore(repo.keystore.folder)
    assert len([e for e in repo.keystore.keys.values() if e.role == "root" and e.retired]) == 2
    old_release = next(e.keyid for e in repo.keystore.keys.values() if e.role == "targets")
    _, md = repo.keystore.add_key("targets")
    repo.rc.publish_root(repo.keystore, md, resign=True)
    _, md = repo.keystore.retire_key(old_release)
    repo.rc.publish_root(repo.keystore, md, resign=True)
    second = agent(repo, "1.1.0")
    # the client still starts from root 1 and follows 2, 3, 4
    again = repo.client()
    again.refresh()
    assert again.release(second.path).version == "1.1.0"
    assert again.release(first.path).version == "1.0.0"
    assert (again.metadata_dir / "root_history" / "4.root.json").is_file()


def test_one_process_at_a_time_uses_a_metadata_folder(repo: Repo) -> None:
    pub = agent(repo, "1.0.0")
    c = repo.client()
    order: list[str] = []
    fd = os.open(c.metadata_dir / trust_mod.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process would hold it

    def poll() -> None:
        c.refresh()
        order.append("refreshed")

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)  # give the poll every chance to get in first if the lock did not hold
    order.append("released")
    os.close(fd)
    t.join(10)
    assert order == ["released", "refreshed"]
    assert c.release(pub.path).counter == 1


def test_the_real_agent_wheel_and_its_locked_wheels_arrive_verified(repo: Repo, dist: Any) -> None:
    """`./run.sh dist` output as the release manager has it: the agent wheel, agent-wheels/, the lock."""
    pub = rel.publish_agent(repo.rc, repo.keystore, dist.agent_wheel.parent, repo.work, profiles=["generic"])
    c = repo.client()
    c.refresh()
    info = c.release(pub.path)
    assert info.fits("generic") and not info.fits("other") and len(info.wheels) >= 5
    got = c.fetch(pub.path)
    assert got.file.read_bytes() == dist.agent_wheel.read_bytes()
    house = c.downloads_dir / "wheels"
    for w in info.wheels:
        c.fetch(w.path)
    lock = dist.agent_lock.read_text()
    assert all(f"sha256:{w.sha256}" in lock for w in info.wheels)
    assert sorted(p.name for p in house.iterdir()) == sorted(w.path.removeprefix("wheels/") for w in info.wheels)


def test_a_download_below_the_minimum_speed_is_given_up_and_resumable(repo: Repo) -> None:
    pub = agent(repo, "1.0.0", size=300_000)
    c = repo.client()
    c.refresh()
    c._fetcher.min_speed, c._fetcher.grace_s = 10**15, 0.0  # no link is this fast: every read is "slow"
    with pytest.raises(TrustError) as err:
        c.fetch(pub.path)
    assert err.value.reason == "download_failed" and "slower than" in str(err.value)
    assert (c.downloads_dir / (pub.path + ".part")).exists()
    c._fetcher.min_speed = trust_mod.MIN_SPEED_BYTES_PER_S
    assert c.fetch(pub.path).length == 300_000
