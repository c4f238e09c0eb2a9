"""Face test fixtures: real photos fetched from registry packages, the real models loaded once."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "face-images"
FACE_RECOGNITION_SDIST = "face_recognition==1.3.0"
FR_FILES = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"]
SKIMAGE_WHEEL = "scikit-image==0.24.0"
PIP_TIMEOUT_S = 300


def _pip_download(args: list[str], dest: Path) -> Path:
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
            if name.parent.name == "test_images" and name.name in FR_FILES or name.parts[-1:] == ("LICENSE",) \
                    and len(name.parts) == 2:
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


@pytest.fixture(scope="session")
def photo_dir() -> Path:
    """Directory with the real test photos (fetched on first use; the run FAILS if that fails)."""
    try:
        return ensure_face_images()
    except (RuntimeError, OSError, subprocess.SubprocessError, tarfile.TarError, zipfile.BadZipFile,
            KeyError) as err:
        pytest.fail(
            "could not fetch the face test photos (face_recognition 1.3.0 sdist and the "
            f"scikit-image wheel from the package index; see tests/face/README.md): {err}",
            pytrace=False)


@pytest.fixture(scope="session")
def engine() -> "FaceEngine":
    """The real dlib models, hash-checked and loaded once per session."""
    from edge_agent.face.engine import FaceEngine

    return FaceEngine()


@dataclass(frozen=True)
class Frames:
    """640×480 kiosk-like JPEG frames made from the real photos (bytes, in memory)."""

    obama_enrol: bytes
    obama_live: bytes
    obama_live2: bytes
    biden: bytes
    astronaut: bytes
    obama_id_photo: bytes
    biden_id_photo: bytes
    rgb: dict[str, object]


@pytest.fixture(scope="session")
def frames(photo_dir: Path, engine: "FaceEngine") -> Frames:
    """Kiosk-like frames of three real people, plus ID-card-like chip photos."""
    from tests.face import frames as fr

    photos = {name: fr.load_rgb(photo_dir / f"{name}.{ext}") for name, ext in
              [("obama", "jpg"), ("obama2", "jpg"), ("obama3", "jpg"), ("biden", "jpg"),
               ("astronaut", "png")]}
    boxes = {name: fr.face_box(engine, rgb) for name, rgb in photos.items()}
    kiosk = {name: fr.kiosk_frame(rgb, boxes[name]) for name, rgb in photos.items()}
    return Frames(
        obama_enrol=fr.jpeg(kiosk["obama"]), obama_live=fr.jpeg(kiosk["obama2"]),
        obama_live2=fr.jpeg(kiosk["obama3"]), biden=fr.jpeg(kiosk["biden"]),
        astronaut=fr.jpeg(kiosk["astronaut"]),
        obama_id_photo=fr.jpeg(fr.id_photo(photos["obama2"], boxes["obama2"])),
        biden_id_photo=fr.jpeg(fr.id_photo(photos["biden"], boxes["biden"])),
        rgb={**kiosk, **{f"photo_{k}": v for k, v in photos.items()}, "boxes": boxes},
    )


@pytest.fixture
def face_service(tmp_path: Path, engine: "FaceEngine") -> Iterator["FaceService"]:
    """A fresh service (own key, own gallery dir, own metrics) around the shared engine."""
    from prometheus_client import CollectorRegistry

    from edge_agent.face.config import FaceSettings
    from edge_agent.face.service import FaceService
    from edge_agent.face.templates import TemplateStore

    settings = FaceSettings(key_file=tmp_path / "face" / "template.key",
                            gallery_dir=tmp_path / "face" / "templates")
    events: list[tuple[str, dict[str, object]]] = []
    registry = CollectorRegistry()
    svc = FaceService(settings, engine, TemplateStore(settings.gallery_dir, settings.key_file),  # type: ignore[arg-type]
                      post_event=lambda t, b: events.append((t, b)), registry=registry)
    svc.test_events = events  # type: ignore[attr-defined]
    svc.test_registry = registry  # type: ignore[attr-defined]
    yield svc


if False:  # pragma: no cover - names for type checkers only
    from edge_agent.face.engine import FaceEngine
    from edge_agent.face.service import FaceService
