"""The in-memory 1:N index: one matrix-vector product per query (pure numpy)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

INITIAL_CAPACITY = 1024


@dataclass(frozen=True, slots=True)
class Candidate:
    """One gallery entry close to a query."""

    key: str
    label: str
    distance: float


class Gallery:
    """Descriptors in one float32 matrix with their squared norms.

    Squared norms are kept rather than normalising the vectors, so distances stay exactly dlib's
    Euclidean distances (and its documented thresholds apply): |q−g|² = |q|² + |g|² − 2·g·q.
    """

    def __init__(self, dim: int = 128) -> None:
        self._dim = dim
        self._matrix = np.zeros((INITIAL_CAPACITY, dim), dtype=np.float32)
        self._sq_norms = np.zeros(INITIAL_CAPACITY, dtype=np.float32)
        self._keys: list[str] = []
        self._labels: list[str] = []
        self._rows: dict[str, int] = {}
        self._scratch = np.empty(0, dtype=np.float32)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def upsert(self, key: str, vector: np.ndarray, label: str = "") -> None:
        """Add or replace the descriptor stored under `key`."""
        vec = np.asarray(vector, dtype=np.float32).reshape(self._dim)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = len(self._keys)
                if row == len(self._matrix):
                    self._grow()
                self._keys.append(key)
                self._labels.append(label)
                self._rows[key] = row
            self._labels[row] = label
            self._matrix[row] = vec
            self._sq_norms[row] = float(vec @ vec)

    def load_many(self, keys: list[str], vectors: np.ndarray, labels: list[str]) -> None:
        """Bulk-load descriptors (start-up, benchmarks)."""
        for key, vec, label in zip(keys, vectors, labels, strict=True):
            self.upsert(key, vec, label)

    def remove(self, key: str) -> bool:
        """Remove `key`; the last row moves into its slot and the freed row is zeroed."""
        with self._lock:
            row = self._rows.pop(key, None)
            if row is None:
                return False
            last = len(self._keys) - 1
            if row != last:
                self._matrix[row] = self._matrix[last]
                self._sq_norms[row] = self._sq_norms[last]
                self._keys[row] = self._keys[last]
                self._labels[row] = self._labels[last]
                self._rows[self._keys[row]] = row
            # Zero the vacated row so no copy of an erased template lingers in memory.
            self._matrix[last] = 0.0
            self._sq_norms[last] = 0.0
            self._keys.pop()
            self._labels.pop()
            return True

    def vector(self, key: str) -> np.ndarray | None:
        """Return a copy of the descriptor stored under `key`."""
        with self._lock:
            row = self._rows.get(key)
            return None if row is None else self._matrix[row].copy()

    def search(self, query: np.ndarray, k: int = 5) -> list[Candidate]:
        """Return the k nearest entries, nearest first."""
        q = np.asarray(query, dtype=np.float32).reshape(self._dim)
        with self._lock:
            n = len(self._keys)
            if n == 0:
                return []
            # In place in one scratch buffer: at 100k rows, temporaries cost as much as the sort.
            if len(self._scratch) < n:
                self._scratch = np.empty(len(self._matrix), dtype=np.float32)
            sq = self._scratch[:n]
            np.matmul(self._matrix[:n], q, out=sq)
            sq *= -2.0
            sq += self._sq_norms[:n]
            k = min(k, n)
            top = np.argpartition(sq, k - 1)[:k] if k < n else np.arange(n)
            top = top[np.argsort(sq[top])]
            qq = float(q @ q)
            return [Candidate(self._keys[i], self._labels[i], float(np.sqrt(max(0.0, sq[i] + qq)))) for i in top]

    def raw_matrix(self) -> np.ndarray:
        """The whole backing matrix, vacated rows included (tests check erased vectors are gone)."""
        return self._matrix

    def _grow(self) -> None:
        self._matrix = np.vstack([self._matrix, np.zeros_like(self._matrix)])
        self._sq_norms = np.concatenate([self._sq_norms, np.zeros_like(self._sq_norms)])
