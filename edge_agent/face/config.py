"""Face settings: the `face:` section of agent.yaml, or EDGE_FACE_* variables; read once at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# dlib's documented threshold for its ResNet model (Euclidean distance, LFW-tuned).
DLIB_DEFAULT_THRESHOLD = 0.6
# A stricter setting for 1:N, where every extra template is one more chance of a false match.
DLIB_STRICT_THRESHOLD = 0.55
# JSON around the base64 images of a face request (field names, citizen id, top_k).
_REQUEST_OVERHEAD_BYTES = 16 * 1024


class FaceSettings(BaseSettings):
    """Everything the face pipeline reads from configuration."""

    model_config = SettingsConfigDict(env_prefix="EDGE_FACE_", extra="forbid")

    enabled: bool = True
    # Shipped as a release together with the threshold; goes into every face.decision event.
    model_version: str = Field(default="dlib-resnet-v1-5pt", min_length=1, max_length=64)
    threshold: float = Field(default=DLIB_DEFAULT_THRESHOLD, gt=0.0, le=2.0)
    identify_threshold: float = Field(default=DLIB_STRICT_THRESHOLD, gt=0.0, le=2.0)
    # Empty: derived from the agent's data_dir (<data_dir>/face/…).
    key_file: Path | None = None
    gallery_dir: Path | None = None
    # A camera index ("0"), a device or stream URL, an image file, a directory of images, a video.
    camera_source: str = ""
    camera_frames: int = Field(default=5, ge=1, le=30)
    max_image_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=16_000_000, ge=10_000)
    max_image_side: int = Field(default=8192, ge=64)
    # HOG runs on a frame downscaled to this longest side: ~6 ms at 320×240 vs ~20 ms at 640×480.
    detect_max_side: int = Field(default=320, ge=80, le=4096)
    min_face_px: int = Field(default=100, ge=20)
    # Variance of the Laplacian on the aligned chip: sharp 640×480 frames measured 130–880, the same
    # frames under a 3 px Gaussian blur 7–34 (JPEG blocking adds a few points).
    min_sharpness: float = Field(default=40.0, ge=0.0)
    min_brightness: float = Field(default=50.0, ge=0.0, le=255.0)
    max_brightness: float = Field(default=210.0, ge=0.0, le=255.0)
    max_yaw_ratio: float = Field(default=0.3, gt=0.0)
    max_roll_deg: float = Field(default=30.0, gt=0.0)
    # A second face counts as "several faces" if it is at least this fraction of the best's width.
    second_face_min_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    top_k: int = Field(default=5, ge=1, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> FaceSettings:
        if self.min_brightness >= self.max_brightness:
            raise ValueError("EDGE_FACE_MIN_BRIGHTNESS must be below EDGE_FACE_MAX_BRIGHTNESS")
        return self

    @property
    def max_request_bytes(self) -> int:
        """The local API's body limit for face routes: two images in base64 (compare-id) and the JSON around them."""
        return 2 * 4 * -(-self.max_image_bytes // 3) + _REQUEST_OVERHEAD_BYTES

    def resolved(self, data_dir: Path) -> FaceSettings:
        """Return a copy with the key file and gallery dir filled in under `data_dir`."""
        face_dir = Path(data_dir) / "face"
        return self.model_copy(
            update={
                "key_file": self.key_file or face_dir / "template.key",
                "gallery_dir": self.gallery_dir or face_dir / "templates",
            }
        )
