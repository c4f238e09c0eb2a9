"""Face metrics, declared against the agent's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Around the measured ~0.1–0.2 s per check with dlib-bin (no BLAS) on 2 cores.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class FaceMetrics:
    """Decisions by outcome and reason, latency, gallery size."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "edge_face_decisions",
            "Face checks by mode, decision and reason",
            ["mode", "decision", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "edge_face_latency_seconds",
            "Face check time, decode to decision",
            ["mode"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.gallery = Gauge("edge_face_gallery_templates", "Templates in the local 1:N gallery", registry=registry)
        self.events_unsaved = Counter(
            "edge_face_events_unsaved", "face.decision events the outbox refused", registry=registry
        )
