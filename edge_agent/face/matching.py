"""Face distance and the match decision (pure)."""

from __future__ import annotations

import numpy as np


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors: dlib's own scale, where 0.6 is its threshold."""
    return float(np.linalg.norm(a.astype(np.float32) - b.astype(np.float32)))


def is_match(dist: float, threshold: float) -> bool:
    """A distance at or below the threshold is the same person."""
    return dist <= threshold
