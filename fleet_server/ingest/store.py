"""SQL for ingested events, their streams (receipt state), tombstones and rejects."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from fleet_wire.receipt import SeqSet
from fleet_wire.storage import transaction

REJECTS_KEPT = 10_000  # most recent rejects kept for operators; counters keep the totals


@dataclass(slots=True)
class StreamRow:
    terminal: str
    epoch: str
    seqs: SeqSet
    stored: int = 0
    dropped: int = 0
    quarantined: int = 0
    duplicates: int = 0
    first_seen: str = ""
    last_seen: str = ""


class IngestStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn
        # (terminal, epoch) -> the stream's number in event_streams, as committed (see db.py, 0006)
        self._nums: dict[tuple[str, str], int] = {}

    def load_streams(self) -> dict[tuple[str, str], StreamRow]:
        out = {}
        for t, e, upto, ranges, stored, dropped, quar, dup, first, last in self._db.execute(
            "SELECT terminal, epoch, upto, ranges, stored, dropped, quarantined, duplicates,"
            " first_seen, last_seen FROM streams"
        ):
            out[(t, e)] = StreamRow(
                t, e, SeqSet(upto, [tuple(r) for r in json.loads(ranges)]), stored, dropped, quar, dup, first, last
            )
        return out

    def write(
        self,
        events: Sequence[tuple[str, str, int, str, str, str, str, str, str]],
        dropped: Sequence[tuple[str, str, int, str, str, int, str]],
        rejects: Sequence[tuple[str, str | None, str, str, str, str | None, int | None, int]],
        streams: Sequence[StreamRow],
        status: Sequence[tuple[str, str, str, str, str, str]] = (),
    ) -> None:
        """Store one ingest batch, the new stream marks and status rows in a single transaction."""
        new: dict[tuple[str, str], int] = {}
        with transaction(self._db):
            if events:
                nums = self._nums
                try:
                    rows = [(*e, nums[(e[0], e[1])]) for e in events]
                except KeyError:  # a stream's first event since this store was opened
                    for key in {(e[0], e[1]) for e in events}.difference(nums):
                        new[key] = self._stream_number(*key)
                    nums = {**nums, **new}
                    rows = [(*e, nums[(e[0], e[1])]) for e in events]
                self._db.executemany(
                    "INSERT OR IGNORE INTO events (terminal, epoch, seq, id, type, ts, received_at,"
                    " office_id, body, stream) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            if dropped:
                self._db.executemany(
                    "INSERT OR IGNORE INTO dropped (terminal, epoch, seq, reason, original_type,"
                    " original_class, ts) VALUES (?,?,?,?,?,?,?)",
                    dropped,
                )
            if rejects:
                self._db.executemany(
                    "INSERT INTO rejects (at, terminal, topic, reason, detail, epoch, seq, size)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    rejects,
                )
            if streams:
                self._db.executemany(
                    "INSERT INTO streams (terminal, epoch, upto, ranges, stored, dropped, quarantined,"
                    " duplicates, first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(terminal, epoch) DO UPDATE SET upto=excluded.upto,"
                    " ranges=excluded.ranges, stored=excluded.stored, dropped=excluded.dropped,"
                    " quarantined=excluded.quarantined, duplicates=excluded.duplicates,"
                    " last_seen=excluded.last_seen",
                    [
                        (
                            s.terminal,
                            s.epoch,
                            s.seqs.upto,
                            json.dumps(s.seqs.ranges) if s.seqs.range_count else "[]",
                            s.stored,
                            s.dropped,
                            s.quarantined,
                            s.duplicates,
                            s.first_seen,
                            s.last_seen,
                        )
                        for s in streams
                    ],
                )
            if status:
                self._upsert_status(status)
        self._nums.update(new)  # only once committed: a rolled-back number is not kept

    def _stream_number(self, terminal: str, epoch: str) -> int:
        """The stream's number, given to it here on its first event (inside the caller's transaction)."""
        row = self._db.execute(
            "SELECT num FROM event_streams WHERE terminal=? AND epoch=?", (terminal, epoch)
        ).fetchone()
        if row is not None:
            return int(row[0])
        cur = self._db.execute("INSERT INTO event_streams (terminal, epoch) VALUES (?,?)", (terminal, epoch))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _upsert_status(self, rows: Sequence[tuple[str, str, str, str, str, str]]) -> None:
        self._db.executemany(
            "INSERT INTO terminal_status (terminal, state, reason, since, last_seen, doc)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(terminal) DO UPDATE SET"
            " since=CASE WHEN terminal_status.state=excluded.state THEN terminal_status.since"
            " ELSE excluded.since END, state=excluded.state, reason=excluded.reason,"
            " last_seen=excluded.last_seen, doc=excluded.doc",
            rows,
        )

    def trim_rejects(self) -> None:
        self._db.execute("DELETE FROM rejects WHERE id <= (SELECT max(id) FROM rejects) - ?", (REJECTS_KEPT,))

    # -- added for hostile-input checks (issue 8); appended so the events layout work is untouched --

    def seqs_for_ids(self, terminal: str, epoch: str, ids: Sequence[str]) -> dict[str, int]:
        """The stored seq of each of `ids` already present in one stream.

        Looked up in the index on `id` alone (migration 0005), named so the planner cannot walk the
        whole stream in events_key instead; the stream is then checked on each row found.
        """
        out: dict[str, int] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), 500):  # well under SQLite's bound-parameter limit
            chunk = unique[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for event_id, seq in self._db.execute(
                f"SELECT id, seq FROM events INDEXED BY events_id WHERE id IN ({marks}) AND terminal=? AND epoch=?",
                (*chunk, terminal, epoch),
            ):
                out.setdefault(event_id, seq)
        return out
