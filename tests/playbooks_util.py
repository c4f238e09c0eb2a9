"""Helpers for the playbook tests: installing the real agent wheel, local inventories, file checks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS_DIR = REPO / "playbooks"


def agent_install_vars(dist: Any) -> dict[str, Any]:
    """Extra vars that install the real agent wheel (`./run.sh dist`'s, from the session's `dist`
    fixture) with its hash-pinned lock and wheelhouse into a clean venv made by this interpreter.

    The venv has no pip of its own (ensurepip costs 5-25 s a terminal); this interpreter's pip
    installs into it with --python. No system site packages: what the agent imports came from
    the wheelhouse.
    """
    return {
        "agent_wheel": str(dist.agent_wheel),
        "agent_lock": str(dist.agent_lock),
        "agent_wheelhouse": str(dist.wheelhouse),
        "agent_python": sys.executable,
        "agent_venv_args": ["--without-pip"],
        "agent_pip": [sys.executable, "-m", "pip", "--python", "{{ agent_release_dir }}/bin/python"],
        "agent_launcher_python": sys.executable,
    }


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
