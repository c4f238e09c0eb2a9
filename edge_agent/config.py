"""Agent settings, read once in the entry point (env prefix EDGE_, or a YAML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.face.config import FaceSettings
from fleet_wire.topics import TERMINAL_ID_PATTERN


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="forbid")

    environment: Literal["production", "development", "test"] = "production"
    terminal_id: str = Field(pattern=TERMINAL_ID_PATTERN)
    office_id: str = ""
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, ge=1, le=65535)
    username: str = ""  # defaults to terminal_id: the broker ACL keys on it
    password: str = ""
    tls_ca: str | None = None
    data_dir: Path = Path("/var/lib/kiosk-agent")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8700, ge=0, le=65535)
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    telemetry_interval_s: float = Field(default=300.0, gt=0)
    receipt_timeout_s: float = Field(default=10.0, gt=0)
    send_window: int = Field(default=16, ge=1, le=1024)
    batch_events: int = Field(default=200, ge=1, le=500)
    outbox_max_rows: int = Field(default=200_000, ge=10)
    outbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    outbox_synchronous: Literal["FULL", "EXTRA", "NORMAL"] = "FULL"
    # Peripheral health. The device profile the provisioning playbook installs on the terminal
    # (None: no profile, the host is judged by built-in limits and no peripheral is expected).
    profile_file: Path | None = None
    # The camera the health probe opens: index, device path, stream URL, image file, directory or video
    # ("": the face camera, face.camera_source).
    camera_probe_source: str = ""
    # Overrides every profile probe interval (diagnostics, tests); None: the profile's own per peripheral.
    probe_interval_s: float | None = Field(default=None, gt=0)
    probe_timeout_s: float = Field(default=10.0, gt=0)
    # A reading older than this no longer counts (None: three of the peripheral's probe intervals).
    reading_stale_after_s: float | None = Field(default=None, gt=0)
    # The local API's token (one line, 0600/0640: the agent and the kiosk app's group only), written
    # by the provisioning playbook. Production refuses to serve the API without it; None is for
    # development and tests only.
    api_token_file: Path | None = None
    # Updates. The launcher passes the install root (EDGE_INSTALL_ROOT: releases/, current, its
    # state); None outside the A/B layout (development), where releases are refused.
    install_root: Path | None = None
    # The fleet server's TUF repository (…/tuf, holding metadata/ and targets/) and the root.json
    # this terminal trusts first (installed by provisioning); either empty: updates are refused.
    update_repo_url: str = ""
    update_root_file: Path | None = None
    update_fetch_timeout_s: float = Field(default=30.0, gt=0)
    # A citizen session the kiosk app never closed stops holding an install back after this.
    update_session_timeout_s: float = Field(default=1800.0, gt=0)
    # Unclean starts of a release on trial before the launcher switches back.
    update_max_crashes: int = Field(default=3, ge=1, le=100)
    # The old version "could reach the server" when a receipt came within this before the install;
    # only then must the new version's on_trial report be acknowledged by the server to commit.
    update_reach_window_s: float = Field(default=600.0, gt=0)
    update_tick_s: float = Field(default=1.0, gt=0, le=60)
    # The pip wheel that builds release venvs (they carry no pip); None: <install_root>/tools/pip-*.whl,
    # then the system's.
    update_pip_wheel: Path | None = None
    # Face login: the `face:` section of agent.yaml; EDGE_FACE_* variables fill what it leaves out.
    face: FaceSettings = Field(default_factory=FaceSettings)

    @field_validator("face", mode="before")
    @classmethod
    def _face_section(cls, value: Any) -> Any:
        # FaceSettings(**section), not plain validation: its EDGE_FACE_* variables still count.
        return FaceSettings(**value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _safe_outside_development(self) -> "AgentSettings":
        if not self.username:
            self.username = self.terminal_id
        if self.environment == "production":
            if not self.password:
                raise ValueError("EDGE_PASSWORD is empty: a production terminal needs its own broker credentials")
            if self.api_host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError("the local API must bind to loopback in production (EDGE_API_HOST)")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "AgentSettings":
        """Load settings from a YAML file (keys as field names); explicit overrides win."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return cls(**{**data, **overrides})
