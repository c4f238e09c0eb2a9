"""End-to-end receipts: which seqs of a terminal's outbox epoch the server has stored.

A receipt carries the highest contiguous seq (`upto`) plus stored ranges above it, like TCP's
selective acknowledgement, so one missing row never holds back deletion of everything after it.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleet_wire import limits
from fleet_wire.envelope import EPOCH_PATTERN, SCHEMA_VERSION
from fleet_wire.errors import EnvelopeInvalid

_EPOCH_RE = re.compile(EPOCH_PATTERN)


class SeqSet:
    """A set of positive seqs kept as a contiguous mark plus sorted disjoint ranges above it."""

    __slots__ = ("_ends", "_starts", "_upto")

    def __init__(self, upto: int = 0, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._upto = upto
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in sorted(ranges):
            for seq in (start, end):
                if seq <= 0:
                    raise ValueError("seqs start at 1")
            self._add_range(start, end)

    @property
    def upto(self) -> int:
        """Highest seq such that every seq from 1 to it is in the set."""
        return self._upto

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Inclusive ranges above `upto + 1`, in order."""
        return list(zip(self._starts, self._ends))

    def __contains__(self, seq: int) -> bool:
        if seq <= self._upto:
            return True
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and self._ends[i] >= seq

    def add(self, seq: int) -> bool:
        """Add one seq; return False if it was already present."""
        if seq in self:
            return False
        self._add_range(seq, seq)
        return True

    def missing(self, limit: int = 100) -> list[tuple[int, int]]:
        """Gaps between the contiguous mark and the highest stored seq (inclusive ranges)."""
        gaps: list[tuple[int, int]] = []
        low = self._upto + 1
        for start, end in zip(self._starts, self._ends):
            if start > low:
                gaps.append((low, start - 1))
                if len(gaps) >= limit:
                    break
            low = end + 1
        return gaps

    def count(self) -> int:
        """Number of seqs in the set."""
        return self._upto + sum(e - s + 1 for s, e in zip(self._starts, self._ends))

    def _add_range(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        # merge with the previous range if touching/overlapping
        if i > 0 and self._ends[i - 1] >= start - 1:
            i -= 1
            start = self._starts[i]
            end = max(end, self._ends[i])
            del self._starts[i], self._ends[i]
        while i < len(self._starts) and self._starts[i] <= end + 1:
            end = max(end, self._ends[i])
            del self._starts[i], self._ends[i]
        if start <= self._upto + 1:
            self._upto = max(self._upto, end)
            # absorbing may now touch the first range
            while self._starts and self._starts[0] <= self._upto + 1:
                self._upto = max(self._upto, self._ends[0])
                del self._starts[0], self._ends[0]
            return
        self._starts.insert(i, start)
        self._ends.insert(i, end)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the server has stored for one (terminal, epoch)."""

    terminal: str
    epoch: str
    upto: int
    ranges: tuple[tuple[int, int], ...] = ()

    def covers(self, seq: int) -> bool:
        """Tell whether `seq` is stored according to this receipt."""
        if seq <= self.upto:
            return True
        return any(start <= seq <= end for start, end in self.ranges)

    @classmethod
    def from_seqset(cls, terminal: str, epoch: str, seqs: SeqSet) -> "Receipt":
        """Receipt for a stored set, keeping the ranges nearest the mark when there are many."""
        return cls(terminal, epoch, seqs.upto, tuple(seqs.ranges[: limits.MAX_RECEIPT_RANGES]))

    def encode(self) -> bytes:
        """Serialise for the receipt topic."""
        return json.dumps(
            {
                "v": SCHEMA_VERSION,
                "terminal": self.terminal,
                "epoch": self.epoch,
                "upto": self.upto,
                "ranges": [list(r) for r in self.ranges],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> "Receipt":
        """Parse a receipt, raising EnvelopeInvalid with the reason if it is malformed."""
        try:
            doc: Any = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EnvelopeInvalid(f"receipt is not JSON: {err}", reason="malformed_json") from err
        try:
            if doc["v"] != SCHEMA_VERSION:
                raise EnvelopeInvalid(f"receipt schema {doc['v']!r}", reason="schema_version")
            terminal, epoch, upto = doc["terminal"], doc["epoch"], doc["upto"]
            ranges = tuple((int(a), int(b)) for a, b in doc.get("ranges", []))
        except (KeyError, TypeError, ValueError) as err:
            raise EnvelopeInvalid(f"receipt is missing or mistypes {err}", reason="schema") from err
        if not (isinstance(epoch, str) and _EPOCH_RE.match(epoch)):
            raise EnvelopeInvalid("receipt epoch is malformed", reason="schema")
        if not isinstance(upto, int) or upto < 0 or any(a > b or a <= upto for a, b in ranges):
            raise EnvelopeInvalid("receipt marks are inconsistent", reason="schema")
        return cls(str(terminal), epoch, upto, ranges)
