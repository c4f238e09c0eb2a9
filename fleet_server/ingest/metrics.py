"""Ingest metrics, declared against an injected registry so tests read exact values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ingested = Counter(
            "fleet_events_ingested_total", "Events stored for the first time", ["type"], registry=registry
        )
        self.rejected = Counter(
            "fleet_ingest_rejected_total", "Messages or events refused by validation", ["reason"], registry=registry
        )
        self.duplicates = Counter(
            "fleet_ingest_duplicates_total", "Events received again and dropped (already stored)", registry=registry
        )
        self.dropped = Counter(
            "fleet_events_dropped_by_terminal_total",
            "Events a terminal dropped by policy (tombstones received)",
            ["reason"],
            registry=registry,
        )
        self.receipts = Counter("fleet_receipts_published_total", "Receipts sent to terminals", registry=registry)
        self.write_errors = Counter(
            "fleet_ingest_write_errors_total",
            "Ingest batches whose database write failed (terminals re-send)",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "fleet_ingest_queue_depth", "Messages waiting for the ingest writer", registry=registry
        )
        self.gap_events = Gauge(
            "fleet_ingest_gap_events",
            "Seqs missing below the highest stored seq, summed over streams",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "fleet_ingest_batch_seconds",
            "Time to validate and store one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.status_messages = Counter(
            "fleet_status_messages_total", "Status (birth, heartbeat, will) messages", ["state"], registry=registry
        )
        self.terminal_limited = Counter(
            "fleet_ingest_terminal_limited_total",
            "Events or messages refused because their terminal passed a per-terminal limit (alert on any)",
            ["reason"],
            registry=registry,
        )
        self.rejects_unlogged = Counter(
            "fleet_ingest_rejects_unlogged_total",
            "Rejects counted but not written to the reject log (a terminal passed its rows per minute)",
            registry=registry,
        )
        self.hook_errors = Counter(
            "fleet_ingest_hook_errors_total",
            "After-commit listeners (usage, health) that raised; the ingest carried on",
            ["hook"],
            registry=registry,
        )
        self.late_events = Counter(
            "fleet_ingest_late_events_total",
            "Events stored although older than 30 days (an offline terminal's backlog)",
            registry=registry,
        )
        self.cmd_acks = Counter(
            "fleet_cmd_acks_total", "Command acknowledgements received, by state", ["state"], registry=registry
        )
