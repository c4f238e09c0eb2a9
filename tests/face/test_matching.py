"""Real model on real photos: same person matches, others do not, degraded frames are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.face.service import FaceService
from tests.face import frames as fr
from tests.face.conftest import Frames

pytestmark = pytest.mark.face


def test_same_person_matches_at_the_configured_threshold(face_service: FaceService, frames: Frames) -> None:
    enrolled = face_service.enrol("110101199001011234", frames.obama_enrol)
    assert (enrolled.decision, enrolled.reason) == ("enrolled", "ok")
    for live in (frames.obama_live, frames.obama_live2):
        out = face_service.verify("110101199001011234", live)
        assert (out.decision, out.reason) == ("match", "ok")
        assert out.score is not None and out.score <= face_service.settings.threshold


def test_different_people_do_not_match(face_service: FaceService, frames: Frames) -> None:
    face_service.enrol("obama", frames.obama_enrol)
    for other in (frames.biden, frames.astronaut):
        out = face_service.verify("obama", other)
        assert (out.decision, out.reason) == ("no_match", "not_same_person")
        assert out.score is not None and out.score > face_service.settings.threshold


def test_stricter_threshold_from_configuration_is_applied(face_service: FaceService, frames: Frames) -> None:
    face_service.enrol("obama", frames.obama_enrol)
    loose = face_service.verify("obama", frames.obama_live2)
    assert loose.decision == "match" and loose.score is not None
    face_service.settings = face_service.settings.model_copy(update={"threshold": loose.score - 0.01})
    strict = face_service.verify("obama", frames.obama_live2)
    assert strict.decision == "no_match" and strict.threshold == pytest.approx(loose.score - 0.01)


DEGRADED = [
    ("blurred", lambda k: fr.blurred(k["obama2"]), "too_blurred"),
    ("dark", lambda k: fr.darkened(k["obama2"]), "too_dark"),
    ("bright", lambda k: fr.brightened(k["obama2"]), "too_bright"),
    ("two_faces", lambda k: fr.side_by_side(k["obama"], k["biden"]), "several_faces"),
    ("cut_at_edge", lambda k: fr.cut_at_edge(k["obama2"]), "face_cut_off"),
    ("far_away", lambda k: fr.far_away(k["obama2"]), "face_too_small"),
    ("empty_wall", lambda k: np.full((480, 640, 3), 128, np.uint8), "no_face"),
]


@pytest.mark.parametrize(("label", "make", "reason"), DEGRADED, ids=[d[0] for d in DEGRADED])
def test_quality_gate_refuses_degraded_frame_with_its_reason(
    face_service: FaceService, frames: Frames, label: str, make: object, reason: str
) -> None:
    face_service.enrol("obama", frames.obama_enrol)
    image = fr.jpeg(make(frames.rgb))  # type: ignore[operator]
    out = face_service.verify("obama", image)
    assert (out.decision, out.reason, out.score) == ("rejected", reason, None)
    assert out.message["zh"] and out.message["en"]
    # The same degraded frame is not enrolled either.
    assert face_service.enrol("someone-else", image).decision == "rejected"
    assert len(face_service.gallery) == 1


def test_compare_with_id_card_chip_photo(face_service: FaceService, frames: Frames) -> None:
    assert len(frames.obama_id_photo) < 10_000  # chip photos are a few KB
    same = face_service.compare_id_photo(frames.obama_enrol, frames.obama_id_photo)
    assert same.decision == "match", same
    other = face_service.compare_id_photo(frames.obama_enrol, frames.biden_id_photo)
    assert other.decision == "no_match", other
    blank = fr.jpeg(np.full((126, 102, 3), 200, np.uint8))
    refused = face_service.compare_id_photo(frames.obama_enrol, blank)
    assert (refused.decision, refused.reason) == ("rejected", "id_photo_no_face")


def test_identify_returns_top_k_with_the_right_person_first(face_service: FaceService, frames: Frames) -> None:
    face_service.enrol("obama", frames.obama_enrol)
    face_service.enrol("biden", frames.biden)
    face_service.enrol("astronaut", frames.astronaut)
    out = face_service.identify(frames.obama_live, top_k=3)
    assert out.decision == "match"
    assert out.candidates[0].citizen_id == "obama"
    assert len(out.candidates) == 3
    assert out.candidates == sorted(out.candidates, key=lambda c: c.distance)
    assert out.score == pytest.approx(out.candidates[0].distance, abs=1e-3)
    face_service.erase("obama")
    out = face_service.identify(frames.obama_live, top_k=3)
    assert (out.decision, out.reason) == ("no_match", "not_in_gallery")
    assert "obama" not in [c.citizen_id for c in out.candidates]


def test_camera_source_directory_gives_best_of_several_frames(
    tmp_path: Path, face_service: FaceService, frames: Frames
) -> None:
    from edge_agent.face.camera import open_frame_source

    cam_dir = tmp_path / "camera"
    cam_dir.mkdir()
    # A blurred frame, a dark one, then a good one: the good one must decide.
    (cam_dir / "1.jpg").write_bytes(fr.jpeg(fr.blurred(frames.rgb["obama2"])))  # type: ignore[arg-type]
    (cam_dir / "2.jpg").write_bytes(fr.jpeg(fr.darkened(frames.rgb["obama2"])))  # type: ignore[arg-type]
    (cam_dir / "3.jpg").write_bytes(frames.obama_live)
    face_service.enrol("obama", frames.obama_enrol)
    face_service.camera = open_frame_source(str(cam_dir))
    out = face_service.verify_camera("obama", frames=3)
    assert out.decision == "match"
    bad_only = face_service.verify_frames("obama", [fr.blurred(frames.rgb["obama2"])])  # type: ignore[arg-type]
    assert (bad_only.decision, bad_only.reason) == ("rejected", "too_blurred")


def test_metrics_count_outcomes_and_gallery_size(face_service: FaceService, frames: Frames) -> None:
    reg = face_service.test_registry  # type: ignore[attr-defined]
    face_service.enrol("obama", frames.obama_enrol)
    face_service.verify("obama", frames.obama_live)
    face_service.verify("obama", frames.biden)
    face_service.verify("obama", fr.jpeg(fr.darkened(frames.rgb["obama2"])))  # type: ignore[arg-type]

    def count(decision: str, reason: str) -> float | None:
        return reg.get_sample_value(
            "edge_face_decisions_total", {"mode": "verify", "decision": decision, "reason": reason}
        )

    assert count("match", "ok") == 1
    assert count("no_match", "not_same_person") == 1
    assert count("rejected", "too_dark") == 1
    assert reg.get_sample_value("edge_face_gallery_templates") == 1
    assert reg.get_sample_value("edge_face_latency_seconds_count", {"mode": "verify"}) == 3
    assert reg.get_sample_value("edge_face_latency_seconds_sum", {"mode": "verify"}) > 0


def test_video_file_source_loops_and_verifies(tmp_path: Path, face_service: FaceService, frames: Frames) -> None:
    import cv2

    from edge_agent.face.camera import open_frame_source

    video = tmp_path / "kiosk.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (640, 480))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for rgb in (fr.darkened(frames.rgb["obama2"]), frames.rgb["obama2"]):  # type: ignore[arg-type]
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    source = open_frame_source(str(video))
    assert source is not None
    try:
        got = source.read(5)  # two frames in the file: it wraps around
        assert len(got) == 5 and got[0].shape == (480, 640, 3)
        face_service.enrol("obama", frames.obama_enrol)
        assert face_service.verify_frames("obama", got[:2]).decision == "match"
        assert face_service.verify_frames("obama", got[:1]).reason == "too_dark"
    finally:
        source.close()
