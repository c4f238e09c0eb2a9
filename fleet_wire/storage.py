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

log = logging.getLogger(__name__)


def _rollback_quietly(conn: sqlite3.Connection, statement: str) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute(statement)
    except sqlite3.Error as err:  # the caller's error matters more; keep a trace of this one
        log.warning("%s after a failed transaction also failed: %s", statement, err)


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN (IMMEDIATE: take the write lock now) … COMMIT, or ROLLBACK on any error, re-raised as it was."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn, "ROLLBACK")
        raise


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
