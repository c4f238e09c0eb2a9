"""Face-model releases end to end: the real dlib model files (from the installed
face_recognition_models package) and golden images made from the real test photos, published as a
signed face-model release; a terminal under its launcher, its release venv built with the `face`
extra, verifies every file, self-tests the model on the golden pairs at the release's threshold,
switches the active model by a restart with a trial and gate, and serves face verify with it. A
threshold the golden pairs fail is refused with self_test_failed; a tampered file is refused by
TUF; a terminal without the face packages refuses with a plain self_test_failed."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_dev import releases
from fleet_dev.proc import wait_for
from tests.update_util import Rig, rig_fixture

pytestmark = [pytest.mark.face, pytest.mark.timeout(900)]

PACKAGED_VERSION = "dlib-resnet-v1-5pt"
GOLDEN_PAIRS = [
    {"enrol": "golden-obama.jpg", "probe": "golden-obama2.jpg", "match": True},
    {"enrol": "golden-obama.jpg", "probe": "golden-biden.jpg", "match": False},
]


@pytest.fixture(scope="module")
def face_dist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The dist with the agent's `face` extra locked too (what `./run.sh dist --face` writes)."""
    from fleet_dev.dist import build

    built = build(tmp_path_factory.mktemp("dist-face"), face=True)
    face_lock = next(built.agent_wheel.parent.glob("*-face.lock"))
    return dataclasses.replace(built, agent_lock=face_lock), built


@pytest.fixture(scope="module")
def golden() -> dict[str, bytes]:
    """Kiosk-like JPEG frames of two real people, the golden images of the releases."""
    from edge_agent.face.engine import FaceEngine
    from tests.face import frames as fr
    from tests.face.photos import ensure_face_images

    photo_dir = ensure_face_images()
    engine = FaceEngine()
    out = {}
    for name in ("obama", "obama2", "biden"):
        rgb = fr.load_rgb(photo_dir / f"{name}.jpg")
        out[f"golden-{name}.jpg"] = fr.jpeg(fr.kiosk_frame(rgb, fr.face_box(engine, rgb)))
    return out


@pytest.fixture(scope="module")
def face_locked(face_dist: Any) -> Any:
    """The dist the terminals install from: its lock is the face one."""
    return face_dist[0]


rig = rig_fixture("update-face", {"f-1": "generic", "f-2": "generic"}, built="face_locked")


def _model_dir(rig: Rig, golden: dict[str, bytes], name: str) -> Path:
    """A release folder: the packaged dlib files, the golden images and golden.json."""
    from edge_agent.face.models import RESNET_FILE, SHAPE_5_FILE, models_dir

    folder = rig.work / "models" / name
    folder.mkdir(parents=True)
    for f in (RESNET_FILE, SHAPE_5_FILE):
        shutil.copyfile(models_dir() / f, folder / f)
    for f, data in golden.items():
        (folder / f).write_bytes(data)
    # the release name makes golden.json (and its blob on the server) unique to this release
    (folder / "golden.json").write_text(json.dumps({"release": name, "pairs": GOLDEN_PAIRS}), "utf-8")
    return folder


def _publish(rig: Rig, golden: dict[str, bytes], version: str, threshold: float) -> Any:
    folder = _model_dir(rig, golden, version)
    return releases.publish_face_model(rig.rc, rig.keystore, folder, threshold, version, rig.work / "bundles")


def _api(t: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"http://127.0.0.1:{t.settings['api_port']}{path}", json=body, timeout=60)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    doc: dict[str, Any] = r.json()
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decision_versions(rig: Rig, tid: str) -> list[str]:
    with rig._db() as conn:
        rows = conn.execute(
            "SELECT body FROM events WHERE terminal=? AND type='face.decision' ORDER BY seq", (tid,)
        ).fetchall()
    return [json.loads(r[0])["model_version"] for r in rows]


def test_good_model_commits_serves_verify_and_rolls_back_on_gate_failure(rig: Rig, golden: dict[str, bytes]) -> None:
    t = rig.terminal("f-1")
    t.start()
    rig.wait_version("f-1", "1.0.0")
    t.wait_api()
    wait_for(lambda: _face_status(t) is not None, 120, what="face login ready on the terminal")
    assert _face_status(t)["model_version"] == PACKAGED_VERSION

    pub = _publish(rig, golden, "fm-2", 0.6)
    cmd = rig.desire("f-1", pub, version="fm-2", kind="face_model", gate_s=3.0)
    rig.wait_state("f-1", cmd, "committed")
    assert rig.states("f-1", cmd) == ["notified", "downloading", "downloaded", "installing", "on_trial", "committed"]
    assert t.update_state()["committed"]["face_model"]["version"] == "fm-2"
    active = json.loads((t.data_dir / "models" / "active.json").read_text("utf-8"))
    assert active["version"] == "fm-2" and active["threshold_milli"] == 600
    assert sorted(active["sha256"]) == sorted([*golden, "golden.json", *_dlib_names()])

    t.wait_api()
    wait_for(lambda: (_face_status(t) or {}).get("model_version") == "fm-2", 120, what="face service on fm-2")
    _api(t, "/v1/face/enrol", {"citizen_id": "c1", "image": _b64(golden["golden-obama.jpg"])})
    verdict = _api(t, "/v1/face/verify", {"citizen_id": "c1", "image": _b64(golden["golden-obama2.jpg"])})
    assert verdict["model_version"] == "fm-2" and verdict["decision"] == "match" and verdict["threshold"] == 0.6
    wait_for(lambda: "fm-2" in _decision_versions(rig, "f-1"), 60, what="face.decision with the new model")

    # a threshold at which the same person no longer matches: refused by the self-test, nothing changes
    strict = _publish(rig, golden, "fm-3", 0.05)
    refused = rig.desire("f-1", strict, version="fm-3", kind="face_model")
    rig.wait_state("f-1", refused, "rejected")
    last = rig.reports("f-1", refused)[-1]
    assert last["reason"] == "self_test_failed" and "golden-obama2.jpg" in last["detail"]
    assert "on_trial" not in rig.states("f-1", refused)
    assert t.update_state()["committed"]["face_model"]["version"] == "fm-2"
    assert not (t.data_dir / "models" / "trial.json").exists()
    assert json.loads((t.data_dir / "models" / "active.json").read_text("utf-8"))["version"] == "fm-2"
    assert _face_status(t)["model_version"] == "fm-2"
    assert not list((t.data_dir / "models").glob("fm-3-*"))  # its staged files are gone

    # one file of the release changed on the server's disk after signing: TUF refuses it
    bad = _publish(rig, golden, "fm-4", 0.6)
    _tamper(rig, rig.work / "models" / "fm-4" / "golden.json")
    tampered = rig.desire("f-1", bad, version="fm-4", kind="face_model")
    rig.wait_state("f-1", tampered, "rejected")
    assert rig.reports("f-1", tampered)[-1]["reason"] == "tampered"
    assert t.update_state()["committed"]["face_model"]["version"] == "fm-2"
    assert not (t.data_dir / "models" / "trial.json").exists()

    # face login switched off on the terminal: the self-test passes (the packages are there), the
    # new process never loads the model, the gate fails and fm-2 stays the active model
    t.stop()
    t.write_config(face={"enabled": False})
    t.start()
    t.wait_api()
    off = _publish(rig, golden, "fm-6", 0.6)
    gated = rig.desire("f-1", off, version="fm-6", kind="face_model", gate_s=3.0)
    rig.wait_state("f-1", gated, "rolled_back")
    last = rig.reports("f-1", gated)[-1]
    assert last["reason"] == "gate_failed" and "fm-6" in last["detail"]
    assert "on_trial" in rig.states("f-1", gated)
    assert t.update_state()["committed"]["face_model"]["version"] == "fm-2"
    assert json.loads((t.data_dir / "models" / "active.json").read_text("utf-8"))["version"] == "fm-2"
    assert not (t.data_dir / "models" / "trial.json").exists()
    t.stop()
    t.write_config(face={"enabled": True})
    t.start()
    wait_for(lambda: (_face_status(t) or {}).get("model_version") == "fm-2", 120, what="back on fm-2")


def test_terminal_without_face_packages_refuses_plainly(rig: Rig, golden: dict[str, bytes], face_dist: Any) -> None:
    """Runs after the test above (the rig's dist is swapped for the plain one here)."""
    rig.dist = face_dist[1]  # the plain lock: this terminal's venv has no face extra
    t = rig.terminal("f-2")
    t.start()
    rig.wait_version("f-2", "1.0.0")
    pub = _publish(rig, golden, "fm-5", 0.6)
    cmd = rig.desire("f-2", pub, version="fm-5", kind="face_model")
    rig.wait_state("f-2", cmd, "rejected")
    last = rig.reports("f-2", cmd)[-1]
    assert last["reason"] == "self_test_failed"
    assert "face matching is not installed on this terminal" in last["detail"]
    assert not (t.data_dir / "models" / "active.json").exists()
    rig.wait_version("f-2", "1.0.0")  # still running, still heard
    assert t.proc is not None and t.proc.poll() is None


def _dlib_names() -> list[str]:
    from edge_agent.face.models import RESNET_FILE, SHAPE_5_FILE

    return [RESNET_FILE, SHAPE_5_FILE]


def _face_status(t: Any) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{t.settings['api_port']}/v1/face/status", timeout=10)
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    doc: dict[str, Any] = r.json()
    return doc


def _tamper(rig: Rig, file: Path) -> None:
    """Flip a byte of a published file on the server's disk (same length, wrong hash)."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    blob = rig.stack.settings.tuf_paths()[0] / "blobs" / digest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
