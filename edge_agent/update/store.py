"""The updater's durable state: one JSON document in the agent's data dir (never inside a release
directory), replaced whole with fsync + atomic rename on every change.

    job        the update in progress (the command, the signed description, its phase, report count)
    pending    a newer command waiting for the job in progress to finish its trial
    committed  per kind: counter, target, version, release directory of the last committed release
    failed     targets that failed here (never installed again)
    outgoing   reports persisted but not yet in the outbox (enqueued with an idempotency key, so a
               crash between the two stores each report exactly once)
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from edge_agent import launcher


class UpdateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        doc = launcher.read_json(path, None)
        self.doc: dict[str, Any] = {"job": None, "pending": None, "committed": {}, "failed": [], "outgoing": []}
        if isinstance(doc, dict):
            self.doc.update({k: v for k, v in doc.items() if k in self.doc})

    def save(self) -> None:
        with self._lock:
            launcher.write_json_atomic(self.path, self.doc)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.doc)

    @property
    def job(self) -> dict[str, Any] | None:
        job = self.doc["job"]
        return job if isinstance(job, dict) else None

    def committed(self, kind: str) -> dict[str, Any] | None:
        entry = self.doc["committed"].get(kind)
        return entry if isinstance(entry, dict) else None
