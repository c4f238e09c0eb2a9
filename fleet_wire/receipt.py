"""End-to-end receipts: which seqs of a terminal's outbox epoch the server has stored.

A receipt carries the highest contiguous seq (`upto`) plus stored ranges above it, like TCP's
selective acknowledgement, so one missing row never holds back deletion of everything after it.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

from fleet_wire import limits
from fleet_wire.codec import loads_bounded
from fleet_wire.envelope import SCHEMA_VERSION, is_epoch
from fleet_wire.errors import EnvelopeInvalid
from fleet_wire.topics import is_terminal_id


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

    @property
    def range_count(self) -> int:
        """How many disjoint ranges are held above the contiguous mark (the state's size)."""
        return len(self._starts)

    def adds_range(self, seq: int) -> bool:
        """Tell whether adding `seq` would make a new range (it touches neither the mark nor a range)."""
        if seq <= self._upto + 1:
            return False
        i = bisect.bisect_right(self._starts, seq) - 1
        if i >= 0 and self._ends[i] >= seq - 1:
            return False
        return not (i + 1 < len(self._starts) and self._starts[i + 1] == seq + 1)

    def missing_count(self, max_per_gap: int) -> int:
        """Seqs missing between stored ones, each gap counted up to `max_per_gap`.

        A far seq (one terminal sent 5 and then 2**53) is one implausible gap, not 9e15 lost
        events: capping each gap keeps the figure a count of what could really be missing.
        """
        total = 0
        low = self._upto + 1
        for start, end in zip(self._starts, self._ends):
            total += min(start - low, max_per_gap)
            low = end + 1
        return total

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
        """Parse a receipt (bounded, strictly typed), raising a WireError with the reason if it is malformed."""
        doc: Any = loads_bounded(payload, max_bytes=limits.MAX_RECEIPT_BYTES, what="receipt")
        if not isinstance(doc, dict):
            raise EnvelopeInvalid("receipt must be an object", reason="schema")
        version = doc.get("v")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise EnvelopeInvalid(f"receipt schema {version!r}", reason="schema_version")
        terminal, epoch, upto, raw_ranges = (
            doc.get("terminal"),
            doc.get("epoch"),
            doc.get("upto"),
            doc.get("ranges", []),
        )
        if not is_terminal_id(terminal) or not is_epoch(epoch):
            raise EnvelopeInvalid("receipt terminal or epoch is malformed", reason="schema")
        if not _is_seq(upto, low=0) or not isinstance(raw_ranges, list):
            raise EnvelopeInvalid("receipt is missing or mistypes upto/ranges", reason="schema")
        if len(raw_ranges) > limits.MAX_RECEIPT_RANGES:
            raise EnvelopeInvalid(f"receipt carries {len(raw_ranges)} ranges", reason="oversized")
        ranges: list[tuple[int, int]] = []
        for pair in raw_ranges:
            if not (isinstance(pair, list) and len(pair) == 2 and _is_seq(pair[0]) and _is_seq(pair[1])):
                raise EnvelopeInvalid("receipt ranges must be [start, end] pairs of seqs", reason="schema")
            ranges.append((pair[0], pair[1]))
        if any(a > b or a <= upto for a, b in ranges):
            raise EnvelopeInvalid("receipt marks are inconsistent", reason="schema")
        return cls(terminal, epoch, upto, tuple(ranges))


def _is_seq(value: Any, low: int = 1) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= limits.MAX_SEQ
