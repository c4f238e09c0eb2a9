"""The face pipeline on one decoded frame: detect → gates → align → embed (models loaded once)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edge_agent.face.detect import FaceDetector
from edge_agent.face.embed import FaceEmbedder
from edge_agent.face.models import ModelFiles, verified_model_files
from edge_agent.face.quality import (
    ChipStats,
    QualityLimits,
    check_chip,
    check_detections,
    check_pose,
    chip_stats,
)
from edge_agent.face.reasons import Reason


@dataclass(frozen=True, slots=True)
class FaceProbe:
    """Result of analysing one frame: a descriptor, or the reason there is none."""

    reason: Reason
    vector: np.ndarray | None = None
    face_px: int | None = None
    stats: ChipStats | None = None

    @property
    def usable(self) -> bool:
        """True when the frame passed every gate and has a descriptor."""
        return self.vector is not None


class FaceEngine:
    """Detector, landmark model and ResNet, checked against pinned hashes and loaded once."""

    def __init__(self, files: ModelFiles | None = None) -> None:
        files = files or verified_model_files()
        self.detector = FaceDetector(files)
        self.embedder = FaceEmbedder(files)
        # dlib's models are not documented as thread-safe, and on 2 cores running two ResNet passes
        # at once only makes both slower: one analysis at a time.
        self._lock = threading.Lock()

    def analyse(self, rgb: np.ndarray, limits: QualityLimits, detect_max_side: int) -> FaceProbe:
        """Run detection, the quality gates and (if they pass) the embedding on one RGB frame."""
        h, w = rgb.shape[:2]
        with self._lock:
            faces = self.detector.detect(rgb, detect_max_side)
            if not faces and max(h, w) > detect_max_side * 1.05:
                # Nothing at the fast scale: look again at full size, so a far-away face is reported
                # as "too small" (come closer) rather than "no face". Costs time only on failure.
                faces = self.detector.detect(rgb, max(h, w))
            reason = check_detections(faces, w, h, limits)
            if reason is not None:
                return FaceProbe(reason, face_px=faces[0].width if faces else None)
            best = faces[0]
            landmarks = self.detector.landmarks(rgb, best)
            reason = check_pose(landmarks.points, limits)
            if reason is not None:
                return FaceProbe(reason, face_px=best.width)
            chip = self.embedder.align(rgb, landmarks)
            stats = chip_stats(chip)
            reason = check_chip(stats, limits)
            if reason is not None:
                return FaceProbe(reason, face_px=best.width, stats=stats)
            return FaceProbe(Reason.OK, self.embedder.embed(chip), best.width, stats)
