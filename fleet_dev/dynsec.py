"""A Mosquitto configured as in production: accounts in the dynamic-security plugin, not in files.

The broker's config comes from the same function that `fleet-server broker-config` prints, and
its dynsec.json from `mosquitto_ctrl dynsec init`, as an operator makes it.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fleet_dev.broker import Mosquitto
from fleet_dev.proc import free_port
from fleet_server.broker.dynsec import broker_conf
from fleet_server.broker.mosquitto import BrokerConfig, new_password


class MosquittoCtrlNotInstalled(RuntimeError):
    """mosquitto_ctrl is missing: on Debian it ships in the `mosquitto` package itself."""


def write_operator_layout(config: BrokerConfig, snippet: str, *, max_queued_messages: int = 1000) -> None:
    """A main mosquitto.conf shaped like Debian's (pid file, persistence, log, include_dir) in
    `config.directory`, plus `snippet` (what `fleet-server broker-config` prints) in its conf.d:
    the broker then runs exactly what an operator installs."""
    conf_d = config.directory / "conf.d"
    conf_d.mkdir(parents=True, exist_ok=True)
    (conf_d / "kiosk-fleet.conf").write_text(snippet, encoding="utf-8")
    main = [
        f"pid_file {config.directory / 'mosquitto.pid'}",
        "persistence true",
        f"persistence_location {config.directory}/",
        "autosave_interval 1",
        f"max_queued_messages {max_queued_messages}",
        f"log_dest file {config.log_path}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        # Run as whoever started us: the files stay private to that user.
        f"user {getpass.getuser()}",
        f"include_dir {conf_d}",
    ]
    config.conf_path.write_text("\n".join(main) + "\n", encoding="utf-8")


@dataclass
class DynsecBroker:
    """A dynsec-configured Mosquitto on a free loopback port, with its admin account."""

    directory: Path
    port: int = 0
    admin_username: str = "fleet-dynsec-admin"
    admin_password: str = field(default_factory=new_password)
    broker: Mosquitto | None = None
    max_queued_messages: int = 1000

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dynsec_file = self.directory / "dynsec.json"
        self.config = BrokerConfig(self.directory, self.port)
        if not self.dynsec_file.exists():
            ctrl = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
            if not Path(ctrl).exists():
                raise MosquittoCtrlNotInstalled("mosquitto_ctrl not found; on Debian: apt-get install mosquitto")
            subprocess.run(
                [ctrl, "dynsec", "init", str(self.dynsec_file), self.admin_username, self.admin_password],
                check=True,
                capture_output=True,
            )
            self.dynsec_file.chmod(0o600)
        write_operator_layout(
            self.config,
            broker_conf(self.port, str(self.dynsec_file), host="127.0.0.1"),
            max_queued_messages=self.max_queued_messages,
        )

    def start(self) -> Mosquitto:
        if self.broker is None:
            self.broker = Mosquitto(self.config)
        self.broker.start()
        return self.broker

    def kill(self) -> None:
        if self.broker is not None:
            self.broker.kill()

    def log(self) -> str:
        path = self.config.log_path
        return path.read_text(errors="replace") if path.exists() else ""
