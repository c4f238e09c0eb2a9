"""The envelopes the outbox writes, byte for byte what fleet_wire decodes; the event ids and times
they carry; a batch the disk refuses leaves nothing behind (real SQLite files, a real fork)."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import Outbox
from edge_agent.outbox.store import OutboxStorageError
from fleet_wire.envelope import (
    _RANDOM,
    decode_envelope,
    event_id_parts,
    format_ts,
    is_event_id,
    new_event_ids,
    parse_ts,
    utc_now_iso,
)
from fleet_wire.events import validate_body_json

FIELDS = ["v", "terminal", "epoch", "seq", "id", "ts", "type", "body"]
COMPLETED = {"session": "s-1", "service_code": "TQ02", "duration_s": 12, "face_login": True}
FAULT = {"peripheral": "printer", "code": "jam", "message": 'paper "A4" },{"session": jammed 打印机'}


def _stored(box: Outbox) -> list[str]:
    return [item.env for item in box.after(0, 10_000, 10**9)]


def _check(env: str, terminal: str) -> dict[str, Any]:
    doc = json.loads(env)
    assert list(doc) == FIELDS
    # compact JSON, UTF-8 as it is: the exact bytes a re-serialisation of the decoded document gives
    assert env == json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    decoded = decode_envelope(terminal, doc)
    assert decoded.body == doc["body"]
    assert json.dumps(doc["body"], separators=(",", ":"), ensure_ascii=False) == validate_body_json(
        doc["type"], doc["body"]
    )
    assert is_event_id(doc["id"])
    return dict(doc)


def test_every_stored_envelope_is_what_the_wire_contract_decodes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-7")
    one = box.enqueue("service.completed", COMPLETED)
    same = box.enqueue_many([("service.completed", {**COMPLETED, "session": f"s-{i}"}, None) for i in range(60)])
    at = datetime(2026, 11, 30, 8, 15, 1, 999_999, tzinfo=UTC)
    mixed = box.enqueue_many(
        [
            ("service.completed", COMPLETED, None),
            ("peripheral.fault", FAULT, at),
            ("service.started", {"session": "s-9", "service_code": "DK01"}, None),
            ("peripheral.fault", FAULT, None),
        ]
    )
    timed = box.enqueue("peripheral.fault", FAULT, ts=at)
    envs = _stored(box)
    assert envs == [item.env for item in [one, *same, *mixed, timed]]
    docs = [_check(env, "t-7") for env in envs]
    assert [d["seq"] for d in docs] == list(range(1, 67))
    assert docs[65]["ts"] == docs[62]["ts"] and docs[65]["type"] == "peripheral.fault"
    assert [(i.seq, i.type, i.event_class, i.replayed) for i in (one, timed)] == [
        (1, "service.completed", 2, False),
        (66, "peripheral.fault", 1, False),
    ]
    assert {d["epoch"] for d in docs} == {box.epoch}
    assert [item.size for item in [one, *same, *mixed, timed]] == [len(env) for env in envs]
    assert docs[0]["body"]["duration_s"] == 12.0 and '"duration_s":12.0' in envs[0]  # canonical, as the model writes it
    assert [d["body"]["session"] for d in docs[1:61]] == [f"s-{i}" for i in range(60)]
    assert docs[62]["ts"] == "2026-11-30T08:15:01.999Z" and docs[62]["body"] == FAULT
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert ids[1:61] == sorted(ids[1:61])  # one call's ids are in creation order
    box.close()


def test_a_batch_the_disk_refuses_leaves_no_row_no_seq_and_no_key(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1")
    box.enqueue("service.completed", COMPLETED)
    db: sqlite3.Connection = box._db
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    big = [("peripheral.fault", {**FAULT, "message": "x" * 400}, None)] * 40
    with pytest.raises(OutboxStorageError, match="nothing was stored"):
        box.enqueue_many(big, keys=[f"k-{i:04d}" for i in range(40)])
    assert not db.in_transaction
    # without keys up to 128 events are one statement, its own transaction: refused whole as well
    for events in (big, big * 5):
        with pytest.raises(OutboxStorageError, match="nothing was stored"):
            box.enqueue_many(events)
        assert not db.in_transaction and box.depth == 1
    with pytest.raises(OutboxStorageError, match="nothing was stored"):
        for _ in range(100):  # single events, until the last free page space is used
            box.enqueue(*big[0][:2])
    stored = box.depth
    assert not db.in_transaction and box.all_seqs() == list(range(1, stored + 1))
    db.execute("PRAGMA max_page_count=1073741823")
    assert box.counters.refused == 40 + 40 + 200 + 1
    # the keys were not kept: the retry stores the events, numbered right after the stored ones
    again = box.enqueue_many(big, keys=[f"k-{i:04d}" for i in range(40)])
    assert [i.seq for i in again] == list(range(stored + 1, stored + 41)) and not any(i.replayed for i in again)
    assert box.all_seqs() == list(range(1, stored + 41))
    box.close()
    reopened = Outbox(tmp_path / "o.db", "t-1")
    assert reopened.depth == stored + 40 and reopened.enqueue("service.completed", COMPLETED).seq == stored + 41
    reopened.close()


def test_event_ids_are_their_parts_and_unique_across_many_calls() -> None:
    prefix, counters, randoms = event_id_parts(3, now_s=1_800_000_000.25)
    assert prefix == f"{1_800_000_000_250:012x}" and len(randoms) == 3
    made = [f"{prefix}{c}{r}" for c, r in zip(counters, randoms)]
    assert [i[12:16] for i in made] == ["0000", "0001", "0002"] and [i[16:] for i in made] == randoms
    assert all(len(r) == 16 and int(r, 16) >= 0 for r in randoms)
    ids = [i for _ in range(3000) for i in new_event_ids(3)]  # the random pool is refilled several times
    ids += new_event_ids(700)  # more than half a pool at once comes straight from the system
    assert len(set(ids)) == len(ids) == 9700 and all(is_event_id(i) for i in ids)
    assert new_event_ids(0) == []
    assert len(set(new_event_ids(70_000))) == 70_000  # past 65,536 the counter wraps, the ids stay unique


def test_a_forked_child_never_hands_out_the_parents_random_bytes() -> None:
    new_event_ids(1)  # the pool holds bytes the child would otherwise copy
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, json.dumps(new_event_ids(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent = new_event_ids(50)
    assert {i[16:] for i in child}.isdisjoint(i[16:] for i in parent)
    assert next(_RANDOM.parts, None) is not None  # the parent still hands out its own pool


def test_the_current_time_is_written_as_format_ts_writes_it() -> None:
    for _ in range(3):
        before = datetime.now(UTC)
        stamp = utc_now_iso()
        after = datetime.now(UTC)
        assert len(stamp) == 24 and stamp.endswith("Z")
        moment = parse_ts(stamp)
        assert before - timedelta(milliseconds=1) <= moment <= after
        assert stamp == format_ts(moment)


def test_batches_of_every_size_go_in_whole_and_in_order(tmp_path: Path) -> None:
    """Rows go in as multi-row INSERTs (one up to 128 rows, then 128, 64 … 1 rows in a transaction):
    every size lands whole, in seq order."""
    box = Outbox(tmp_path / "o.db", "t-1")
    sizes = [1, 2, 3, 7, 63, 64, 65, 100, 127, 128, 129, 200, 256, 383]
    made = []
    for n in sizes:
        made += box.enqueue_many(
            [("service.completed", {**COMPLETED, "session": f"s-{len(made) + i}"}, None) for i in range(n)]
        )
    total = sum(sizes)
    assert [i.seq for i in made] == list(range(1, total + 1))
    stored = box.after(0, 10_000, 10**9)
    assert [(i.seq, i.env, i.size) for i in stored] == [(i.seq, i.env, i.size) for i in made]
    assert [json.loads(i.env)["body"]["session"] for i in stored] == [f"s-{k}" for k in range(total)]
    with sqlite3.connect(tmp_path / "o.db") as other:
        rows = other.execute("SELECT count(*), min(type), max(type), min(class), max(class) FROM outbox").fetchone()
        assert rows == (total, "service.completed", "service.completed", 2, 2)
        assert other.execute("SELECT count(*) FROM outbox WHERE expires IS NOT NULL").fetchone()[0] == 0
    box.close()


def test_each_row_of_a_mixed_batch_keeps_its_own_class_and_expiry(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    box = Outbox(tmp_path / "o.db", "t-1", clock=lambda: now)
    sample = {"cpu_pct": 5, "mem_pct": 40, "disk_pct": 30, "outbox_depth": 0}
    for events in ([("telemetry.sample", sample, None)] * 3, [("telemetry.sample", sample, None)]):
        box.enqueue_many(events)
    box.enqueue_many(
        [
            ("telemetry.sample", sample, None),
            ("service.completed", COMPLETED, None),
            ("peripheral.fault", FAULT, None),
        ]
    )
    with sqlite3.connect(tmp_path / "o.db") as other:
        rows = other.execute("SELECT seq, type, class, created, expires FROM outbox ORDER BY seq").fetchall()
    day = 24 * 3600.0
    assert rows == [
        (1, "telemetry.sample", 0, now, now + day),
        (2, "telemetry.sample", 0, now, now + day),
        (3, "telemetry.sample", 0, now, now + day),
        (4, "telemetry.sample", 0, now, now + day),
        (5, "telemetry.sample", 0, now, now + day),
        (6, "service.completed", 2, now, None),
        (7, "peripheral.fault", 1, now, now + 14 * day),
    ]
    box.close()


def test_an_event_is_never_left_waiting_for_someone_elses_commit(tmp_path: Path) -> None:
    """The one-statement commit runs only outside a transaction; with one open (no outbox method
    leaves one, this test opens it by hand) the event is refused, not stored without its COMMIT."""
    box = Outbox(tmp_path / "o.db", "t-1")
    db: sqlite3.Connection = box._db
    db.execute("BEGIN")
    with pytest.raises(OutboxStorageError, match="nothing was stored"):
        box.enqueue("service.completed", COMPLETED)
    assert box.depth == 0
    db.execute("ROLLBACK")  # the transaction is left to whoever opened it
    assert box.enqueue("service.completed", COMPLETED).seq == 1 and box.all_seqs() == [1]
    box.close()
