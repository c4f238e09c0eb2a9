"""Build kiosk-like test frames from real photos (crop around the face, 640×480, JPEG in memory)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_agent.face.detect import Detection
from edge_agent.face.engine import FaceEngine

FRAME_W, FRAME_H = 640, 480


def load_rgb(path: Path) -> np.ndarray:
    """Read a photo from the test cache as RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def face_box(engine: FaceEngine, rgb: np.ndarray) -> Detection:
    """The best face in a photo, found by the real detector at full size."""
    faces = engine.detector.detect(rgb, max(rgb.shape[:2]))
    assert faces, "test photo has no detectable face"
    return faces[0]


def crop_around(rgb: np.ndarray, box: Detection, face_share: float, out_w: int, out_h: int) -> np.ndarray:
    """Crop so the face is `face_share` of the output width, centred, then resize to out_w×out_h."""
    cx, cy = (box.left + box.right) / 2, (box.top + box.bottom) / 2
    crop_w = box.width / face_share
    crop_h = crop_w * out_h / out_w
    x0, y0 = int(round(cx - crop_w / 2)), int(round(cy - crop_h / 2 + 0.05 * crop_h))
    x1, y1 = int(round(x0 + crop_w)), int(round(y0 + crop_h))
    h, w = rgb.shape[:2]
    # Pad with grey where the crop leaves the photo (like a plain wall behind the kiosk user).
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    crop = src[y0 + pad : y1 + pad, x0 + pad : x1 + pad]
    return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)


def kiosk_frame(rgb: np.ndarray, box: Detection) -> np.ndarray:
    """A 640×480 frame, face ~35% of its width: a kiosk camera at arm's length."""
    return crop_around(rgb, box, 0.35, FRAME_W, FRAME_H)


def id_photo(rgb: np.ndarray, box: Detection) -> np.ndarray:
    """A 102×126 head-and-shoulders photo, the size of the photo in a Chinese ID card's chip."""
    return crop_around(rgb, box, 0.6, 102, 126)


# Quality 75 keeps a 640×480 frame near 40 KB, as a kiosk app would send it.
def jpeg(rgb: np.ndarray, quality: int = 75) -> bytes:
    """Encode as JPEG in memory."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png(rgb: np.ndarray) -> bytes:
    """Encode as PNG in memory."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def blurred(rgb: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Defocus / motion-like blur."""
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def darkened(rgb: np.ndarray, factor: float = 0.25) -> np.ndarray:
    """An unlit hall: scale every pixel down."""
    return (rgb.astype(np.float32) * factor).astype(np.uint8)


def brightened(rgb: np.ndarray, offset: int = 140) -> np.ndarray:
    """Backlight / direct sun: add a constant and clip."""
    return np.clip(rgb.astype(np.int16) + offset, 0, 255).astype(np.uint8)


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two people in one 640×480 frame: the centre halves of two frames next to each other."""
    return np.hstack([a[:, 160:480], b[:, 160:480]])


def cut_at_edge(rgb: np.ndarray) -> np.ndarray:
    """Shift the frame left so about a quarter of the face is beyond the frame's edge."""
    out = np.full_like(rgb, 128)
    shift = 240
    out[:, : FRAME_W - shift] = rgb[:, shift:]
    return out


def far_away(rgb: np.ndarray, scale: float = 0.4) -> np.ndarray:
    """The same scene from further away: shrink it into the middle of a grey frame."""
    small = cv2.resize(rgb, (int(FRAME_W * scale), int(FRAME_H * scale)), interpolation=cv2.INTER_AREA)
    out = np.full_like(rgb, 128)
    y, x = (FRAME_H - small.shape[0]) // 2, (FRAME_W - small.shape[1]) // 2
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out
