"""Frame sources: a camera (OpenCV VideoCapture), or image files / a directory / a video for tests
and the simulator. Frames stay in memory; nothing is written."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from edge_agent.face.errors import FaceUnavailable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class FrameSource(Protocol):
    """Something that yields the latest RGB frames."""

    def read(self, n: int) -> list[np.ndarray]:
        """Return up to `n` consecutive frames, newest last."""
        ...

    def close(self) -> None:
        """Release the device or files."""
        ...


class ImageFiles:
    """Cycles through image files (one file or a sorted directory), as a simulated camera."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise FaceUnavailable("camera source has no JPEG/PNG images")
        self._paths = paths
        self._next = 0
        self._lock = threading.Lock()

    def read(self, n: int) -> list[np.ndarray]:
        """Return the next `n` images (wrapping around)."""
        frames = []
        with self._lock:
            for _ in range(n):
                bgr = cv2.imread(str(self._paths[self._next % len(self._paths)]), cv2.IMREAD_COLOR)
                self._next += 1
                if bgr is not None:
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return frames

    def close(self) -> None:
        """Nothing to release."""


class VideoSource:
    """A camera index, device path, stream URL or video file through OpenCV's VideoCapture."""

    def __init__(self, spec: int | str, *, loop: bool = False) -> None:
        self._cap = cv2.VideoCapture(spec)
        if not self._cap.isOpened():
            raise FaceUnavailable(f"camera source {spec!r} cannot be opened")
        self._loop = loop
        self._lock = threading.Lock()

    def read(self, n: int) -> list[np.ndarray]:
        """Grab `n` consecutive frames; a video file restarts at its end."""
        frames = []
        with self._lock:
            for _ in range(n):
                ok, bgr = self._cap.read()
                if not ok and self._loop:
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, bgr = self._cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return frames

    def close(self) -> None:
        """Release the capture device."""
        self._cap.release()


def open_frame_source(spec: str) -> FrameSource | None:
    """Open the camera source named in configuration ("" means none configured)."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.isdigit():
        return VideoSource(int(spec))
    path = Path(spec)
    if path.is_dir():
        return ImageFiles(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFiles([path])
    return VideoSource(spec, loop=path.is_file())
