"""The release contract both sides share: what a TUF target's custom fields say about a release,
the desired-state command the server sends on a terminal's cmd topic, and the update states and
reasons a terminal reports back (as `update.status` events, through the outbox).

Trust comes only from TUF: the command names a target and says when it may be installed; the
terminal takes kind, version, release counter, compatible profiles and (for an agent) the pinned
wheels from the target's signed custom fields (`custom["kiosk"]`), never from the command.

Canonical JSON (what TUF signs) has no floats: a face threshold travels as milli-units (620, not 0.62).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet_wire import limits
from fleet_wire.codec import dumps_checked, loads_bounded
from fleet_wire.envelope import EVENT_ID_PATTERN, SCHEMA_VERSION, OptionalWireTs
from fleet_wire.errors import WireError

# the update states and report body live with the other event bodies; re-exported here
from fleet_wire.events import FINAL_UPDATE_STATES, describe
from fleet_wire.events import UPDATE_STATES as UPDATE_STATES
from fleet_wire.events import UpdateState as UpdateState
from fleet_wire.events import UpdateStatus as UpdateStatus

FINAL_STATES = FINAL_UPDATE_STATES
ReleaseKind = Literal["agent", "config", "face_model"]
KINDS: tuple[ReleaseKind, ...] = ("agent", "config", "face_model")

# TUF target paths per kind. Face models sit under the delegated role that needs two signatures.
TARGET_PREFIX: dict[str, str] = {"agent": "agent/", "config": "config/", "face_model": "models/"}
WHEELS_PREFIX = "wheels/"  # an agent release's dependency wheels, each a target of its own
# A path is a kind's prefix, at most one folder (e.g. the release counter, so a wheel keeps the
# file name pip needs) and a file name; never "..".
TARGET_PATH_PATTERN = (
    r"^(agent|config|models|wheels)/([A-Za-z0-9][A-Za-z0-9._+-]{0,99}/)?[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$"
)
_TARGET_PATH_RE = re.compile(TARGET_PATH_PATTERN[1:-1])
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"
ROLLOUT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
PROFILE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
CUSTOM_KEY = "kiosk"  # namespace inside a TUF target's custom fields


class ReleaseContractError(WireError):
    """A release description, desired-state command or update report does not follow the contract."""

    reason = "bad_release"


class PinnedWheel(BaseModel):
    """One dependency wheel of an agent release: itself a TUF target (hash and length signed there)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    path: str = Field(pattern=TARGET_PATH_PATTERN, description="target path, wheels/<filename>")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=1, le=2**34)


class ReleaseInfo(BaseModel):
    """What the signed custom fields of a release target say (`custom["kiosk"]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: ReleaseKind
    version: str = Field(pattern=VERSION_PATTERN)
    # Monotonic per kind across the fleet: a terminal never installs one below what it committed.
    # A fleet rollback publishes the earlier release again under a higher counter.
    counter: int = Field(ge=1, le=2**53)
    # Device profiles the release may be installed on; ["*"] means every profile.
    profiles: tuple[str, ...] = Field(min_length=1, max_length=64)
    # agent: the wheel to install is the target itself; these are its pinned dependencies
    wheels: tuple[PinnedWheel, ...] = Field(default=(), max_length=256)
    # config: agent settings applied without reinstalling (only keys the agent allows to change)
    settings: dict[str, Any] = Field(default_factory=dict, max_length=64)
    # face_model: decision threshold in milli-units and the model files (target paths)
    threshold_milli: int | None = Field(default=None, ge=0, le=10_000)
    files: tuple[str, ...] = Field(default=(), max_length=32)
    notes: str = Field(default="", max_length=2000)

    @field_validator("profiles")
    @classmethod
    def _profile_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            if p != "*" and not re.fullmatch(PROFILE_ID_PATTERN[1:-1], p):
                raise ValueError(f"profile {p!r} is not a device profile id (or '*')")
        return value

    def fits(self, profile: str) -> bool:
        """Whether this release may be installed on a terminal judged by device profile `profile`."""
        return "*" in self.profiles or profile in self.profiles

    def custom(self) -> dict[str, Any]:
        """The custom-fields document to sign (`TargetFile.unrecognized_fields["custom"]`)."""
        return {CUSTOM_KEY: self.model_dump(mode="json", exclude_defaults=True)}


def release_info(custom: Any) -> ReleaseInfo:
    """Read a target's custom fields, raising ReleaseContractError when they are not a release."""
    if not isinstance(custom, dict) or not isinstance(custom.get(CUSTOM_KEY), dict):
        raise ReleaseContractError(f"target custom fields carry no {CUSTOM_KEY!r} release description")
    try:
        return ReleaseInfo.model_validate(_lists_to_tuples(custom[CUSTOM_KEY]))
    except ValidationError as err:
        raise ReleaseContractError(f"release description: {describe(err)}") from err


def _lists_to_tuples(doc: dict[str, Any]) -> dict[str, Any]:
    # strict mode takes JSON arrays as tuples only through model_validate_json; signed JSON is parsed first
    out = dict(doc)
    for key in ("profiles", "wheels", "files"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def is_target_path(value: object) -> bool:
    return isinstance(value, str) and _TARGET_PATH_RE.fullmatch(value) is not None and ".." not in value


class MaintenanceWindow(BaseModel):
    """When an office lets its terminals install: local wall-clock times in the office's zone.
    `start` > `end` wraps past midnight (22:00-02:00)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tz: str = Field(min_length=1, max_length=64)
    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class DesiredRelease(BaseModel):
    """`cmd` topic: the release this terminal should be on for one rollout. Re-sent (same `id`)
    until the terminal reports on it; a newer command for the same kind replaces an older one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = SCHEMA_VERSION
    type: Literal["desired_release"] = "desired_release"
    id: str = Field(pattern=EVENT_ID_PATTERN, description="the command's id")
    rollout: str = Field(pattern=ROLLOUT_ID_PATTERN)
    kind: ReleaseKind
    target: str = Field(pattern=TARGET_PATH_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    counter: int = Field(ge=1, le=2**53)
    # None: install at once (still never during a citizen's session)
    window: MaintenanceWindow | None = None
    # after this time the terminal installs at its next idle moment, window or not
    deadline: OptionalWireTs = None
    # how long the new version must stay ready and healthy before it commits
    gate_s: float = Field(default=120.0, ge=0, le=7 * 24 * 3600)
    issued: OptionalWireTs = None

    @field_validator("v", mode="before")
    @classmethod
    def _no_bool_version(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("schema version must be the number 1, not a boolean")
        return value

    def to_payload(self) -> bytes:
        return dumps_checked(self.model_dump(mode="json", exclude_none=True), what="cmd").encode()


def decode_desired(payload: bytes) -> DesiredRelease:
    """Decode a cmd payload carrying a desired release, raising ReleaseContractError."""
    try:
        doc: Any = loads_bounded(payload, max_bytes=limits.MAX_CMD_BYTES, what="cmd")
        return DesiredRelease.model_validate(doc)
    except ValidationError as err:
        raise ReleaseContractError(f"cmd: {describe(err)}", reason="bad_cmd") from err
    except WireError as err:
        raise ReleaseContractError(
            f"cmd: {err}", reason="oversized" if err.reason == "oversized" else "bad_cmd"
        ) from err


# -- what the terminal reports ----------------------------------------------------------------------

REASONS: dict[str, str] = {
    "ok": "no problem",
    "unknown_target": "the signed metadata lists no such release",
    "tampered": "the download does not match its signed hash or length",
    "bad_signature": "metadata not signed by the keys the terminal trusts",
    "expired": "signed metadata has expired (or the terminal's clock is wrong)",
    "metadata_rollback": "the repository offered older metadata than the terminal already has",
    "counter_downgrade": "release counter below the one this terminal committed",
    "incompatible_profile": "the release does not list this terminal's device profile",
    "not_a_release": "the target carries no valid release description",
    "refused_before": "this release already failed on this terminal and is not tried again",
    "download_failed": "could not download the release (network or repository)",
    "disk_full": "not enough disk space to stage or install the release",
    "install_failed": "installing the release failed; the running version was not touched",
    "gate_failed": "the new version did not pass its health gate",
    "gate_unacknowledged": "the server never acknowledged the new version's report",
    "crash_loop": "the new version kept crashing on start",
    "self_test_failed": "the face model failed its self-test on golden images",
    "superseded": "a newer desired release replaced this one",
}
