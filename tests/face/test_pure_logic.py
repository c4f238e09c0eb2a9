"""Pure parts: pose from landmarks, the 1:N index, reason messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.face.detect import Detection
from edge_agent.face.gallery import Gallery
from edge_agent.face.quality import QualityLimits, check_detections, check_pose, estimate_pose
from edge_agent.face.reasons import MESSAGES, Reason, message

pytestmark = pytest.mark.face

# Measured on obama.jpg: dlib's 5 points (eye corners 0-1, 2-3; nose base 4).
FRONTAL = np.array([(570, 216), (528, 215), (424, 216), (463, 216), (493, 294)], dtype=np.float32)


def test_frontal_face_passes_pose_and_turned_or_tilted_face_does_not() -> None:
    limits = QualityLimits()
    assert check_pose(FRONTAL, limits) is None
    assert estimate_pose(FRONTAL).yaw_ratio < 0.1
    turned = FRONTAL.copy()
    turned[4, 0] += 0.5 * (FRONTAL[0, 0] - FRONTAL[2, 0])  # nose far off the eyes' midline
    assert check_pose(turned, limits) == Reason.TURNED_AWAY
    angle = np.radians(40)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    tilted = (FRONTAL - FRONTAL.mean(axis=0)) @ rot.T + FRONTAL.mean(axis=0)
    assert check_pose(tilted, limits) == Reason.TURNED_AWAY


def test_weak_small_second_detection_is_not_several_faces() -> None:
    limits = QualityLimits()
    best = Detection(100, 100, 300, 300, 1.8)
    assert check_detections([best, Detection(500, 10, 560, 70, -0.4)], 640, 480, limits) is None
    assert check_detections([best, Detection(350, 100, 520, 270, 0.2)], 640, 480, limits) == Reason.SEVERAL_FACES
    assert check_detections([], 640, 480, limits) == Reason.NO_FACE
    assert check_detections([Detection(-80, 100, 120, 300, 1.0)], 640, 480, limits) == Reason.FACE_CUT_OFF
    assert check_detections([Detection(10, 10, 90, 90, 1.0)], 640, 480, limits) == Reason.FACE_TOO_SMALL


def test_every_reason_has_both_messages() -> None:
    for reason in Reason:
        zh, en = MESSAGES[reason]
        assert zh and en
    assert message("id_photo_no_face")["zh"].startswith("证件照片")
    assert message("something_new")["en"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    drop=st.lists(st.integers(0, 59), max_size=10),
)
def test_gallery_search_equals_brute_force_after_any_removals(n: int, k: int, seed: int, drop: list[int]) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0, 0.1, (n, 128)).astype(np.float32)
    gallery = Gallery()
    for i, v in enumerate(vectors):
        gallery.upsert(f"t{i}", v, f"c{i}")
    alive = set(range(n))
    for i in drop:
        if i < n:
            gallery.remove(f"t{i}")
            alive.discard(i)
    query = rng.normal(0, 0.1, 128).astype(np.float32)
    got = gallery.search(query, k)
    want = sorted((float(np.linalg.norm(vectors[i] - query)), f"t{i}") for i in alive)[:k]
    assert [c.key for c in got] == [key for _, key in want]
    assert [c.distance for c in got] == pytest.approx([d for d, _ in want], abs=1e-4)
    assert len(gallery) == len(alive)


def test_removed_vector_leaves_no_copy_in_the_index_memory() -> None:
    gallery = Gallery()
    a, b = np.full(128, 0.25, np.float32), np.full(128, -0.5, np.float32)
    gallery.upsert("a", a, "citizen-a")
    gallery.upsert("b", b, "citizen-b")
    assert gallery.remove("a")
    raw = gallery.raw_matrix()
    assert not np.any(np.all(raw == a, axis=1))
    assert "a" not in gallery and gallery.vector("b") is not None
    assert [c.label for c in gallery.search(a, 5)] == ["citizen-b"]
