"""Local face API for the kiosk app: thin HTTP over FaceService (errors translated here, once)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.api.app import error
from edge_agent.face.errors import BadImage, FaceUnavailable, TemplateStoreError, UnknownCitizen
from edge_agent.face.service import CITIZEN_ID_PATTERN, ID_PHOTO_PREFIX, FaceService, Outcome

CitizenId = Field(pattern=CITIZEN_ID_PATTERN, examples=["110101199001011234"])
# Images travel base64-encoded in JSON: one body shape for every route, no multipart dependency.
Image = Field(description="JPEG or PNG, base64", examples=["/9j/4AAQSkZJRgABAQ…"])


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrolIn(_In):
    citizen_id: str = CitizenId
    image: str = Image


class VerifyIn(_In):
    citizen_id: str = CitizenId
    image: str = Image


class VerifyCameraIn(_In):
    citizen_id: str = CitizenId
    frames: int | None = Field(default=None, ge=1, le=30)


class CompareIdIn(_In):
    image: str = Image
    id_photo: str = Field(description="the photo read from the ID card's chip, JPEG or PNG, base64")


class IdentifyIn(_In):
    image: str = Image
    top_k: int | None = Field(default=None, ge=1, le=100)


class EraseIn(_In):
    citizen_id: str = CitizenId


def _bytes(text: str, where: str) -> bytes:
    # Reason codes for the ID photo carry its prefix, as the service's own ones do.
    prefix = ID_PHOTO_PREFIX if where == "id_photo" else ""
    if not text:
        raise BadImage(prefix + "empty_image", f"{where} is empty", where=where)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadImage(prefix + "bad_base64", f"{where} is not valid base64", where=where) from err


def _public(outcome: Outcome) -> dict[str, Any]:
    return {
        "mode": outcome.mode,
        "decision": outcome.decision,
        "reason": outcome.reason,
        "message": outcome.message,
        "score": outcome.score,
        "threshold": outcome.threshold,
        "latency_ms": round(outcome.latency_ms, 1),
        "model_version": outcome.model_version,
        "template_id": outcome.template_id,
        "frames_used": outcome.frames_used,
        "candidates": [
            {"citizen_id": c.citizen_id, "template_id": c.template_id, "distance": c.distance}
            for c in outcome.candidates
        ],
    }


def _answer(call: Callable[[], Outcome]) -> Any:
    try:
        return _public(call())
    except BadImage as err:
        return error(err.status, err.reason, str(err), err.where)
    except UnknownCitizen as err:
        return error(404, err.reason, str(err), "citizen_id")
    except FaceUnavailable as err:
        return error(503, "face_unavailable", str(err))
    except TemplateStoreError as err:
        return error(503, "template_store_unavailable", str(err))


def build_face_router(face_service: FaceService) -> APIRouter:
    """Routes under /v1/face for enrol, verify, compare-with-ID-photo, identify, erase and list."""
    svc = face_service
    router = APIRouter(prefix="/v1/face", tags=["face"])

    @router.post("/enrol")
    def enrol(body: EnrolIn) -> Any:
        """Enrol (or replace) a citizen's face template from a live frame."""
        return _answer(lambda: svc.enrol(body.citizen_id, _bytes(body.image, "image")))

    @router.post("/verify")
    def verify(body: VerifyIn) -> Any:
        """1:1 verify a live frame against the citizen's enrolled template."""
        return _answer(lambda: svc.verify(body.citizen_id, _bytes(body.image, "image")))

    @router.post("/verify/camera")
    def verify_camera(body: VerifyCameraIn) -> Any:
        """1:1 verify the best of the configured camera's last few frames."""
        return _answer(lambda: svc.verify_camera(body.citizen_id, body.frames))

    @router.post("/compare-id")
    def compare_id(body: CompareIdIn) -> Any:
        """1:1 compare a live frame with the ID card's chip photo."""
        return _answer(lambda: svc.compare_id_photo(_bytes(body.image, "image"), _bytes(body.id_photo, "id_photo")))

    @router.post("/identify")
    def identify(body: IdentifyIn) -> Any:
        """1:N identify a live frame in the local gallery (top-k candidates with distances)."""
        return _answer(lambda: svc.identify(_bytes(body.image, "image"), body.top_k))

    @router.post("/erase")
    def erase(body: EraseIn) -> Any:
        """Erase a citizen's template: file, index and metadata."""
        return _answer(lambda: svc.erase(body.citizen_id))

    @router.get("/templates")
    def templates() -> Any:
        """List enrolled templates: metadata only."""
        return {
            "templates": [
                {
                    "template_id": i.template_id,
                    "model_version": i.model_version,
                    "enrolled_at": i.enrolled_at,
                    "size_bytes": i.size_bytes,
                }
                for i in svc.list_templates()
            ],
            "count": len(svc.gallery),
        }

    @router.get("/status")
    def status() -> Any:
        """Model version, thresholds, gallery size."""
        return svc.status()

    return router


__all__ = ["build_face_router"]
