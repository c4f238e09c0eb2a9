"""Face login on the terminal: enrol, verify, compare with the ID-card photo, identify, erase.

Images are decoded in memory and dropped after the call; only the decision, score, reason code,
latency and model version leave this module (as face.decision events).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry

from edge_agent.face.camera import FrameSource
from edge_agent.face.config import FaceSettings
from edge_agent.face.decode import ImageLimits, decode_image
from edge_agent.face.engine import FaceEngine, FaceProbe
from edge_agent.face.errors import BadImage, FaceError, FaceUnavailable, UnknownCitizen
from edge_agent.face.gallery import Gallery
from edge_agent.face.matching import distance, is_match
from edge_agent.face.metrics import FaceMetrics
from edge_agent.face.quality import QualityLimits
from edge_agent.face.reasons import Reason, message
from edge_agent.face.templates import TemplateInfo, TemplateStore

log = logging.getLogger(__name__)

CITIZEN_ID_PATTERN = r"^[0-9A-Za-z_-]{1,64}$"
_CITIZEN_ID_RE = re.compile(CITIZEN_ID_PATTERN)
ID_PHOTO_PREFIX = "id_photo_"
EVENT_TYPE = "face.decision"

Mode = Literal["verify", "compare_id", "identify", "enrol", "erase"]
Decision = Literal["match", "no_match", "rejected", "enrolled", "erased", "error"]
PostEvent = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Match:
    """One 1:N candidate as the kiosk app sees it."""

    citizen_id: str
    template_id: str
    distance: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one face request."""

    mode: Mode
    decision: Decision
    reason: str
    score: float | None  # dlib distance (lower is closer); None when nothing was compared
    threshold: float | None
    latency_ms: float
    model_version: str
    template_id: str | None = None
    candidates: list[Match] = field(default_factory=list)
    frames_used: int = 1

    @property
    def message(self) -> dict[str, str]:
        """Plain-language text for the kiosk screen, Chinese and English."""
        return message(self.reason)

    def event_body(self) -> dict[str, Any]:
        """The face.decision body: no image, no template, no citizen id."""
        score = None if self.score is None else round(min(10.0, max(0.0, self.score)), 4)
        return {
            "mode": self.mode,
            "decision": self.decision,
            "score": score,
            "reason": self.reason,
            "latency_ms": round(self.latency_ms, 2),
            "model_version": self.model_version,
        }


def check_citizen_id(citizen_id: str) -> str:
    """Refuse a citizen id that is empty, too long or has characters outside [0-9A-Za-z_-]."""
    if not isinstance(citizen_id, str) or not _CITIZEN_ID_RE.match(citizen_id):
        raise BadImage(
            "bad_citizen_id",
            "citizen_id must be 1–64 characters of 0-9 A-Z a-z _ -",
            status=422,
            where="citizen_id",
        )
    return citizen_id


class FaceService:
    """Face matching for one terminal: the engine, the encrypted store and the 1:N index."""

    def __init__(
        self,
        settings: FaceSettings,
        engine: FaceEngine,
        store: TemplateStore,
        *,
        gallery: Gallery | None = None,
        post_event: PostEvent | None = None,
        registry: CollectorRegistry | None = None,
        camera: FrameSource | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.gallery = gallery if gallery is not None else Gallery()  # an empty one is falsy
        self.camera = camera
        self._post_event = post_event
        self._clock = clock
        self.metrics = FaceMetrics(registry or CollectorRegistry())
        self._meta: dict[str, TemplateInfo] = {}
        self.skipped_templates = 0
        self._limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_side)
        self._live = QualityLimits(
            settings.min_face_px,
            settings.min_sharpness,
            settings.min_brightness,
            settings.max_brightness,
            settings.max_yaw_ratio,
            settings.max_roll_deg,
            settings.second_face_min_ratio,
        )
        # An ID-card chip photo is ~102×126 px and printed-quality: no size gate, softer focus gate.
        self._id_photo = QualityLimits(
            0,
            settings.min_sharpness / 4,
            settings.min_brightness,
            settings.max_brightness,
            settings.max_yaw_ratio,
            settings.max_roll_deg,
            settings.second_face_min_ratio,
            check_size=False,
        )

    # -- start-up --------------------------------------------------------------------------------

    def load_gallery(self) -> int:
        """Decrypt every stored template into the in-memory index; return how many were loaded."""
        for rec in self.store.load_all():
            if rec.model_version != self.settings.model_version:
                # A descriptor from another model is not comparable: the citizen must re-enrol.
                self.skipped_templates += 1
                continue
            self.gallery.upsert(rec.template_id, rec.vector, rec.citizen_id)
            self._meta[rec.template_id] = self._info(rec.template_id, rec.model_version, rec.enrolled_at)
        self.metrics.gallery.set(len(self.gallery))
        return len(self.gallery)

    # -- the five operations ----------------------------------------------------------------------

    def enrol(self, citizen_id: str, image: bytes) -> Outcome:
        """Store (or replace) a citizen's template from a good live frame."""
        started = self._clock()
        with self._guard("enrol", started):
            check_citizen_id(citizen_id)
            probe = self._probe(image, self._live)
            if probe.vector is None:
                return self._finish("enrol", "rejected", probe.reason, None, started)
            rec = self.store.save(citizen_id, probe.vector, self.settings.model_version)
            self.gallery.upsert(rec.template_id, rec.vector, citizen_id)
            self._meta[rec.template_id] = self._info(rec.template_id, rec.model_version, rec.enrolled_at)
            self.metrics.gallery.set(len(self.gallery))
            return self._finish("enrol", "enrolled", Reason.OK, None, started, template_id=rec.template_id)

    def verify(self, citizen_id: str, image: bytes) -> Outcome:
        """1:1: is the person in this frame the enrolled citizen?"""
        started = self._clock()
        with self._guard("verify", started):
            template = self._template(citizen_id)
            probe = self._probe(image, self._live)
            return self._compare("verify", probe, template, started)

    def verify_frames(self, citizen_id: str, frames: list[np.ndarray]) -> Outcome:
        """1:1 over several frames (newest last): the first match wins, else the closest frame."""
        started = self._clock()
        with self._guard("verify", started):
            template = self._template(citizen_id)
            if not frames:
                raise FaceUnavailable("the camera returned no frames")
            best: FaceProbe | None = None
            best_dist = float("inf")
            last_reason = Reason.NO_FACE
            used = 0
            for rgb in reversed(frames):
                used += 1
                probe = self.engine.analyse(rgb, self._live, self.settings.detect_max_side)
                if probe.vector is None:
                    last_reason = probe.reason
                    continue
                dist = distance(probe.vector, template)
                if dist < best_dist:
                    best, best_dist = probe, dist
                if is_match(dist, self.settings.threshold):
                    break
            chosen = best or FaceProbe(last_reason)
            return self._compare("verify", chosen, template, started, frames_used=used)

    def verify_camera(self, citizen_id: str, frames: int | None = None) -> Outcome:
        """1:1 against the configured camera: best of its last few frames."""
        with self._guard("verify", self._clock()):
            self._template(citizen_id)  # refuse an unknown citizen before touching the camera
            if self.camera is None:
                raise FaceUnavailable("no camera source is configured (EDGE_FACE_CAMERA_SOURCE)")
            grabbed = self.camera.read(frames or self.settings.camera_frames)
        return self.verify_frames(citizen_id, grabbed)

    def compare_id_photo(self, live: bytes, id_photo: bytes) -> Outcome:
        """1:1: the live frame against the photo read from the ID card's chip."""
        started = self._clock()
        with self._guard("compare_id", started):
            try:
                ref = self._probe(id_photo, self._id_photo)
            except BadImage as err:
                raise BadImage(
                    ID_PHOTO_PREFIX + err.reason,
                    f"ID photo: {err}",
                    status=err.status,
                    where="id_photo",
                ) from err
            if ref.vector is None:
                return self._finish("compare_id", "rejected", ID_PHOTO_PREFIX + ref.reason, None, started)
            probe = self._probe(live, self._live)
            return self._compare("compare_id", probe, ref.vector, started)

    def identify(self, image: bytes, top_k: int | None = None) -> Outcome:
        """1:N: who in the local gallery is this, if anyone (stricter threshold)?"""
        started = self._clock()
        with self._guard("identify", started):
            probe = self._probe(image, self._live)
            if probe.vector is None:
                return self._finish("identify", "rejected", probe.reason, None, started)
            found = self.gallery.search(probe.vector, top_k or self.settings.top_k)
            threshold = self.settings.identify_threshold
            candidates = [Match(c.label, c.key, round(c.distance, 4)) for c in found]
            if found and is_match(found[0].distance, threshold):
                return self._finish(
                    "identify",
                    "match",
                    Reason.OK,
                    found[0].distance,
                    started,
                    threshold=threshold,
                    template_id=found[0].key,
                    candidates=candidates,
                )
            score = found[0].distance if found else None
            return self._finish(
                "identify",
                "no_match",
                Reason.NOT_IN_GALLERY,
                score,
                started,
                threshold=threshold,
                candidates=candidates,
            )

    def erase(self, citizen_id: str) -> Outcome:
        """Remove every trace of a citizen's template: file, index row, metadata."""
        started = self._clock()
        with self._guard("erase", started):
            check_citizen_id(citizen_id)
            tid = self.store.template_id(citizen_id)
            in_memory = self.gallery.remove(tid)
            self._meta.pop(tid, None)
            self.metrics.gallery.set(len(self.gallery))
            try:
                self.store.erase(citizen_id)
            except UnknownCitizen:
                if not in_memory:
                    raise
            return self._finish("erase", "erased", Reason.OK, None, started, template_id=tid)

    def list_templates(self) -> list[TemplateInfo]:
        """Metadata of the enrolled templates (no vectors, no citizen ids)."""
        return sorted(self._meta.values(), key=lambda i: i.enrolled_at)

    def status(self) -> dict[str, Any]:
        """Model version, thresholds and gallery size, for health pages."""
        return {
            "model_version": self.settings.model_version,
            "threshold": self.settings.threshold,
            "identify_threshold": self.settings.identify_threshold,
            "gallery_size": len(self.gallery),
            "camera": self.camera is not None,
            "skipped_templates": self.skipped_templates,
            "unreadable_templates": self.store.unreadable,
        }

    # -- internals --------------------------------------------------------------------------------

    def _probe(self, image: bytes, limits: QualityLimits) -> FaceProbe:
        rgb = decode_image(image, self._limits)
        return self.engine.analyse(rgb, limits, self.settings.detect_max_side)

    def _template(self, citizen_id: str) -> np.ndarray:
        check_citizen_id(citizen_id)
        vec = self.gallery.vector(self.store.template_id(citizen_id))
        if vec is None:
            raise UnknownCitizen("no face template is enrolled for this citizen")
        return vec

    def _compare(
        self,
        mode: Mode,
        probe: FaceProbe,
        reference: np.ndarray,
        started: float,
        frames_used: int = 1,
    ) -> Outcome:
        if probe.vector is None:
            return self._finish(mode, "rejected", probe.reason, None, started, frames_used=frames_used)
        dist = distance(probe.vector, reference)
        threshold = self.settings.threshold
        if is_match(dist, threshold):
            return self._finish(
                mode,
                "match",
                Reason.OK,
                dist,
                started,
                threshold=threshold,
                frames_used=frames_used,
            )
        return self._finish(
            mode,
            "no_match",
            Reason.NOT_SAME_PERSON,
            dist,
            started,
            threshold=threshold,
            frames_used=frames_used,
        )

    def _finish(
        self,
        mode: Mode,
        decision: Decision,
        reason: str,
        score: float | None,
        started: float,
        **extra: Any,
    ) -> Outcome:
        outcome = Outcome(
            mode=mode,
            decision=decision,
            reason=str(reason),
            score=None if score is None else round(score, 4),
            threshold=extra.pop("threshold", None),
            latency_ms=(self._clock() - started) * 1000.0,
            model_version=self.settings.model_version,
            **extra,
        )
        self._record(outcome)
        return outcome

    def _record(self, outcome: Outcome) -> None:
        self.metrics.decisions.labels(outcome.mode, outcome.decision, outcome.reason).inc()
        self.metrics.latency.labels(outcome.mode).observe(outcome.latency_ms / 1000.0)
        if self._post_event is None:
            return
        try:
            self._post_event(EVENT_TYPE, outcome.event_body())
        except Exception as err:
            self.metrics.events_unsaved.inc()
            log.warning("face.decision event not stored: %s", err)

    def _guard(self, mode: Mode, started: float) -> _ErrorRecorder:
        return _ErrorRecorder(self, mode, started)

    def _info(self, tid: str, model_version: str, enrolled_at: str) -> TemplateInfo:
        path = self.store.directory / f"{tid}.tpl"
        size = path.stat().st_size if path.exists() else 0
        return TemplateInfo(tid, model_version, enrolled_at, size)


class _ErrorRecorder:
    """Context manager: a face error still yields an `error` decision event, then propagates."""

    def __init__(self, service: FaceService, mode: Mode, started: float) -> None:
        self._service, self._mode, self._started = service, mode, started

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, FaceError):
            reason = getattr(exc, "reason", None) or _snake(type(exc).__name__)
            self._service._finish(self._mode, "error", str(reason)[:48], None, self._started)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
