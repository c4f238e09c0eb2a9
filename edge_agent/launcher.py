"""The launcher: starts the agent of the release `current` points to, and rolls a release on trial
back when it keeps crashing. Standard library ONLY: it must keep working when a release is broken,
so provisioning copies this file outside the release directories (`<root>/launcher.py`).

Layout under the install root (e.g. /opt/kiosk-fleet):

    launcher.py              this file
    releases/<version>-<sha8>/   one venv per release, built in place; `.complete` written last
    current -> releases/...      switched atomically (symlink to a temp name + rename + fsync)
    launcher-state.json          trial, failed releases, last rollback (fsync + atomic rename)
    clean-stop                   written by the agent when it stops cleanly, removed at each start

Modes:
- `exec` (systemd): count the start, resolve `current` ONCE and exec the real path
  `<release>/bin/edge-agent run ...`. A process started through the symlink would load its lazily
  imported modules from whatever `current` points to later (reproduced), so the real path is used.
- `supervise` (tests, demo): the same, but as a parent that restarts the child with back-off,
  forwards SIGTERM, and restarts at once on EXIT_RESTART.

Starts are counted only while a release is on trial. A start after an unclean end (no clean-stop
marker) within the same boot counts as a crash; a clean stop, or a new boot id (a power cut), does
not. After `max_crashes` crashes `current` goes back to the previous release, the release joins the
failed list (never installed again), and the reason is left for the old agent to report.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_RESTART = 75  # the agent asks to be started again at once (a new release or setting is in place)
EXIT_CONFIG = 2
RELEASES = "releases"
CURRENT = "current"
STATE_FILE = "launcher-state.json"
CLEAN_STOP = "clean-stop"
COMPLETE_MARKER = ".complete"
LOCK_FILE = ".launcher.lock"
DEFAULT_MAX_CRASHES = 3
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# A fake boot id for tests only (a power cut is a fault no test can produce for real): a file
# whose content stands in for the kernel's boot id.
BOOT_ID_ENV = "KIOSK_LAUNCHER_BOOT_ID_FILE"
ROOT_ENV = "EDGE_INSTALL_ROOT"


def _say(message: str) -> None:
    # stderr is the journal under systemd; the launcher has no logging set-up to depend on
    sys.stderr.write(f"launcher: {message}\n")
    sys.stderr.flush()


class LauncherError(Exception):
    """The install root cannot be started (no release, broken layout)."""


# -- durable files ----------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a power cut leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc: Any) -> None:
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as err:
        # A state file we cannot read must not stop the terminal: start from empty, say so.
        _say(f"{path} unreadable ({err}); treating it as empty")
        return default


@contextlib.contextmanager
def state_lock(root: Path) -> Iterator[None]:
    """One writer of the launcher state at a time (the launcher and the agent's updater)."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def empty_state() -> dict[str, Any]:
    return {"trial": None, "failed": [], "rolled_back": None}


def read_state(root: Path) -> dict[str, Any]:
    doc = read_json(root / STATE_FILE, None)
    state = empty_state()
    if isinstance(doc, dict):
        state.update({k: v for k, v in doc.items() if k in state})
    if not isinstance(state["failed"], list):
        state["failed"] = []
    if state["trial"] is not None and not isinstance(state["trial"], dict):
        state["trial"] = None
    return state


def write_state(root: Path, state: dict[str, Any]) -> None:
    write_json_atomic(root / STATE_FILE, state)


def boot_id() -> str:
    path = os.environ.get(BOOT_ID_ENV) or BOOT_ID_PATH
    try:
        return Path(path).read_text("ascii").strip()
    except OSError:
        return "unknown"


# -- releases and the `current` link ----------------------------------------------------------------


def release_dir(root: Path, name: str) -> Path:
    return root / RELEASES / name


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "bin" / "edge-agent").exists()


def current_release(root: Path) -> str | None:
    """The release name `current` points to, or None."""
    try:
        target = os.readlink(root / CURRENT)
    except OSError:
        return None
    return Path(target).name


def switch_current(root: Path, name: str) -> None:
    """Point `current` at releases/<name> atomically: symlink a temp name, rename over, fsync."""
    if not release_dir(root, name).is_dir():
        raise LauncherError(f"release {name} does not exist under {root / RELEASES}")
    tmp = root / f".{CURRENT}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(f"{RELEASES}/{name}", tmp)
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def record_trial(root: Path, release: str, previous: str | None, *, job: str = "", max_crashes: int = 0) -> None:
    """Put `release` on trial (before `current` is switched to it)."""
    with state_lock(root):
        state = read_state(root)
        state["trial"] = {
            "release": release,
            "previous": previous,
            "job": job,
            "crashes": 0,
            "starts": 0,
            "running_boot": None,
            "max_crashes": max_crashes or DEFAULT_MAX_CRASHES,
            "since": time.time(),
        }
        write_state(root, state)


def clear_trial(root: Path) -> None:
    with state_lock(root):
        state = read_state(root)
        state["trial"] = None
        write_state(root, state)


def mark_failed(root: Path, release: str, reason: str, *, job: str = "", switch_to: str | None = None) -> None:
    """Record that `release` failed (never tried again), end its trial, optionally switch back."""
    with state_lock(root):
        state = read_state(root)
        if release not in state["failed"]:
            state["failed"].append(release)
        state["trial"] = None
        state["rolled_back"] = {"release": release, "reason": reason, "job": job, "at": time.time()}
        write_state(root, state)
    if switch_to is not None:
        switch_current(root, switch_to)


def take_rolled_back(root: Path) -> dict[str, Any] | None:
    """Read and clear the last rollback note (the old agent reports it once)."""
    with state_lock(root):
        state = read_state(root)
        note = state["rolled_back"]
        if note is not None:
            state["rolled_back"] = None
            write_state(root, state)
    return note if isinstance(note, dict) else None


def write_clean_stop(root: Path, release: str) -> None:
    """Called by the agent as it exits cleanly: the next start is not a crash."""
    write_atomic(root / CLEAN_STOP, f"{release} {boot_id()}\n".encode())


# -- one start --------------------------------------------------------------------------------------


def prepare_start(root: Path) -> Path:
    """Count this start, roll a crash-looping trial back, and return the real release directory."""

    with state_lock(root):
        state = read_state(root)
        marker = root / CLEAN_STOP
        clean = marker.exists()
        boot = boot_id()
        trial = state["trial"]
        current = current_release(root)
        if trial is not None and trial.get("release") != current:
            # the updater recorded the trial but the switch never happened (cut in between)
            _say(f"trial of {trial.get('release')} ended: current is {current}")
            state["trial"] = trial = None
        if trial is not None:
            if trial.get("running_boot") == boot and not clean:
                trial["crashes"] = int(trial.get("crashes", 0)) + 1
                _say(f"{trial['release']} ended uncleanly on trial (crash {trial['crashes']})")
            if int(trial["crashes"]) >= int(trial.get("max_crashes") or DEFAULT_MAX_CRASHES):
                previous = trial.get("previous")
                _say(f"{trial['release']} crash-looped; rolling back to {previous}")
                if trial["release"] not in state["failed"]:
                    state["failed"].append(trial["release"])
                state["rolled_back"] = {
                    "release": trial["release"],
                    "reason": "crash_loop",
                    "job": trial.get("job", ""),
                    "at": time.time(),
                }
                state["trial"] = trial = None
                if previous and release_dir(root, previous).is_dir():
                    write_state(root, state)
                    switch_current(root, previous)
                    current = previous
                else:
                    _say("no previous release to roll back to; keeping the current one")
            else:
                trial["starts"] = int(trial.get("starts", 0)) + 1
                trial["running_boot"] = boot
        write_state(root, state)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        fsync_dir(root)
    if current is None:
        raise LauncherError(f"{root / CURRENT} points to no release")
    real = release_dir(root, current).resolve()
    if not (real / "bin" / "edge-agent").exists():
        raise LauncherError(f"release {current} has no bin/edge-agent")
    return real


def agent_argv(real: Path, config: str | None, extra: list[str]) -> list[str]:
    argv = [str(real / "bin" / "edge-agent"), "run"]
    if config:
        argv += ["--config", config]
    return argv + extra


def child_env(root: Path) -> dict[str, str]:
    return {**os.environ, ROOT_ENV: str(root)}


def run_exec(root: Path, config: str | None, extra: list[str]) -> int:
    try:
        real = prepare_start(root)
    except LauncherError as err:
        _say(str(err))
        return EXIT_CONFIG
    argv = agent_argv(real, config, extra)
    os.execve(argv[0], argv, child_env(root))


def _die_with_parent() -> None:
    # the agent goes when its supervisor is killed, as the whole unit does under systemd
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_supervise(root: Path, config: str | None, extra: list[str], backoff_s: float, max_backoff_s: float) -> int:
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: Any) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    delay = backoff_s
    while not stopping.is_set():
        try:
            real = prepare_start(root)
        except LauncherError as err:
            _say(str(err))
            time.sleep(delay)
            delay = min(max_backoff_s, delay * 2)
            continue
        started = time.monotonic()
        argv = agent_argv(real, config, extra)
        _say(f"starting {real.name}")
        child = subprocess.Popen(argv, env=child_env(root), preexec_fn=_die_with_parent)
        code = child.wait()
        child = None
        if stopping.is_set():
            break
        _say(f"{real.name} exited with {code}")
        if code == EXIT_RESTART:
            delay = backoff_s
            continue
        if time.monotonic() - started > 60:
            delay = backoff_s
        time.sleep(delay)
        delay = min(max_backoff_s, delay * 2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher", description="start the kiosk agent of the current release")
    parser.add_argument("mode", choices=["exec", "supervise", "switch"], help="switch: point current at release EXTRA")
    parser.add_argument("--root", required=True, help="install root (holds releases/ and current)")
    parser.add_argument("--config", help="agent settings file, passed on to `edge-agent run`")
    parser.add_argument("--backoff-s", type=float, default=1.0, help="supervise: first restart delay")
    parser.add_argument("--max-backoff-s", type=float, default=30.0, help="supervise: longest restart delay")
    parser.add_argument("extra", nargs="*", help="further arguments for `edge-agent run` (after --)")
    args = parser.parse_intermixed_args(argv)  # `switch --root R NAME` as well as `switch NAME --root R`
    root = Path(args.root).absolute()
    if not (root / RELEASES).is_dir():
        _say(f"{root} has no {RELEASES}/ directory")
        return EXIT_CONFIG
    if args.mode == "switch":  # provisioning: the first release, atomically
        if len(args.extra) != 1 or not is_complete(release_dir(root, args.extra[0])):
            _say(f"switch needs the name of one complete release under {root / RELEASES}")
            return EXIT_CONFIG
        switch_current(root, args.extra[0])
        return 0
    if args.mode == "exec":
        return run_exec(root, args.config, args.extra)
    return run_supervise(root, args.config, args.extra, args.backoff_s, args.max_backoff_s)


if __name__ == "__main__":
    sys.exit(main())
