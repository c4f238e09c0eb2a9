"""Registry rules: seed offices, enrol and revoke terminals, produce broker credentials."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import yaml

from fleet_server.broker.mosquitto import BrokerCredentials, hash_password, new_password
from fleet_server.registry.schemas import Office, TerminalCreate, TerminalPublic, load_offices_yaml
from fleet_server.registry.store import RegistryStore


def read_offices_file(path: Path) -> list[Office]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    return load_offices_yaml(doc, str(path))


class RegistryService:
    """Registry rules over the shared writer connection; `reader` opens a connection for reads
    from request threads (without one, reads share the writer: for single-threaded use)."""

    def __init__(
        self, conn: sqlite3.Connection, reader: Callable[[], AbstractContextManager[sqlite3.Connection]] | None = None
    ) -> None:
        self.store = RegistryStore(conn)
        self._reader = reader or (lambda: nullcontext(conn))

    def offices(self) -> list[Office]:
        with self._reader() as conn:
            return RegistryStore(conn).offices()

    def office(self, office_id: str) -> Office | None:
        return next((o for o in self.offices() if o.id == office_id), None)

    def terminals(self) -> list[TerminalPublic]:
        with self._reader() as conn:
            return RegistryStore(conn).terminals()

    def terminal(self, terminal_id: str) -> TerminalPublic | None:
        with self._reader() as conn:
            return RegistryStore(conn).terminal(terminal_id)

    def enabled_terminal_offices(self) -> dict[str, str]:
        """terminal id -> office id, for enabled terminals only."""
        with self._reader() as conn:
            return RegistryStore(conn).enabled_terminal_offices()

    def enabled_terminal_profiles(self) -> dict[str, str]:
        """terminal id -> device profile id, for enabled terminals only."""
        with self._reader() as conn:
            return {t.id: t.profile for t in RegistryStore(conn).terminals() if t.enabled}

    def seed_offices(self, path: Path) -> int:
        return self.store.upsert_offices(read_offices_file(path))

    def enrol(self, terminal: TerminalCreate) -> tuple[TerminalPublic, str]:
        """Enrol a terminal; returns it and its broker password (shown once, stored hashed)."""
        password = new_password()
        return self.store.add_terminal(terminal, hash_password(password)), password

    def rotate(self, terminal_id: str) -> str:
        """New broker password for a terminal (returned once, stored hashed)."""
        password = new_password()
        self.store.set_password_hash(terminal_id, hash_password(password))
        return password

    def revoke(self, terminal_id: str) -> None:
        self.store.revoke_terminal(terminal_id)

    def broker_credentials(self, server_username: str, server_password: str) -> BrokerCredentials:
        hashes = self.store.password_hashes()
        hashes[server_username] = hash_password(server_password)
        return BrokerCredentials(server_username, hashes)
