"""The server's SQLite connections: what one connection does must never undo another's locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleet_server.db import connect

_COUNT = "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from t').fetchone()[0])"


def _count_in_another_process(path: Path) -> int:
    """What a reader in another process (fleetctl, a backup, a test) sees; it closes its connection."""
    out = subprocess.run([sys.executable, "-c", _COUNT, str(path)], capture_output=True, text=True, check=True,
                         timeout=60)  # fmt: skip
    return int(out.stdout)


def test_opening_a_connection_keeps_the_other_connections_commits(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    writer = connect(path)
    writer.execute("CREATE TABLE t (x INTEGER)")
    writer.execute("INSERT INTO t VALUES (1)")
    # Another component opens its own writer connection in the same process. Were the database
    # file opened and closed outside SQLite here, the process's POSIX locks on it would be gone: a
    # reader in another process, closing, would take itself for the last connection and remove the
    # WAL, and the writer's later commits would go to a deleted file.
    other = connect(path)
    assert _count_in_another_process(path) == 1
    for i in range(2, 50):
        writer.execute("INSERT INTO t VALUES (?)", (i,))
    assert _count_in_another_process(path) == 49, "committed rows lost"
    other.close()
    writer.close()
    assert _count_in_another_process(path) == 49
