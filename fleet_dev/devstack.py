"""A complete stack on loopback: Mosquitto with generated credentials and ACL, the fleet server,
and enrolled terminals. Used by the demo, the tests and the benchmarks alike, so all three run the
same real parts the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from fleet_dev.broker import Mosquitto
from fleet_dev.dynsec import DynsecBroker
from fleet_dev.proc import free_port, spawn, wait_for
from fleet_server.app import FleetServer
from fleet_server.broker.files import FileAccounts
from fleet_server.broker.mosquitto import BrokerConfig, BrokerCredentials, new_password, write_broker_files
from fleet_server.config import ServerSettings
from fleet_server.registry.schemas import TerminalCreate


@dataclass
class DevStack:
    root: Path
    max_queued_messages: int = 1000
    broker_persistence: bool = True
    port: int = 0
    server_password: str = field(default_factory=new_password)
    admin_token: str = field(default_factory=new_password)
    passwords: dict[str, str] = field(default_factory=dict)
    offices: dict[str, str] = field(default_factory=dict)
    server: FleetServer | None = None
    broker: Mosquitto | None = None
    server_options: dict[str, Any] = field(default_factory=dict)
    # "files": password file + ACL + SIGHUP (the single-host path); "dynsec": the production broker,
    # accounts in Mosquitto's dynamic-security plugin, each bound to its own client id. A dynsec
    # broker starts with the stack, since every enrolment is a command to it.
    accounts: str = "files"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.dynsec: DynsecBroker | None = None
        extra: dict[str, Any] = {}
        if self.accounts == "dynsec":
            self.dynsec = DynsecBroker(self.root / "broker", self.port, max_queued_messages=self.max_queued_messages)
            self.broker = self.dynsec.start()
            extra = {
                "broker_accounts": "dynsec",
                "broker_dynsec_username": self.dynsec.admin_username,
                "broker_dynsec_password": self.dynsec.admin_password,
            }
        elif self.accounts != "files":
            raise ValueError(f"accounts must be 'files' or 'dynsec', not {self.accounts!r}")
        self.broker_config = BrokerConfig(
            self.root / "broker",
            self.port,
            max_queued_messages=self.max_queued_messages,
            persistence=self.broker_persistence,
        )
        self.broker_config.directory.mkdir(parents=True, exist_ok=True)
        self.settings = ServerSettings(
            environment="development",
            db_path=self.root / "fleet.db",
            broker_port=self.port,
            broker_password=self.server_password,
            admin_token=self.admin_token,
            **extra,
        )
        self.server = self._new_server()

    def _new_server(self) -> FleetServer:
        # dynsec: the server builds its accounts from settings, exactly as `fleet-server run` does
        accounts = self._broker_accounts() if self.dynsec is None else None
        return FleetServer(self.settings, CollectorRegistry(), broker_accounts=accounts, **self.server_options)

    def _broker_accounts(self) -> FileAccounts:
        """The production file-based path (fleet_server/broker/files.py), reloading our own broker."""

        def credentials() -> BrokerCredentials:
            assert self.server is not None
            return self.server.registry.broker_credentials(self.settings.broker_username, self.server_password)

        def reload() -> None:
            if self.broker is not None:
                self.broker.reload()

        return FileAccounts(
            self.broker_config.passwd_path, self.broker_config.acl_path, reload, credentials, file_mode=0o600
        )

    # -- set-up -----------------------------------------------------------------------------------

    def enrol(self, terminal_id: str, office_id: str, profile: str = "generic") -> str:
        """Enrol a terminal and return its broker password."""
        assert self.server is not None
        _, password = self.server.admin.enrol_terminal(
            TerminalCreate(id=terminal_id, office_id=office_id, profile=profile), "devstack"
        )
        self.passwords[terminal_id] = password
        self.offices[terminal_id] = office_id
        return password

    def write_broker_files(self) -> None:
        assert self.server is not None
        creds = self.server.registry.broker_credentials(self.settings.broker_username, self.server_password)
        write_broker_files(self.broker_config, creds)

    def start_broker(self) -> Mosquitto:
        if self.dynsec is not None:
            self.broker = self.dynsec.start()
            return self.broker
        self.write_broker_files()
        self.broker = Mosquitto(self.broker_config)
        self.broker.start()
        return self.broker

    def reload_broker(self) -> None:
        if self.dynsec is not None:
            return  # accounts live in the broker itself
        self.write_broker_files()
        assert self.broker is not None
        self.broker.reload()

    def start_server(self) -> FleetServer:
        if self.server is None:
            self.server = self._new_server()
        self.server.start()
        self.server.ingest.refresh_terminals()
        return self.server

    def server_process(self, http_port: int = 0) -> subprocess.Popen[bytes]:
        """Run the server as its own process (`fleet-server run`), e.g. to kill -9 it."""
        if self.server is not None and not self.server._running:
            self.stop_server()
        env = {
            **os.environ,
            "FLEET_ENVIRONMENT": "development",
            "FLEET_DB_PATH": str(self.settings.db_path),
            "FLEET_BROKER_PORT": str(self.port),
            "FLEET_BROKER_PASSWORD": self.server_password,
            "FLEET_ADMIN_TOKEN": self.admin_token,
            "FLEET_HTTP_PORT": str(http_port or free_port()),
        }
        if self.dynsec is not None:
            env.update(
                {
                    "FLEET_BROKER_ACCOUNTS": "dynsec",
                    "FLEET_BROKER_DYNSEC_USERNAME": self.dynsec.admin_username,
                    "FLEET_BROKER_DYNSEC_PASSWORD": self.dynsec.admin_password,
                }
            )
        else:
            env["FLEET_BROKER_ACCOUNTS"] = "none"  # the in-process stack rewrote the files already
        return spawn([sys.executable, "-m", "fleet_server", "run"], env, self.root / "server.log")

    def stop_server(self) -> None:
        """Stop the in-process server (its broker session keeps queueing for it)."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def close(self) -> None:
        self.stop_server()
        if self.broker is not None:
            self.broker.kill()

    # -- terminals --------------------------------------------------------------------------------

    def agent_settings(self, terminal_id: str, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = dict(
            environment="development",
            terminal_id=terminal_id,
            office_id=self.offices[terminal_id],
            broker_port=self.port,
            password=self.passwords[terminal_id],
            data_dir=str(self.root / "agents" / terminal_id),
            api_port=0,
            heartbeat_interval_s=5.0,
            receipt_timeout_s=2.0,
        )
        base.update(overrides)
        return base

    def agent(self, terminal_id: str, **overrides: Any) -> Any:
        from edge_agent.agent import Agent
        from edge_agent.config import AgentSettings

        return Agent(AgentSettings(**self.agent_settings(terminal_id, **overrides)))

    def agent_process(self, terminal_id: str, **overrides: Any) -> subprocess.Popen[bytes]:
        """Run the agent as its own process (`edge-agent run`), e.g. to kill -9 it."""
        env = {**os.environ}
        for key, value in self.agent_settings(terminal_id, **overrides).items():
            env[f"EDGE_{key.upper()}"] = str(value)
        return spawn(
            [sys.executable, "-m", "edge_agent", "run", "--no-api"], env, self.root / f"agent-{terminal_id}.log"
        )

    # -- reading back -----------------------------------------------------------------------------

    def settle(self, timeout: float = 10) -> None:
        """Wait until the ingest writer has finished what it holds.

        A row is visible once its batch commits; the batch's counters, live stream state, listeners
        and receipts follow a moment later. Once the writer is seen idle after that, they are done.
        """
        assert self.server is not None
        ingest = self.server.ingest
        wait_for(ingest.idle.is_set, timeout, what="the ingest writer to finish its batch")

    def stored(self, terminal_id: str | None = None) -> int:
        """Events stored at the server (every row is one (terminal, epoch, seq))."""
        import sqlite3
        from contextlib import closing

        with closing(sqlite3.connect(self.settings.db_path)) as conn:
            if terminal_id is None:
                return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            # through the terminal's stream numbers: the key (stream, seq) is what indexes them
            return int(
                conn.execute(
                    "SELECT count(*) FROM events WHERE stream IN (SELECT num FROM event_streams WHERE terminal=?)",
                    (terminal_id,),
                ).fetchone()[0]
            )


def service_events(n: int, prefix: str = "s") -> Iterable[tuple[str, dict[str, Any], None]]:
    """n realistic business events (a completed rent withdrawal each)."""
    for i in range(n):
        yield (
            "service.completed",
            {"session": f"{prefix}-{i}", "service_code": "TQ02", "duration_s": 120.0 + i % 60, "face_login": True},
            None,
        )
