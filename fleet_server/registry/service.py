"""Registry rules: seed offices, enrol and revoke terminals, produce broker credentials."""

from __future__ import annotations

import sqlite3
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
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.store = RegistryStore(conn)

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
