"""Decode JPEG/PNG bytes into an RGB pixel array in memory, within size limits (OpenCV boundary)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.face.errors import BadImage
from edge_agent.face.imageheader import probe


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Refuse images above these sizes before decoding them."""

    max_bytes: int
    max_pixels: int
    max_side: int


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode `data` to an H×W×3 RGB uint8 array, or raise BadImage with a reason code."""
    if len(data) > limits.max_bytes:
        raise BadImage(
            "image_too_large",
            f"image is {len(data)} bytes; the limit is {limits.max_bytes}",
            status=413,
        )
    header = probe(data)
    if header.pixels > limits.max_pixels or max(header.width, header.height) > limits.max_side:
        raise BadImage(
            "image_too_large",
            f"image is {header.width}×{header.height} pixels; the limit is "
            f"{limits.max_pixels} pixels and {limits.max_side} per side",
            status=413,
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR drops alpha and expands grey, so every later step sees 3 channels.
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    # EXIF orientation may swap width and height; anything else means the data lied about its size.
    if bgr is None or bgr.ndim != 3 or sorted(bgr.shape[:2]) != sorted((header.height, header.width)):
        raise BadImage("image_corrupt", f"the {header.format.upper()} data could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB array as JPEG bytes in memory (for tests, the simulator and the benchmark)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage("image_corrupt", "could not encode JPEG")
    return buf.tobytes()
