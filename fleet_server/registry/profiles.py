"""Device profiles: one YAML file per terminal model, validated by one pydantic model.

A profile says which peripherals a terminal model carries and which health checks each needs,
with warn/fail thresholds. A broken profile is refused with the file, the line, the field path and
the reason, because the person fixing it is editing YAML, not reading a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROFILE_ID_PATTERN = r"^[a-z][a-z0-9-]{1,63}$"
PROFILE_SCHEMA_VERSION = 1

# -- thresholds ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HigherIsWorse(_Strict):
    """Warn at or above `warn`, fail at or above `fail` (latency, error counts, fullness)."""

    warn: float = Field(ge=0)
    fail: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.warn > self.fail:
            raise ValueError(
                f"warn ({self.warn:g}) must not be above fail ({self.fail:g}): higher values are worse for this check"
            )
        return self

    def state(self, value: float) -> str:
        """Classify a measured value as ok, warn or fail."""
        return "fail" if value >= self.fail else "warn" if value >= self.warn else "ok"


class LowerIsWorse(_Strict):
    """Warn at or below `warn`, fail at or below `fail` (frame rate, paper or toner left)."""

    warn: float = Field(ge=0)
    fail: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.warn < self.fail:
            raise ValueError(
                f"warn ({self.warn:g}) must not be below fail ({self.fail:g}): lower values are worse for this check"
            )
        return self

    def state(self, value: float) -> str:
        """Classify a measured value as ok, warn or fail."""
        return "fail" if value <= self.fail else "warn" if value <= self.warn else "ok"


class Ratio(HigherIsWorse):
    """A fullness ratio between 0 and 1 (disk, memory)."""

    warn: float = Field(ge=0, le=1)
    fail: float = Field(ge=0, le=1)


# -- peripherals -----------------------------------------------------------------------------------


class _Peripheral(_Strict):
    """What every peripheral has: an id unique in the profile, a model, how it is probed."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    model: str = Field(min_length=1, max_length=120)
    interface: Literal["usb", "usb-hid", "usb-uvc", "usb-cdc", "serial", "ethernet", "hdmi", "edp", "vga", "sip"]
    # A required peripheral failing takes the whole terminal out of service (no face login without
    # a camera); an optional one only disables the services that need it (A4 printouts).
    required: bool = True
    probe_interval_s: float = Field(default=60.0, ge=5.0, le=3600.0)


class CameraParams(_Strict):
    resolution: str = Field(pattern=r"^\d{3,4}x\d{3,4}$")
    fps: int = Field(ge=5, le=120)
    # Binocular RGB + IR modules give the liveness check a second image.
    infrared: bool = False
    autofocus: bool = False


class CameraChecks(_Strict):
    fps: LowerIsWorse
    frame_timeout_ms: HigherIsWorse
    reopen_per_hour: HigherIsWorse


class Camera(_Peripheral):
    kind: Literal["camera"]
    params: CameraParams
    checks: CameraChecks


class IdCardReaderParams(_Strict):
    # 二代身份证 readers decode the chip through a SAM security module issued by the police
    # authority.
    standard: Literal["GA 467-2013"]
    sam: bool = True
    reads_photo: bool = True
    # Foreigners' permanent residence cards and HK/Macau/Taiwan residence permits use the same
    # reader.
    other_cards: list[Literal["foreigner-permanent-residence", "hk-macao-taiwan-residence"]] = Field(
        default_factory=list
    )


class IdCardReaderChecks(_Strict):
    read_ms: HigherIsWorse
    sam_errors_per_hour: HigherIsWorse


class IdCardReader(_Peripheral):
    kind: Literal["id_card_reader"]
    params: IdCardReaderParams
    checks: IdCardReaderChecks


class ReceiptPrinterParams(_Strict):
    paper_width_mm: Literal[58, 80]
    roll_length_m: float = Field(gt=0, le=300)
    cutter: bool = True
    # Paper left is estimated from the printed length since the last roll change, and the
    # near-end sensor forces "warn" whatever the estimate says.
    near_end_sensor: bool = True


class ReceiptPrinterChecks(_Strict):
    paper_left_pct: LowerIsWorse
    head_temp_c: HigherIsWorse
    cutter_errors_per_day: HigherIsWorse


class ReceiptPrinter(_Peripheral):
    kind: Literal["receipt_printer"]
    params: ReceiptPrinterParams
    checks: ReceiptPrinterChecks


class DocumentPrinterParams(_Strict):
    paper: Literal["A4"]
    duplex: bool = False
    tray_sheets: int = Field(ge=50, le=2000)
    pages_per_minute: int = Field(ge=1, le=120)


class DocumentPrinterChecks(_Strict):
    toner_pct: LowerIsWorse
    tray_sheets_left: LowerIsWorse
    jams_per_day: HigherIsWorse


class DocumentPrinter(_Peripheral):
    kind: Literal["document_printer"]
    params: DocumentPrinterParams
    checks: DocumentPrinterChecks


class QrScannerParams(_Strict):
    symbologies: list[Literal["qr", "pdf417", "datamatrix", "code128", "ean13"]] = Field(min_length=1)
    # Citizens show the 公积金 app's QR code on a phone screen, so the scanner must read screens.
    reads_screens: bool = True


class QrScannerChecks(_Strict):
    decode_ms: HigherIsWorse
    no_response_s: HigherIsWorse


class QrScanner(_Peripheral):
    kind: Literal["qr_scanner"]
    params: QrScannerParams
    checks: QrScannerChecks


class AssistanceCallerParams(_Strict):
    protocol: Literal["sip"]
    video: bool = True
    # The 远程协助 desk that answers; a name in the contact-centre's directory, not an address.
    desk: str = Field(min_length=1, max_length=64)
    handset: bool = False


class AssistanceCallerChecks(_Strict):
    registration_age_s: HigherIsWorse
    call_setup_ms: HigherIsWorse
    packet_loss_pct: HigherIsWorse


class AssistanceCaller(_Peripheral):
    kind: Literal["assistance_caller"]
    params: AssistanceCallerParams
    checks: AssistanceCallerChecks


class TouchScreenParams(_Strict):
    size_in: float = Field(ge=7, le=86)
    resolution: str = Field(pattern=r"^\d{3,4}x\d{3,4}$")
    orientation: Literal["portrait", "landscape"]
    technology: Literal["capacitive", "infrared", "resistive"]


class TouchScreenChecks(_Strict):
    # No touch at all for hours while the office is open usually means a dead touch controller.
    idle_open_hours_h: HigherIsWorse
    usb_resets_per_day: HigherIsWorse


class TouchScreen(_Peripheral):
    kind: Literal["touch_screen"]
    params: TouchScreenParams
    checks: TouchScreenChecks


Peripheral = Annotated[
    Camera | IdCardReader | ReceiptPrinter | DocumentPrinter | QrScanner | AssistanceCaller | TouchScreen,
    Field(discriminator="kind"),
]
PERIPHERAL_KINDS = (
    "camera",
    "id_card_reader",
    "receipt_printer",
    "document_printer",
    "qr_scanner",
    "assistance_caller",
    "touch_screen",
)

# -- the profile -----------------------------------------------------------------------------------


class HostChecks(_Strict):
    disk_used_ratio: Ratio
    memory_used_ratio: Ratio
    cpu_temp_c: HigherIsWorse


class DeviceProfile(_Strict):
    """One terminal model: what it carries and how its health is judged."""

    schema_version: Literal[1]
    id: str = Field(pattern=PROFILE_ID_PATTERN)
    name: str = Field(min_length=1, max_length=120)
    vendor: str = Field(min_length=1, max_length=120)
    form_factor: Literal["floor-standing", "wall-mounted", "desktop", "virtual"]
    os: str = Field(min_length=1, max_length=64)
    # The design's 30 s heartbeat; health calls a terminal stale after `stale_after_heartbeats`
    # missed beats and offline after `offline_after_heartbeats` (or at once on its Last Will).
    heartbeat_interval_s: float = Field(ge=5.0, le=600.0)
    stale_after_heartbeats: int = Field(default=3, ge=2, le=20)
    offline_after_heartbeats: int = Field(default=10, ge=3, le=100)
    host: HostChecks
    peripherals: list[Peripheral] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.offline_after_heartbeats <= self.stale_after_heartbeats:
            raise ValueError("offline_after_heartbeats must be greater than stale_after_heartbeats")
        seen: set[str] = set()
        for p in self.peripherals:
            if p.id in seen:
                raise ValueError(f"peripheral id {p.id!r} appears twice")
            seen.add(p.id)
        return self

    def peripheral(self, peripheral_id: str) -> Any:
        """The peripheral with this id; KeyError if the model has none."""
        for p in self.peripherals:
            if p.id == peripheral_id:
                return p
        raise KeyError(peripheral_id)


# -- loading with line numbers ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileProblem:
    """One thing wrong with a profile file, located for the person editing it."""

    file: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ProfileError(ValueError):
    """A device profile is malformed or invalid; fix the file named in the message."""

    def __init__(self, problems: list[ProfileProblem]) -> None:
        self.problems = problems
        first = problems[0]
        self.file, self.line, self.field, self.reason = (
            first.file,
            first.line,
            first.field,
            first.reason,
        )
        super().__init__("\n".join(str(p) for p in problems))


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first_line: int, path: str) -> None:
        self.key, self.line, self.first_line, self.path = key, line, first_line, path


def _check_duplicates(node: yaml.Node, path: str = "") -> None:
    """Refuse duplicate keys: PyYAML silently keeps the last, and which one was meant is unknown."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = f"{path}.{key}" if path else key
            if key in seen:
                raise _DuplicateKey(key, line, seen[key], child)
            seen[key] = line
            _check_duplicates(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


def _locate(root: yaml.Node, loc: tuple[int | str, ...]) -> tuple[int | None, str]:
    """Map a pydantic error location to a YAML line and a readable field path.

    Parts that are not in the document (the discriminator tag pydantic inserts for a union) are
    skipped; a last part that is not there is a missing field and stays in the path.
    """
    node: yaml.Node = root
    line: int | None = root.start_mark.line + 1
    parts: list[str] = []
    for i, part in enumerate(loc):
        child: yaml.Node | None = None
        key_line: int | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if str(key_node.value) == part:
                    child, key_line = value_node, key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            if i == len(loc) - 1:
                parts.append(f".{part}" if isinstance(part, str) else f"[{part}]")
            continue
        parts.append(f".{part}" if isinstance(part, str) else f"[{part}]")
        node = child
        # A scalar's own line; for a block mapping or list, the line of the key that opens it.
        line = (
            key_line if key_line is not None and not isinstance(child, yaml.ScalarNode) else (child.start_mark.line + 1)
        )
    return line, "".join(parts).lstrip(".")


def _reason(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown field (not part of the profile schema; check the spelling)"
    if err["type"] == "union_tag_invalid":
        kind = err["input"].get("kind")
        return f"unknown peripheral kind {kind!r}; known kinds: {', '.join(PERIPHERAL_KINDS)}"
    if err["type"] == "union_tag_not_found":
        return f"peripheral has no 'kind'; known kinds: {', '.join(PERIPHERAL_KINDS)}"
    if err["type"] == "missing":
        return "required field is missing"
    return re.sub(r"^Value error, ", "", msg)


def parse_profile(text: str, source: str) -> DeviceProfile:
    """Validate one profile document; `source` names it in errors."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
            if root is None:
                raise ProfileError([ProfileProblem(source, None, "", "the file is empty")])
            _check_duplicates(root)
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = " ".join(str(x) for x in (err.context, err.problem) if x)
        raise ProfileError([ProfileProblem(source, line, "", f"not valid YAML: {reason}")]) from err
    except _DuplicateKey as err:
        raise ProfileError(
            [
                ProfileProblem(
                    source,
                    err.line,
                    err.path,
                    f"duplicate key {err.key!r} (first at line {err.first_line})",
                )
            ]
        ) from None
    if not isinstance(data, dict):
        raise ProfileError(
            [ProfileProblem(source, root.start_mark.line + 1, "", "a profile must be a mapping of fields")]
        )
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            if e["type"] == "union_tag_invalid":
                loc += ("kind",)  # point at the offending `kind:` line, not the list item
            line, path = _locate(root, loc)
            problems.append(ProfileProblem(source, line, path, _reason(e)))
        raise ProfileError(problems) from err


def load_profile(path: Path | str) -> DeviceProfile:
    """Load and validate one profile file; its id must equal the file name's stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError([ProfileProblem(str(path), None, "", f"cannot read the file: {err}")]) from err
    profile = parse_profile(text, str(path))
    if profile.id != path.stem:
        root = yaml.compose(text)
        line = _locate(root, ("id",))[0] if root is not None else None
        raise ProfileError(
            [
                ProfileProblem(
                    str(path),
                    line,
                    "id",
                    f"id {profile.id!r} must equal the file name {path.stem!r}",
                )
            ]
        )
    return profile


def load_profiles(directory: Path | str) -> dict[str, DeviceProfile]:
    """Load every `*.yaml` profile in a directory, keyed by id; all broken files in one error."""
    problems: list[ProfileProblem] = []
    profiles: dict[str, DeviceProfile] = {}
    for path in _profile_files(Path(directory)):
        if path.stem in profiles:
            problems.append(
                ProfileProblem(
                    str(path),
                    None,
                    "id",
                    f"a profile {path.stem!r} is already defined by another file of the same name",
                )
            )
            continue
        try:
            profiles[path.stem] = load_profile(path)
        except ProfileError as err:
            problems.extend(err.problems)
    if problems:
        raise ProfileError(problems)
    return profiles


def _profile_files(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        raise ProfileError([ProfileProblem(str(directory), None, "", "no such profile directory")])
    yield from sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
