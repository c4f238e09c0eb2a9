"""Build one release directory in place: `python -m venv --without-pip`, then pip from a pip wheel
with `--no-index --no-deps --require-hashes` over exactly the verified files, the completion
marker last, everything fsync'd. Venvs are not relocatable, so each is built in its final
directory `releases/<version>-<sha8>/`; a directory without its marker is a cut-off build and is
removed before it is built again."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_agent import launcher

log = logging.getLogger(__name__)
INSTALL_TIMEOUT_S = 900.0


class InstallFailed(Exception):
    """The release could not be built; the running version was not touched."""

    def __init__(self, message: str, reason: str = "install_failed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Artifact:
    file: Path
    sha256: str


def release_name(version: str, sha256: str) -> str:
    return f"{version}-{sha256[:8]}"


def find_pip_wheel(root: Path, configured: Path | None) -> Path:
    """The pip wheel that installs releases (the release venvs themselves carry no pip)."""
    if configured is not None:
        if not configured.is_file():
            raise InstallFailed(f"the configured pip wheel {configured} does not exist")
        return configured
    candidates = [
        *sorted((root / "tools").glob("pip-*.whl")),
        *sorted(Path("/usr/share/python-wheels").glob("pip-*.whl")),
        *sorted(Path(p) for p in glob.glob(f"{sys.base_prefix}/lib/python3*/ensurepip/_bundled/pip-*.whl")),
    ]
    if not candidates:
        raise InstallFailed(f"no pip wheel found to install with (put one in {root / 'tools'})")
    return candidates[-1]


def _fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            try:
                fd = os.open(full, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        launcher.fsync_dir(Path(dirpath))


def remove_incomplete(root: Path, name: str) -> bool:
    """Remove a release directory left without its marker; True when one was removed."""
    path = launcher.release_dir(root, name)
    if path.exists() and not (path / launcher.COMPLETE_MARKER).exists():
        shutil.rmtree(path)
        launcher.fsync_dir(path.parent)
        return True
    return False


def build_release(root: Path, name: str, artifacts: list[Artifact], pip_wheel: Path, python: str) -> Path:
    """Build releases/<name> from the verified files; return its path. Raises InstallFailed."""
    dest = launcher.release_dir(root, name)
    if launcher.is_complete(dest):
        return dest
    remove_incomplete(root, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    reqs = dest.parent / f".{name}.requirements.txt"
    try:
        _run([python, "-m", "venv", "--without-pip", str(dest)], "creating the release venv")
        lines = [f"{a.file} --hash=sha256:{a.sha256}" for a in artifacts]
        reqs.write_text("\n".join(lines) + "\n", "utf-8")
        _run(
            [
                str(dest / "bin" / "python"),
                str(pip_wheel / "pip"),
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
                "--no-cache-dir",
                "--no-index",
                "--no-deps",
                "--require-hashes",
                "--no-compile",
                "-r",
                str(reqs),
            ],
            "installing the release's wheels",
        )
        if not (dest / "bin" / "edge-agent").exists():
            raise InstallFailed(f"release {name} installed no bin/edge-agent")
        _fsync_tree(dest)
        launcher.write_atomic(dest / launcher.COMPLETE_MARKER, b"complete\n", mode=0o644)
    except OSError as err:
        shutil.rmtree(dest, ignore_errors=True)
        reason = "disk_full" if getattr(err, "errno", None) == 28 else "install_failed"
        raise InstallFailed(f"building release {name}: {err}", reason) from err
    except InstallFailed:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        reqs.unlink(missing_ok=True)
    return dest


def prune_releases(root: Path, keep: set[str]) -> list[str]:
    """Remove release directories not in `keep`; returns the names removed."""
    removed = []
    for path in sorted((root / launcher.RELEASES).iterdir()):
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        launcher.fsync_dir(root / launcher.RELEASES)
    return removed


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise InstallFailed(f"{what} took longer than {INSTALL_TIMEOUT_S:.0f} s") from err
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-800:]
        reason = "disk_full" if "No space left" in tail else "install_failed"
        raise InstallFailed(f"{what} failed (exit {proc.returncode}): {tail}", reason)
