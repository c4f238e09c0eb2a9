"""Helpers for the playbook tests: an agent wheel built offline, local inventories, file checks."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS_DIR = REPO / "playbooks"
# What a terminal runs: the agent and the wire contract it speaks; the server stays out.
AGENT_PACKAGES = ("edge_agent", "fleet_wire")


def build_agent_wheel(out_dir: Path) -> Path:
    """Write a PEP 427 wheel of the agent packages (no network, no `wheel` package needed).

    The dev venv's setuptools has no bdist_wheel and the tests must not download one, so this
    zips the sources with the metadata pip needs: name, version, the `edge-agent` entry point.
    """
    from edge_agent import __version__

    name, version = "kiosk_fleet", __version__
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for package in AGENT_PACKAGES:
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files[path.relative_to(REPO).as_posix()] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: kiosk-fleet\nVersion: {version}\n"
        "Requires-Python: >=3.11\nRequires-Dist: paho-mqtt<3,>=2.1\nRequires-Dist: pydantic<3,>=2.6\n"
        "Requires-Dist: pydantic-settings<3,>=2.2\nRequires-Dist: PyYAML<7,>=6\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: kiosk-fleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = b"[console_scripts]\nedge-agent = edge_agent.__main__:main\n"
    record = [f"{p},sha256={_digest(b)},{len(b)}" for p, b in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            # Fixed timestamps: the same sources give the same bytes, hence the same install stamp.
            zf.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def local_inventory() -> dict[str, Any]:
    """An inventory of just this machine, reached without ssh, with this interpreter."""
    return {
        "all": {"hosts": {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}
    }


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its (size, mtime_ns), for before/after comparisons."""
    if not root.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
