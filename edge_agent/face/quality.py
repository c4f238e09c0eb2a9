"""Quality gates: is this face good enough to compare? Pure numpy, no I/O, no model calls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.face.detect import Detection
from edge_agent.face.reasons import Reason

# A box may overhang the frame a little (dlib pads it); more than this share of its width is a
# face cut by the frame edge, whose landmarks are guesses.
MAX_OVERHANG_RATIO = 0.12
# Brightness and sharpness are measured on the centre of the aligned chip: the face, not the room.
CHIP_CENTRE = slice(37, 113)


@dataclass(frozen=True, slots=True)
class QualityLimits:
    """Thresholds for the gates (from FaceSettings)."""

    min_face_px: int = 100
    min_sharpness: float = 40.0
    min_brightness: float = 50.0
    max_brightness: float = 210.0
    max_yaw_ratio: float = 0.3
    max_roll_deg: float = 30.0
    second_face_min_ratio: float = 0.5
    check_size: bool = True  # off for ID-card chip photos, which are small by design


@dataclass(frozen=True, slots=True)
class Pose:
    """Head pose estimated from 5 landmarks."""

    yaw_ratio: float  # nose offset from the eyes' midpoint along the eye line / eye distance
    roll_deg: float  # angle of the eye line


@dataclass(frozen=True, slots=True)
class ChipStats:
    """Brightness (mean grey 0–255) and sharpness (variance of the Laplacian) of a face chip."""

    brightness: float
    sharpness: float


def check_detections(faces: Sequence[Detection], frame_w: int, frame_h: int, limits: QualityLimits) -> Reason | None:
    """Gate on the set of detections (best first): none, several, cut off, too small."""
    if not faces:
        return Reason.NO_FACE
    best = faces[0]
    # HOG sometimes adds a weak, small second "face" (a pattern on a coat): only a second face of
    # comparable size counts as another person in the frame.
    if any(f.width >= limits.second_face_min_ratio * best.width for f in faces[1:]):
        return Reason.SEVERAL_FACES
    overhang = MAX_OVERHANG_RATIO * best.width
    if (
        best.left < -overhang
        or best.top < -overhang
        or best.right > frame_w + overhang
        or best.bottom > frame_h + overhang
    ):
        return Reason.FACE_CUT_OFF
    if limits.check_size and best.width < limits.min_face_px:
        return Reason.FACE_TOO_SMALL
    return None


def estimate_pose(points: np.ndarray) -> Pose:
    """Estimate yaw and roll from dlib's 5 points (eye corners 0–1 and 2–3, nose base 4)."""
    eye_a = points[0:2].mean(axis=0)
    eye_b = points[2:4].mean(axis=0)
    nose = points[4]
    axis = eye_a - eye_b
    span = float(np.hypot(*axis))
    if span < 1e-6:
        return Pose(yaw_ratio=math.inf, roll_deg=0.0)
    along = float(np.dot(nose - (eye_a + eye_b) / 2, axis / span))
    roll = math.degrees(math.atan2(float(axis[1]), float(axis[0])))
    return Pose(yaw_ratio=abs(along) / span, roll_deg=abs(roll))


def check_pose(points: np.ndarray, limits: QualityLimits) -> Reason | None:
    """Gate on head pose: turned or tilted too far for a reliable comparison."""
    pose = estimate_pose(points)
    if pose.yaw_ratio > limits.max_yaw_ratio or pose.roll_deg > limits.max_roll_deg:
        return Reason.TURNED_AWAY
    return None


def chip_stats(chip: np.ndarray) -> ChipStats:
    """Measure brightness and sharpness on the centre of an aligned RGB chip."""
    rgb = chip[CHIP_CENTRE, CHIP_CENTRE].astype(np.float32)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
    return ChipStats(brightness=float(grey.mean()), sharpness=float(lap.var()))


def check_chip(stats: ChipStats, limits: QualityLimits) -> Reason | None:
    """Gate on light and focus; light first, because a dark face also looks unsharp."""
    if stats.brightness < limits.min_brightness:
        return Reason.TOO_DARK
    if stats.brightness > limits.max_brightness:
        return Reason.TOO_BRIGHT
    if stats.sharpness < limits.min_sharpness:
        return Reason.TOO_BLURRED
    return None
