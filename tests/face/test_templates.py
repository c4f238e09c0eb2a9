"""Templates at rest: ciphertext under a keyed hash, a 0600 key, and erase leaves nothing behind."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from edge_agent.face.errors import TemplateStoreError, UnknownCitizen
from edge_agent.face.service import FaceService
from edge_agent.face.templates import TemplateStore
from tests.face.conftest import Frames

pytestmark = pytest.mark.face
CITIZEN = "110101199001011234"


def all_bytes_under(root: Path) -> bytes:
    """Every byte of every file under `root` (SQLite WAL files included)."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def vector_traces(vec: np.ndarray) -> list[bytes]:
    """Ways a descriptor could leak into a file or a message."""
    raw = vec.astype(np.float32).tobytes()
    traces = [raw[i : i + 16] for i in range(0, len(raw), 64)]
    traces.append(base64.b64encode(raw[:24]))
    traces.append(", ".join(f"{x:.4f}" for x in vec[:3]).encode())
    traces.append(",".join(f"{x:.4f}" for x in vec[:3]).encode())
    return traces


def test_template_file_is_ciphertext_named_by_keyed_hash(face_service: FaceService, frames: Frames) -> None:
    out = face_service.enrol(CITIZEN, frames.obama_enrol)
    tid = out.template_id
    assert tid and len(tid) == 64 and CITIZEN not in tid
    files = list(face_service.store.directory.iterdir())
    assert [f.name for f in files] == [f"{tid}.tpl"]
    blob = files[0].read_bytes()
    vec = face_service.gallery.vector(tid)
    assert vec is not None
    for trace in [CITIZEN.encode(), *vector_traces(vec), b"model_version", b"vector"]:
        assert trace not in blob
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    key_file = face_service.settings.key_file
    assert key_file is not None and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The same file opened with another terminal's key does not decrypt.
    other = TemplateStore(face_service.store.directory, key_file.parent / "other.key")
    with pytest.raises(TemplateStoreError):
        other.load(tid)
    # …and a fresh store with the right key reads it back exactly.
    again = TemplateStore(face_service.store.directory, key_file)
    rec = again.load(tid)
    assert rec.citizen_id == CITIZEN and np.array_equal(rec.vector, vec)


def test_keyed_hash_differs_between_terminals(tmp_path: Path) -> None:
    a = TemplateStore(tmp_path / "a", tmp_path / "a.key")
    b = TemplateStore(tmp_path / "b", tmp_path / "b.key")
    assert a.template_id(CITIZEN) != b.template_id(CITIZEN)
    assert a.template_id(CITIZEN) == TemplateStore(tmp_path / "a", tmp_path / "a.key").template_id(CITIZEN)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    TemplateStore(tmp_path / "t", tmp_path / "k.key")
    os.chmod(tmp_path / "k.key", 0o644)
    with pytest.raises(TemplateStoreError, match="0600"):
        TemplateStore(tmp_path / "t", tmp_path / "k.key")


def test_swapped_template_files_do_not_decrypt(face_service: FaceService, frames: Frames) -> None:
    a = face_service.enrol("citizen-a", frames.obama_enrol).template_id
    b = face_service.enrol("citizen-b", frames.biden).template_id
    d = face_service.store.directory
    blob_a = (d / f"{a}.tpl").read_bytes()
    (d / f"{b}.tpl").write_bytes(blob_a)  # an attacker re-labels A's template as B's
    with pytest.raises(TemplateStoreError):
        face_service.store.load(b)


def test_gallery_survives_restart_and_list_shows_metadata_only(face_service: FaceService, frames: Frames) -> None:
    face_service.enrol(CITIZEN, frames.obama_enrol)
    face_service.enrol("other-1", frames.biden)
    fresh = FaceService(
        face_service.settings,
        face_service.engine,
        TemplateStore(face_service.store.directory, face_service.settings.key_file),
    )  # type: ignore[arg-type]
    assert fresh.load_gallery() == 2
    assert fresh.verify(CITIZEN, frames.obama_live).decision == "match"
    listed = fresh.list_templates()
    assert len(listed) == 2
    text = repr(listed)
    assert CITIZEN not in text and "other-1" not in text
    assert {i.template_id for i in listed} == {
        fresh.store.template_id(CITIZEN),
        fresh.store.template_id("other-1"),
    }


def test_erase_leaves_nothing_behind(face_service: FaceService, frames: Frames, tmp_path: Path) -> None:
    face_service.enrol("keep-me", frames.biden)
    tid = face_service.enrol(CITIZEN, frames.obama_enrol).template_id
    assert tid is not None
    vec = face_service.gallery.vector(tid)
    assert vec is not None
    out = face_service.erase(CITIZEN)
    assert (out.decision, out.template_id) == ("erased", tid)
    assert face_service.gallery.vector(tid) is None and tid not in face_service.gallery
    assert not np.any(np.all(face_service.gallery.raw_matrix() == vec, axis=1))
    assert [i.template_id for i in face_service.list_templates()] == [face_service.store.template_id("keep-me")]
    on_disk = all_bytes_under(tmp_path)
    for trace in [CITIZEN.encode(), tid.encode(), *vector_traces(vec)]:
        assert trace not in on_disk
    assert not list(face_service.store.directory.glob(f"{tid}*"))
    with pytest.raises(UnknownCitizen):
        face_service.verify(CITIZEN, frames.obama_live)
    with pytest.raises(UnknownCitizen):
        face_service.erase(CITIZEN)
    found = face_service.identify(frames.obama_live)
    assert found.decision == "no_match" and tid not in [c.template_id for c in found.candidates]
    # After a restart the citizen is still gone.
    fresh = FaceService(
        face_service.settings,
        face_service.engine,
        TemplateStore(face_service.store.directory, face_service.settings.key_file),
    )  # type: ignore[arg-type]
    assert fresh.load_gallery() == 1


def test_events_carry_only_decision_score_reason_latency_and_model(face_service: FaceService, frames: Frames) -> None:
    face_service.enrol(CITIZEN, frames.obama_enrol)
    face_service.verify(CITIZEN, frames.obama_live)
    face_service.identify(frames.biden)
    face_service.erase(CITIZEN)
    events = face_service.test_events  # type: ignore[attr-defined]
    assert [b["mode"] for _, b in events] == ["enrol", "verify", "identify", "erase"]
    for event_type, body in events:
        assert event_type == "face.decision"
        assert set(body) == {"mode", "decision", "score", "reason", "latency_ms", "model_version"}
        assert CITIZEN not in repr(body)


def test_images_are_never_written_to_disk(face_service: FaceService, frames: Frames, tmp_path: Path) -> None:
    face_service.enrol(CITIZEN, frames.obama_enrol)
    face_service.verify(CITIZEN, frames.obama_live)
    face_service.compare_id_photo(frames.obama_live, frames.obama_id_photo)
    face_service.identify(frames.biden)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    tid = face_service.store.template_id(CITIZEN)
    assert [str(p) for p in written] == ["face/template.key", f"face/templates/{tid}.tpl"]
    on_disk = all_bytes_under(tmp_path)
    for image in (frames.obama_enrol, frames.obama_live, frames.obama_id_photo, frames.biden):
        assert image[200:232] not in on_disk
