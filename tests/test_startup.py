"""A server without its data refuses to start, naming the setting; nothing is quietly turned off."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet_server.app import FleetServer
from fleet_server.config import ConfigurationError, ServerSettings, bundled
from fleet_server.registry.profiles import ProfileError
from fleet_server.registry.schemas import TerminalCreate


def _settings(tmp_path: Path, **overrides: object) -> ServerSettings:
    return ServerSettings(
        environment="development",
        db_path=tmp_path / "fleet.db",
        broker_password="x",
        **overrides,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("field", "setting"),
    [
        ("offices_file", "FLEET_OFFICES_FILE"),
        ("catalog_file", "FLEET_CATALOG_FILE"),
        ("profiles_dir", "FLEET_PROFILES_DIR"),
        ("playbooks_dir", "FLEET_PLAYBOOKS_DIR"),
    ],
)
def test_start_refuses_a_missing_data_setting_by_name(tmp_path: Path, field: str, setting: str) -> None:
    settings = _settings(tmp_path, **{field: tmp_path / "not-here"})
    with pytest.raises(ConfigurationError) as err:
        FleetServer(settings)
    assert setting in str(err.value) and "not-here" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "fleet.db").exists(), "nothing is created before the data is known to be there"


def test_an_empty_profiles_folder_is_refused_not_a_silent_pass(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    with pytest.raises(ConfigurationError, match="FLEET_PROFILES_DIR"):
        FleetServer(_settings(tmp_path, profiles_dir=tmp_path / "profiles"))


def test_a_broken_profile_stops_the_start_with_file_and_field(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(bundled("device_profiles"), profiles)
    (profiles / "wall-21.yaml").write_text("id: wall-21\nheartbeat: [not, a, mapping\n", "utf-8")
    with pytest.raises(ProfileError) as err:
        FleetServer(_settings(tmp_path, profiles_dir=profiles))
    assert "wall-21.yaml" in str(err.value)


def test_an_enrolled_terminals_profile_missing_from_disk_is_an_error(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(bundled("device_profiles"), profiles)
    server = FleetServer(_settings(tmp_path, profiles_dir=profiles))
    server.admin.enrol_terminal(TerminalCreate(id="hd-01", office_id="haidian", profile="wall-21"), "test")
    server.close()
    (profiles / "wall-21.yaml").unlink()
    with pytest.raises(ConfigurationError) as err:
        FleetServer(_settings(tmp_path, profiles_dir=profiles))
    assert "FLEET_PROFILES_DIR" in str(err.value) and "wall-21" in str(err.value)


def test_enrolling_with_an_unknown_profile_is_refused(tmp_path: Path) -> None:
    from fleet_server.registry.store import UnknownProfile

    server = FleetServer(_settings(tmp_path))
    try:
        with pytest.raises(UnknownProfile, match="no-such-model"):
            server.admin.enrol_terminal(TerminalCreate(id="hd-02", office_id="haidian", profile="no-such-model"), "t")
    finally:
        server.close()
