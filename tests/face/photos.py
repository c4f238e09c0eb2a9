"""Fetch the real test photos from registry packages into .cache/face-images (see README.md).

Shared by the face tests and bench/face.py; imports nothing from pytest.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "face-images"
FACE_RECOGNITION_SDIST = "face_recognition==1.3.0"
FR_FILES = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"]
SKIMAGE_WHEEL = "scikit-image==0.24.0"
PIP_TIMEOUT_S = 300


def _pip_download(args: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    files = list(dest.iterdir())
    if proc.returncode != 0 or not files:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return files[0]


def _fetch_face_recognition(tmp: Path) -> None:
    sdist = _pip_download(["--no-binary", ":all:", FACE_RECOGNITION_SDIST], tmp / "fr")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            is_photo = name.parent.name == "test_images" and name.name in FR_FILES
            is_licence = name.name == "LICENSE" and len(name.parts) == 2  # the top-level LICENSE
            if is_photo or is_licence:
                src = tar.extractfile(member)
                assert src is not None
                target = "face_recognition-LICENSE" if name.name == "LICENSE" else name.name
                (CACHE_DIR / target).write_bytes(src.read())


def _fetch_astronaut(tmp: Path) -> None:
    wheel = _pip_download(["--only-binary", ":all:", SKIMAGE_WHEEL], tmp / "ski")
    with zipfile.ZipFile(wheel) as zf:
        (CACHE_DIR / "astronaut.png").write_bytes(zf.read("skimage/data/astronaut.png"))


def ensure_face_images() -> Path:
    """Fetch the test photos into .cache/face-images once; raise RuntimeError saying why if not."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not all((CACHE_DIR / f).is_file() for f in FR_FILES):
            _fetch_face_recognition(tmp)
        if not (CACHE_DIR / "astronaut.png").is_file():
            _fetch_astronaut(tmp)
    missing = [f for f in [*FR_FILES, "astronaut.png"] if not (CACHE_DIR / f).is_file()]
    if missing:
        raise RuntimeError(f"photos still missing after the fetch: {missing}")
    return CACHE_DIR
