"""Config releases: signed settings written as an overlay the agent loads at start. Only keys on
the allow-list may change this way (never credentials, addresses or paths); a config release is
tried like an agent release (trial, gate, rollback) without reinstalling anything.

    <data_dir>/update/config-committed.json   loaded at every start
    <data_dir>/update/config-trial.json       loaded instead while a config release is on trial
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent import launcher

COMMITTED = "config-committed.json"
TRIAL = "config-trial.json"


class OverlayRefused(Exception):
    """The signed settings name a key that may not change remotely, or a bad value."""


class ConfigOverlay(BaseModel):
    """The settings a config release may change (the allow-list), with their bounds."""

    model_config = ConfigDict(extra="forbid", strict=True)

    heartbeat_interval_s: float | None = Field(default=None, gt=0, le=3600)
    telemetry_interval_s: float | None = Field(default=None, gt=0, le=86400)
    receipt_timeout_s: float | None = Field(default=None, gt=0, le=600)
    probe_interval_s: float | None = Field(default=None, gt=0, le=3600)
    update_session_timeout_s: float | None = Field(default=None, gt=0, le=86400)


def validate(settings: dict[str, Any]) -> dict[str, Any]:
    """The allowed settings of a config release; raises OverlayRefused naming what is not allowed."""
    unknown = sorted(set(settings) - set(ConfigOverlay.model_fields))
    if unknown:
        raise OverlayRefused(
            f"a config release may not set {', '.join(unknown)} (allowed: {', '.join(ConfigOverlay.model_fields)})"
        )
    # whole numbers are fine where a float is wanted (signed JSON has no floats to spare)
    doc = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in settings.items()}
    try:
        return ConfigOverlay.model_validate(doc).model_dump(exclude_none=True)
    except ValidationError as err:
        raise OverlayRefused(f"config release settings: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from err


def write_trial(update_dir: Path, settings: dict[str, Any]) -> None:
    update_dir.mkdir(parents=True, exist_ok=True)
    launcher.write_json_atomic(update_dir / TRIAL, validate(settings))


def commit_trial(update_dir: Path) -> None:
    trial = update_dir / TRIAL
    if trial.exists():
        trial.replace(update_dir / COMMITTED)
        launcher.fsync_dir(update_dir)


def drop_trial(update_dir: Path) -> None:
    (update_dir / TRIAL).unlink(missing_ok=True)


def load(update_dir: Path, on_trial: bool) -> dict[str, Any]:
    """The overlay to apply at start: the trial one while a config release is on trial."""
    for name in ([TRIAL] if on_trial else []) + [COMMITTED]:
        doc = launcher.read_json(update_dir / name, None)
        if isinstance(doc, dict):
            try:
                return validate(doc)
            except OverlayRefused:
                continue
    return {}
