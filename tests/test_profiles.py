"""Device profiles: every shipped profile validates; a broken one is refused with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.registry.profiles import (
    PERIPHERAL_KINDS,
    DeviceProfile,
    ProfileError,
    load_profile,
    load_profiles,
)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
GOOD = PROFILES_DIR / "wall-21.yaml"


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in the text")


def _broken(tmp_path: Path, old: str, new: str, name: str = "wall-21.yaml") -> tuple[Path, str]:
    text = GOOD.read_text(encoding="utf-8")
    assert old in text, old
    broken = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(broken, encoding="utf-8")
    return path, broken


def _refused(path: Path) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return info.value


def test_every_shipped_profile_validates() -> None:
    profiles = load_profiles(PROFILES_DIR)
    assert {"lobby-floor-32", "wall-21"} <= set(profiles)
    for pid, profile in profiles.items():
        assert profile.id == pid
        assert 5 <= profile.heartbeat_interval_s <= 600


def test_realistic_models_carry_the_peripherals_a_terminal_needs() -> None:
    profiles = load_profiles(PROFILES_DIR)
    real = [p for p in profiles.values() if p.form_factor != "virtual"]
    assert len(real) >= 2
    for profile in real:
        kinds = {p.kind for p in profile.peripherals}
        assert {
            "camera",
            "id_card_reader",
            "receipt_printer",
            "qr_scanner",
            "assistance_caller",
            "touch_screen",
        } <= kinds, profile.id
        # Every peripheral has at least one check with thresholds.
        for p in profile.peripherals:
            assert p.checks.model_dump(), (profile.id, p.id)
    floor = profiles["lobby-floor-32"]
    assert floor.peripheral("a4_printer").kind == "document_printer"
    assert floor.peripheral("a4_printer").required is False


def test_thresholds_classify_in_the_right_direction() -> None:
    floor = load_profile(PROFILES_DIR / "lobby-floor-32.yaml")
    fps = floor.peripheral("camera").checks.fps
    assert (fps.state(30), fps.state(15), fps.state(5)) == ("ok", "warn", "fail")
    read_ms = floor.peripheral("id_reader").checks.read_ms
    assert (read_ms.state(900), read_ms.state(2000), read_ms.state(5000)) == ("ok", "warn", "fail")
    assert floor.host.disk_used_ratio.state(0.95) == "fail"


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "  cpu_temp_c: {warn: 70, fail: 85}", "  cpu_temp_c: {warn: 70, fail: 85")
    err = _refused(path)
    assert err.file == str(path)
    assert err.line is not None and err.line >= _line_of(text, "cpu_temp_c")
    assert "not valid YAML" in str(err)
    assert str(err).startswith(f"{path}:{err.line}:")


def test_wrong_type_names_field_and_line(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "size_in: 21.5", "size_in: large")
    err = _refused(path)
    assert err.field == "peripherals[5].params.size_in"
    assert err.line == _line_of(text, "size_in: large")
    assert "valid number" in err.reason


def test_unknown_peripheral_kind_is_refused_and_lists_known_kinds(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "kind: qr_scanner", "kind: fax_machine")
    err = _refused(path)
    assert err.field == "peripherals[3].kind"
    assert err.line == _line_of(text, "kind: fax_machine")
    assert "'fax_machine'" in err.reason
    for kind in PERIPHERAL_KINDS:
        assert kind in err.reason


def test_missing_field_names_the_field(tmp_path: Path) -> None:
    path, text = _broken(
        tmp_path,
        "      read_ms: {warn: 2000, fail: 5000}         # serial link: slower photo transfer than USB\n",
        "",
    )
    err = _refused(path)
    assert err.field == "peripherals[1].checks.read_ms"
    assert "missing" in err.reason
    # The line of the mapping that lacks it: the id reader's `checks:`.
    id_reader_at = _line_of(text, "id: id_reader")
    assert err.line is not None and id_reader_at < err.line < _line_of(text, "id: receipt_printer")
    assert text.splitlines()[err.line - 1].strip() == "checks:"


def test_warn_beyond_fail_is_refused_for_higher_is_worse(tmp_path: Path) -> None:
    path, text = _broken(
        tmp_path,
        "call_setup_ms: {warn: 3000, fail: 8000}",
        "call_setup_ms: {warn: 9000, fail: 8000}",
    )
    err = _refused(path)
    assert err.field == "peripherals[4].checks.call_setup_ms"
    assert err.line == _line_of(text, "call_setup_ms")
    assert "warn (9000) must not be above fail (8000)" in err.reason


def test_warn_beyond_fail_is_refused_for_lower_is_worse(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "paper_left_pct: {warn: 20, fail: 3}", "paper_left_pct: {warn: 2, fail: 3}")
    err = _refused(path)
    assert err.field == "peripherals[2].checks.paper_left_pct"
    assert err.line == _line_of(text, "paper_left_pct")
    assert "must not be below fail" in err.reason


def test_duplicate_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    path, text = _broken(
        tmp_path,
        "heartbeat_interval_s: 30\n",
        "heartbeat_interval_s: 30\nheartbeat_interval_s: 60\n",
    )
    err = _refused(path)
    assert err.field == "heartbeat_interval_s"
    assert err.line == _line_of(text, "heartbeat_interval_s: 60")
    assert f"first at line {_line_of(text, 'heartbeat_interval_s: 30')}" in err.reason


def test_duplicate_key_deep_inside_a_peripheral_is_refused(tmp_path: Path) -> None:
    path, text = _broken(
        tmp_path,
        "      fps: {warn: 15, fail: 8}\n",
        "      fps: {warn: 15, fail: 8}\n      fps: {warn: 10, fail: 5}\n",
    )
    err = _refused(path)
    assert err.field == "peripherals[0].checks.fps"
    assert err.line == _line_of(text, "fps: {warn: 10")


def test_unknown_field_is_refused_with_its_line(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "    interface: serial\n", "    interface: serial\n    baud: 115200\n")
    err = _refused(path)
    assert err.field == "peripherals[1].baud"
    assert err.line == _line_of(text, "baud: 115200")
    assert "unknown field" in err.reason


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path, _ = _broken(tmp_path, "fps: 25", "fps: fast")
    text = path.read_text(encoding="utf-8").replace("resolution: 1920x1080", "resolution: full-hd")
    path.write_text(text, encoding="utf-8")
    err = _refused(path)
    fields = {p.field for p in err.problems}
    assert {"peripherals[0].params.fps", "peripherals[5].params.resolution"} <= fields
    assert len(str(err).splitlines()) == len(err.problems)


def test_id_must_match_the_file_name(tmp_path: Path) -> None:
    path, text = _broken(tmp_path, "id: wall-21", "id: wall-21", name="wall-22.yaml")
    err = _refused(path)
    assert err.field == "id"
    assert err.line == _line_of(text, "id: wall-21")


def test_duplicate_peripheral_id_is_refused(tmp_path: Path) -> None:
    path, _ = _broken(tmp_path, "id: qr_scanner", "id: camera")
    err = _refused(path)
    assert "'camera' appears twice" in err.reason


def test_load_profiles_reports_every_broken_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("schema_version: 1\nid: a\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("id: [\n", encoding="utf-8")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    files = {Path(p.file).name for p in info.value.problems}
    assert files == {"a.yaml", "b.yaml", "empty.yaml"}


def test_profile_model_is_strict_about_top_level_shape() -> None:
    with pytest.raises(ValueError):
        DeviceProfile.model_validate({"schema_version": 2})


def test_server_schema_and_the_shared_check_table_agree_on_every_check_and_its_direction() -> None:
    """The agent judges by fleet_wire's table; the server validates by its typed models: one truth."""
    from typing import get_args

    from fleet_server.registry.profiles import HigherIsWorse, HostChecks, LowerIsWorse, Peripheral
    from fleet_wire.profile_checks import HOST_CHECKS, PERIPHERAL_CHECKS, Direction

    def directions(model: type) -> dict[str, Direction]:
        out = {}
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            kind = info.annotation
            assert kind is not None and issubclass(kind, HigherIsWorse | LowerIsWorse), name
            out[name] = Direction.LOWER_IS_WORSE if issubclass(kind, LowerIsWorse) else Direction.HIGHER_IS_WORSE
        return out

    union = get_args(get_args(Peripheral)[0])
    by_kind = {get_args(m.model_fields["kind"].annotation)[0]: m.model_fields["checks"].annotation for m in union}
    assert set(by_kind) == set(PERIPHERAL_CHECKS) == set(PERIPHERAL_KINDS)
    for kind, checks_model in by_kind.items():
        assert directions(checks_model) == PERIPHERAL_CHECKS[kind], kind
    assert directions(HostChecks) == HOST_CHECKS
