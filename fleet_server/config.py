"""Server settings (env prefix FLEET_), built once in the entry point and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SEED_DIR = Path(__file__).parent / "seed"
_DEFAULT_SECRETS = {"changeme", "change-me", "admin", "secret", "password", "development", "test"}


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
    offices_file: Path = SEED_DIR / "offices.yaml"
    # Onboarding by playbook: the Ansible content, an inventory of terminals (runs are refused
    # without one, rather than falling back to the server itself) and the agent wheel to install.
    playbooks_dir: Path = Path(__file__).resolve().parent.parent / "playbooks"
    profiles_dir: Path = Path(__file__).resolve().parent.parent / "device_profiles"
    playbooks_inventory: str | None = None
    agent_wheel: str | None = None
    # the broker address terminals are given in their config (as they see it)
    terminal_broker_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _safe_outside_development(self) -> "ServerSettings":
        if self.environment == "production":
            if not self.broker_password:
                raise ValueError("FLEET_BROKER_PASSWORD is empty: the server needs its own broker account")
            if len(self.admin_token) < 24 or self.admin_token.lower() in _DEFAULT_SECRETS:
                raise ValueError("FLEET_ADMIN_TOKEN must be a random secret of 24+ characters in production")
        return self
