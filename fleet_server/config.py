"""Server settings (env prefix FLEET_), built once in the entry point and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGE_DIR = Path(__file__).resolve().parent
SEED_DIR = _PACKAGE_DIR / "seed"
_DEFAULT_SECRETS = {"changeme", "change-me", "admin", "secret", "password", "development", "test"}


def bundled(name: str) -> Path:
    """Where the server's own copy of `name` (device_profiles, playbooks) is.

    The server wheel carries it as package data under `fleet_server/data/`; a development checkout
    has it at the top of the repository (the build copies it from there).
    """
    packaged = _PACKAGE_DIR / "data" / name
    return packaged if packaged.exists() else _PACKAGE_DIR.parent / name


def _catalog_file() -> Path:
    import fleet_wire

    return Path(fleet_wire.__file__).resolve().parent / "catalog" / "service_items.yaml"


class ConfigurationError(ValueError):
    """A setting names something that is not there: fix the setting, then start again."""


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="forbid")

    environment: Literal["production", "development", "test"] = "production"
    db_path: Path = Path("/var/lib/kiosk-fleet/fleet.db")
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, ge=1, le=65535)
    broker_username: str = "fleet-server"
    broker_password: str = ""
    broker_client_id: str = "fleet-server-ingest"
    tls_ca: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # Bootstrap administrator's bearer token (user "admin"); more users via the API or fleetctl.
    admin_token: str = ""
    # Bearer token Prometheus sends for /metrics; empty: /metrics answers loopback clients only.
    metrics_token: str = ""
    # The console (fleet_server/console/): the bootstrap admin's password (12+ characters; empty:
    # set one with `POST /api/v1/users/admin/password`), how long a login lasts idle and at most,
    # and failed logins: this many per address and per user name within 10 min are free, then each
    # further one blocks them for login_block_s, doubling each time, at most 15 min.
    admin_password: str = ""
    session_idle_s: float = Field(default=1800.0, gt=0, le=86_400)
    session_max_s: float = Field(default=43_200.0, gt=0, le=7 * 86_400)
    login_free_failures: int = Field(default=5, ge=1, le=100)
    login_block_s: float = Field(default=5.0, gt=0, le=900)
    # Data the server needs at run time, one setting each; shipped inside the server wheel.
    offices_file: Path = Field(default_factory=lambda: SEED_DIR / "offices.yaml")
    catalog_file: Path = Field(default_factory=_catalog_file)
    profiles_dir: Path = Field(default_factory=lambda: bundled("device_profiles"))
    # Onboarding by playbook: the Ansible content, an inventory of terminals (runs are refused
    # without one, rather than falling back to the server itself) and the agent wheel to install.
    playbooks_dir: Path = Field(default_factory=lambda: bundled("playbooks"))
    playbooks_inventory: str | None = None
    agent_wheel: str | None = None
    # the broker address terminals are given in their config (as they see it)
    terminal_broker_host: str = "127.0.0.1"
    # How `fleet-server run` keeps the broker's accounts in step with the registry
    # (fleet_server/broker/): "dynsec" = Mosquitto's dynamic-security plugin, over MQTT as its admin
    # account; "files" = password file + ACL on this host, then SIGHUP to the pid in broker_pid_file;
    # "none" = by hand. Unset: dynsec in production, none otherwise (tests wire their own).
    broker_accounts: Literal["dynsec", "files", "none"] | None = None
    broker_dynsec_username: str = "fleet-dynsec-admin"
    broker_dynsec_password: str = ""
    broker_dynsec_client_id: str = "fleet-server-dynsec"
    broker_command_timeout_s: float = Field(default=5.0, gt=0, le=120)
    broker_passwd_file: Path = Path("/etc/mosquitto/kiosk-fleet/passwd")
    broker_acl_file: Path = Path("/etc/mosquitto/kiosk-fleet/acl")
    broker_pid_file: Path = Path("/run/mosquitto/mosquitto.pid")
    # Rollouts: how often the engine ticks (seconds), and the disk use (percent) a preview flags.
    rollout_tick_s: float = Field(default=1.0, ge=0.05, le=60)
    rollout_low_disk_pct: float = Field(default=90.0, ge=0, le=100)
    # TUF-signed releases (fleet_server/releases/): the repository served under /tuf (unset: a
    # "tuf" folder next to the database), the online key that signs snapshot + timestamp (copied
    # from the keystore; unset: "tuf-online-key.pem" next to the database; mode 0600), how long
    # those two stay valid (re-signed when half of that is gone) and the largest target file.
    tuf_dir: Path | None = None
    tuf_online_key: Path | None = None
    tuf_timestamp_expiry_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    tuf_snapshot_expiry_s: int = Field(default=7 * 86_400, ge=60, le=365 * 86_400)
    tuf_resign_check_s: float = Field(default=300.0, gt=0, le=86_400)
    tuf_max_target_bytes: int = Field(default=2 << 30, ge=1, le=1 << 40)

    def tuf_paths(self) -> tuple[Path, Path]:
        """(repository folder, online key file) with their defaults next to the database."""
        return (
            self.tuf_dir or self.db_path.parent / "tuf",
            self.tuf_online_key or self.db_path.parent / "tuf-online-key.pem",
        )

    @model_validator(mode="after")
    def _safe_outside_development(self) -> ServerSettings:
        if self.environment == "production":
            if not self.broker_password:
                raise ValueError("FLEET_BROKER_PASSWORD is empty: the server needs its own broker account")
            if len(self.admin_token) < 24 or self.admin_token.lower() in _DEFAULT_SECRETS:
                raise ValueError("FLEET_ADMIN_TOKEN must be a random secret of 24+ characters in production")
        if self.admin_password and len(self.admin_password) < 12:
            raise ValueError("FLEET_ADMIN_PASSWORD must have 12+ characters")
        return self

    def check_data(self) -> None:
        """Refuse to start without the data files the server needs; one line naming the setting."""
        wanted = [
            ("FLEET_OFFICES_FILE", self.offices_file, "file", "the office list"),
            ("FLEET_CATALOG_FILE", self.catalog_file, "file", "the service catalogue"),
            ("FLEET_PROFILES_DIR", self.profiles_dir, "dir", "the device profiles"),
            ("FLEET_PLAYBOOKS_DIR", self.playbooks_dir, "dir", "the playbooks"),
        ]
        for setting, path, kind, what in wanted:
            ok = path.is_file() if kind == "file" else path.is_dir()
            if not ok:
                raise ConfigurationError(
                    f"{setting}={path}: {what} {'file' if kind == 'file' else 'folder'}"
                    " is not there; point the setting at it"
                )
        if not any(self.profiles_dir.glob("*.yaml")):
            raise ConfigurationError(f"FLEET_PROFILES_DIR={self.profiles_dir}: no device profile (*.yaml) in it")
