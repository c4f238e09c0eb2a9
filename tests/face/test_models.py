"""Model files: found through find_spec, refused when their SHA-256 is not the pinned one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.face.errors import ModelIntegrityError
from edge_agent.face.models import PINNED_SHA256, SHAPE_5_FILE, models_dir, verified_model_files

pytestmark = pytest.mark.face


def test_installed_model_files_match_the_pinned_hashes() -> None:
    files = verified_model_files()
    assert files.shape_5.name == "shape_predictor_5_face_landmarks.dat"
    assert files.resnet.parent == models_dir()


def test_a_tampered_or_missing_model_file_is_refused(tmp_path: Path) -> None:
    src = models_dir()
    for name in PINNED_SHA256:
        shutil.copyfile(src / name, tmp_path / name)
    verified_model_files(tmp_path)  # an exact copy is fine
    with open(tmp_path / SHAPE_5_FILE, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        verified_model_files(tmp_path)
    (tmp_path / SHAPE_5_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        verified_model_files(tmp_path)
