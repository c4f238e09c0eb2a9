"""Face login on the terminal. Importing this package needs no face library; building it does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_agent.face.config import FaceSettings
from edge_agent.face.errors import FaceError, FaceUnavailable

if TYPE_CHECKING:
    from edge_agent.face.engine import FaceEngine
    from edge_agent.face.service import FaceService

__all__ = ["FaceError", "FaceSettings", "FaceUnavailable", "build_face_service"]


def build_face_service(
    agent: Any, settings: FaceSettings | None = None, *, engine: FaceEngine | None = None
) -> FaceService:
    """Build the face service for an agent: verify models, open the store, load the gallery.

    Raises FaceUnavailable when the face packages are not installed or a model file is wrong.
    """
    try:
        from edge_agent.face.camera import open_frame_source
        from edge_agent.face.engine import FaceEngine
        from edge_agent.face.service import FaceService
        from edge_agent.face.templates import TemplateStore
    except ImportError as err:
        raise FaceUnavailable(f"face packages are not installed ({err.name}); pip install '.[face]'") from err
    cfg = (settings or FaceSettings()).resolved(agent.settings.data_dir)
    if engine is None:
        # a face-model release installed by the updater, checked against its signed hashes
        from edge_agent.update.face_model import model_files
        from edge_agent.update.updater import startup_face_model

        active = startup_face_model(agent.settings.data_dir, agent.settings.install_root)
        if active is not None:
            engine = FaceEngine(model_files(active))
            cfg = cfg.model_copy(update={"model_version": active.version, "threshold": active.threshold})
    assert cfg.gallery_dir is not None and cfg.key_file is not None
    store = TemplateStore(cfg.gallery_dir, cfg.key_file)
    service = FaceService(
        cfg,
        engine or FaceEngine(),
        store,
        post_event=agent.post_event,
        registry=agent.metrics_registry,
        camera=open_frame_source(cfg.camera_source),
    )
    service.load_gallery()
    agent.face_model_version = cfg.model_version  # the updater's gate checks a new model is in use
    return service
