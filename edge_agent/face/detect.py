"""Find faces and their 5 landmarks (dlib HOG detector + 5-point shape predictor boundary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import dlib
import numpy as np

from edge_agent.face.models import ModelFiles

# The HOG detector's window is 80×80 px: images smaller than this are upscaled first, which is what
# lets a 102×126 ID-card chip photo be found at all.
HOG_WINDOW_PX = 80
MAX_UPSCALE = 3.0


@dataclass(frozen=True, slots=True)
class Detection:
    """One face box in full-frame pixel coordinates, with the detector's confidence."""

    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def width(self) -> int:
        """Box width in pixels."""
        return self.right - self.left


@dataclass(frozen=True, slots=True)
class Landmarks:
    """The 5 landmarks (two corners of each eye, base of the nose) as a 5×2 float array."""

    points: np.ndarray
    native: Any  # dlib.full_object_detection, needed again to cut the aligned chip


class FaceDetector:
    """HOG face detector and 5-point landmark model, loaded once."""

    def __init__(self, files: ModelFiles) -> None:
        self._hog = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(files.shape_5))

    def detect(self, rgb: np.ndarray, max_side: int, *, adjust_threshold: float = 0.0) -> list[Detection]:
        """Detect faces on a copy scaled so its longest side is `max_side`; best score first."""
        h, w = rgb.shape[:2]
        scale = max_side / max(h, w)
        scale = min(scale, MAX_UPSCALE)
        if abs(scale - 1.0) > 0.05:
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            work = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
        else:
            scale, work = 1.0, rgb
        rects, scores, _ = self._hog.run(work, 0, adjust_threshold)
        found = [
            Detection(
                round(r.left() / scale),
                round(r.top() / scale),
                round(r.right() / scale),
                round(r.bottom() / scale),
                float(s),
            )
            for r, s in zip(rects, scores, strict=True)
        ]
        return sorted(found, key=lambda d: d.score, reverse=True)

    def landmarks(self, rgb: np.ndarray, face: Detection) -> Landmarks:
        """Fit the 5-point shape model inside a face box."""
        shape = self._shape(rgb, dlib.rectangle(face.left, face.top, face.right, face.bottom))
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return Landmarks(points=points, native=shape)
