"""Face test fixtures: real photos fetched from registry packages, the real models loaded once."""

from __future__ import annotations

import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.face.photos import ensure_face_images

if TYPE_CHECKING:
    from edge_agent.face.engine import FaceEngine
    from edge_agent.face.service import FaceService


@pytest.fixture(scope="session")
def photo_dir() -> Path:
    """Directory with the real test photos (fetched on first use; the run FAILS if that fails)."""
    try:
        return ensure_face_images()
    except (
        RuntimeError,
        OSError,
        subprocess.SubprocessError,
        tarfile.TarError,
        zipfile.BadZipFile,
        KeyError,
    ) as err:
        pytest.fail(
            "could not fetch the face test photos (face_recognition 1.3.0 sdist and the "
            f"scikit-image wheel from the package index; see tests/face/README.md): {err}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def engine() -> FaceEngine:
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
def frames(photo_dir: Path, engine: FaceEngine) -> Frames:
    """Kiosk-like frames of three real people, plus ID-card-like chip photos."""
    from tests.face import frames as fr

    photos = {
        name: fr.load_rgb(photo_dir / f"{name}.{ext}")
        for name, ext in [
            ("obama", "jpg"),
            ("obama2", "jpg"),
            ("obama3", "jpg"),
            ("biden", "jpg"),
            ("astronaut", "png"),
        ]
    }
    boxes = {name: fr.face_box(engine, rgb) for name, rgb in photos.items()}
    kiosk = {name: fr.kiosk_frame(rgb, boxes[name]) for name, rgb in photos.items()}
    return Frames(
        obama_enrol=fr.jpeg(kiosk["obama"]),
        obama_live=fr.jpeg(kiosk["obama2"]),
        obama_live2=fr.jpeg(kiosk["obama3"]),
        biden=fr.jpeg(kiosk["biden"]),
        astronaut=fr.jpeg(kiosk["astronaut"]),
        obama_id_photo=fr.jpeg(fr.id_photo(photos["obama2"], boxes["obama2"])),
        biden_id_photo=fr.jpeg(fr.id_photo(photos["biden"], boxes["biden"])),
        rgb={**kiosk, **{f"photo_{k}": v for k, v in photos.items()}, "boxes": boxes},
    )


@pytest.fixture
def face_service(tmp_path: Path, engine: FaceEngine) -> Iterator[FaceService]:
    """A fresh service (own key, own gallery dir, own metrics) around the shared engine."""
    from prometheus_client import CollectorRegistry

    from edge_agent.face.config import FaceSettings
    from edge_agent.face.service import FaceService
    from edge_agent.face.templates import TemplateStore

    settings = FaceSettings(key_file=tmp_path / "face" / "template.key", gallery_dir=tmp_path / "face" / "templates")
    events: list[tuple[str, dict[str, object]]] = []
    registry = CollectorRegistry()
    svc = FaceService(
        settings,
        engine,
        TemplateStore(settings.gallery_dir, settings.key_file),  # type: ignore[arg-type]
        post_event=lambda t, b: events.append((t, b)),
        registry=registry,
    )
    svc.test_events = events  # type: ignore[attr-defined]
    svc.test_registry = registry  # type: ignore[attr-defined]
    yield svc
