"""The one SQLite transaction helper both sides use (the agent's outbox, every server store).

Connections must be in autocommit mode (`isolation_level=None`), so that BEGIN/COMMIT are ours.
The error that broke a transaction is the one that reaches the caller: SQLite rolls a transaction
back by itself on some errors (`database or disk is full` among them), and a second ROLLBACK
would only say "cannot rollback - no transaction is active" and hide the real cause.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

log = logging.getLogger(__name__)


def _rollback_quietly(conn: sqlite3.Connection, statement: str) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute(statement)
    except sqlite3.Error as err:  # the caller's error matters more; keep a trace of this one
        log.warning("%s after a failed transaction also failed: %s", statement, err)


class _Transaction:
    """A class, not a @contextmanager generator: that costs ~6 µs a use, and the agent's outbox
    commits on its hot path through here (measured in bench/enqueue.py)."""

    __slots__ = ("_begin", "_conn")

    def __init__(self, conn: sqlite3.Connection, begin: str) -> None:
        self._conn = conn
        self._begin = begin

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute(self._begin)
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(self._conn, "ROLLBACK")
                raise
        else:
            _rollback_quietly(self._conn, "ROLLBACK")
        return False  # the error, if any, propagates as it was


def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> _Transaction:
    """BEGIN (IMMEDIATE: take the write lock now) … COMMIT, or ROLLBACK on any error, re-raised as it was."""
    return _Transaction(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def savepoint(conn: sqlite3.Connection, name: str) -> Iterator[sqlite3.Connection]:
    """A nested unit inside whatever transaction is open (or its own): all of it or none."""
    if not name.isidentifier():
        raise ValueError(f"savepoint name {name!r} is not an identifier")
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield conn
    except BaseException:
        _rollback_quietly(conn, f"ROLLBACK TO {name}")
        try:
            conn.execute(f"RELEASE {name}")
        except sqlite3.Error:
            pass
        raise
    conn.execute(f"RELEASE {name}")
