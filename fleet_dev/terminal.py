"""A terminal install in a temporary directory, laid out as provisioning lays it out, and run
under the launcher's own supervision as a subprocess (tests, demo):

    <root>/opt/launcher.py                 copied from edge_agent/launcher.py (outside any release)
    <root>/opt/releases/<version>-<sha8>/  the first release venv, from the agent wheel + wheelhouse
    <root>/opt/current -> releases/...
    <root>/opt/tools/pip-*.whl             what the updater builds later releases with
    <root>/agent.yaml, <root>/data/        settings and the agent's data dir (outbox, update state)

The launcher runs on the base interpreter (no venv, no third-party package): what a terminal's
system python3 gives it.

`tools/` gets the pip wheel the updater finds (`find_pip_wheel`), or, after `use_compiled_pip()`
(the test session does this), a copy of it with each pip module's bytecode beside it: pip runs
from that zip on every release build, and from the plain wheel it compiles all of itself first
each time (about 2 s of a 4 s build on a busy machine). The updater runs it the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import marshal
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent import launcher
from edge_agent.update.install import Artifact, build_release, find_pip_wheel, release_name
from fleet_dev.dist import BUILD_CACHE_ENV
from fleet_dev.proc import die_with_parent, free_port, wait_for


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locked_wheels(lock: Path, wheelhouse: Path) -> list[Path]:
    """The wheelhouse files the hash-pinned lock names (name==version --hash=sha256:...)."""
    files = {_sha256(p): p for p in wheelhouse.glob("*.whl")}
    out = []
    for line in lock.read_text("utf-8").splitlines():
        match = re.search(r"--hash=sha256:([0-9a-f]{64})", line)
        if match:
            if match.group(1) not in files:
                raise RuntimeError(f"{lock}: {line.split()[0]} is not in {wheelhouse}")
            out.append(files[match.group(1)])
    return out


def compiled_pip_wheel(pip_wheel: Path, out_dir: Path) -> Path:
    """A copy of `pip_wheel` (same name) with an unchecked hash-based .pyc beside every module, for
    this interpreter: zipimport loads those instead of compiling pip at each start. Only ever run
    as `python <wheel>/pip`, never installed (its RECORD does not list the .pyc files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / pip_wheel.name
    if dest.exists():
        return dest
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".pip-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(pip_wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                data = zin.read(info)
                zout.writestr(info, data)
                if not info.filename.endswith(".py"):
                    continue
                code = compile(data, info.filename, "exec", dont_inherit=True)
                # PEP 552 header: magic, flags 0b01 (hash-based, source not checked), source hash
                pyc = importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b01) + importlib.util.source_hash(data)
                entry = zipfile.ZipInfo(info.filename[:-3] + ".pyc", info.date_time)
                entry.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(entry, pyc + marshal.dumps(code))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_pip_tool_lock = threading.Lock()
# set by the test session for the processes it starts too (fleet_dev.dist.BUILD_CACHE_ENV)
_session_cache = os.environ.get(BUILD_CACHE_ENV)
_pip_tool_dir: Path | None = Path(_session_cache) / "pip" if _session_cache else None


def use_compiled_pip(cache_dir: Path | None) -> None:
    """Give every terminal installed from now on the compiled copy of the pip wheel (made once in
    `cache_dir`) as its tools/ pip; None: the plain wheel again."""
    global _pip_tool_dir
    with _pip_tool_lock:
        _pip_tool_dir = cache_dir


def pip_tool(root: Path) -> Path:
    """The pip wheel a new install puts into tools/."""
    plain = find_pip_wheel(root, None)
    with _pip_tool_lock:
        if _pip_tool_dir is None:
            return plain
        return compiled_pip_wheel(plain, _pip_tool_dir)


_release_cache_dir: Path | None = Path(_session_cache) / "releases" if _session_cache else None


def use_release_cache(cache_dir: Path | None) -> None:
    """Build each distinct FIRST release (same files, pip and interpreter) once in `cache_dir` and
    give every later install a copy of it, with its own paths written in (see clone_release); None:
    every install builds its own, as provisioning does (the default). Updates are never copied:
    the updater builds those itself. The copy comes with its modules' bytecode, as a release has
    it after its first start (the agent's first start would otherwise compile its dependencies)."""
    global _release_cache_dir
    with _pip_tool_lock:
        _release_cache_dir = cache_dir


def clone_release(src: Path, dest: Path) -> None:
    """Copy a complete release venv built at `src` to `dest` as if built there: a venv names its
    own directory in pyvenv.cfg, the scripts' #! lines and the activate scripts, and nowhere else
    (checked: no copied file may still name `src`). The completion marker is written last."""
    if dest.exists():
        raise RuntimeError(f"{dest} exists already")
    old, new = os.fsencode(src), os.fsencode(dest)
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(launcher.COMPLETE_MARKER))
    for path in [dest / "pyvenv.cfg", *(dest / "bin").iterdir()]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            os.chmod(path, mode)
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            full = Path(dirpath) / name
            # bytecode names its source too, but the import system puts the real path in on load
            if not full.is_symlink() and not name.endswith(".pyc") and old in full.read_bytes():
                raise RuntimeError(f"{full} still names the release it was copied from ({src})")
    launcher.write_atomic(dest / launcher.COMPLETE_MARKER, b"complete\n", mode=0o644)


def _first_release(opt: Path, name: str, artifacts: list[Artifact], pip: Path) -> None:
    with _pip_tool_lock:
        cache = _release_cache_dir
    if cache is None:
        build_release(opt, name, artifacts, pip, sys.executable)
        return
    key = hashlib.sha256(
        "\n".join([name, pip.name, sys.executable, *sorted(a.sha256 for a in artifacts)]).encode()
    ).hexdigest()[:16]
    template = cache / key
    src = launcher.release_dir(template, name)
    template.mkdir(parents=True, exist_ok=True)
    # one build per key, from threads (the lock) and from the processes of the session (flock)
    with _pip_tool_lock, open(template / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not launcher.is_complete(src):
            build_release(template, name, artifacts, pip, sys.executable)
            site = next((src / "lib").glob("python3*/site-packages"))
            subprocess.run(
                [str(src / "bin" / "python"), "-m", "compileall", "-q", "-j", "0", str(site)],
                capture_output=True,
            )  # a module that does not compile is left to fail (or not) where it is imported
    clone_release(src, launcher.release_dir(opt, name))


@dataclass
class Terminal:
    root: Path
    settings: dict[str, Any]  # agent.yaml
    backoff_s: float = 0.2
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.opt = self.root / "opt"
        self.config = self.root / "agent.yaml"
        self.data_dir = Path(self.settings.setdefault("data_dir", str(self.root / "data")))
        if not self.settings.get("api_port"):
            self.settings["api_port"] = free_port()
        self.log_path = self.root / "terminal.log"

    # -- set-up -----------------------------------------------------------------------------------

    def install(self, wheel: Path, lock: Path, wheelhouse: Path) -> str:
        """Lay out the install and build the first release (as provisioning does); its name."""
        (self.opt / launcher.RELEASES).mkdir(parents=True, exist_ok=True)
        (self.opt / "tools").mkdir(exist_ok=True)
        shutil.copy2(launcher.__file__, self.opt / "launcher.py")
        pip = pip_tool(self.opt)
        shutil.copy2(pip, self.opt / "tools" / pip.name)
        artifacts = [Artifact(p, _sha256(p)) for p in locked_wheels(lock, wheelhouse)]
        digest = _sha256(wheel)
        artifacts.append(Artifact(wheel, digest))
        version = wheel.name.split("-")[1]
        name = release_name(version, digest)
        _first_release(self.opt, name, artifacts, self.opt / "tools" / pip.name)
        launcher.switch_current(self.opt, name)
        self.write_config()
        return name

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.settings, fh)

    # -- running ----------------------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        """Run the launcher in supervise mode (it starts and restarts the agent)."""
        python = Path(sys.base_prefix) / "bin" / "python3"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(self.env)
        args = [str(python), str(self.opt / "launcher.py"), "supervise", "--root", str(self.opt)]
        args += ["--config", str(self.config), "--backoff-s", str(self.backoff_s), "--max-backoff-s", "2"]
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        with log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        return self.proc

    def agent_pid(self) -> int | None:
        """The agent the launcher runs now, if any."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def wait_agent(self, timeout_s: float = 60.0) -> int:
        wait_for(lambda: self.agent_pid() is not None, timeout_s, what="the agent under its launcher")
        pid = self.agent_pid()
        assert pid is not None
        return pid

    def kill_agent(self) -> int:
        """kill -9 the agent (the launcher starts it again)."""
        pid = self.wait_agent()
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_launcher(self) -> None:
        """kill -9 the launcher; its agent dies with it (as the whole unit does under systemd)."""
        assert self.proc is not None
        pid = self.agent_pid()
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None
        if pid is not None:
            wait_for(lambda: not _alive(pid), 15, what="the agent to die with its launcher")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the launcher (forwarded to the agent, which stops cleanly)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    # -- reading back -----------------------------------------------------------------------------

    def current(self) -> str | None:
        return launcher.current_release(self.opt)

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.opt / launcher.RELEASES).iterdir() if p.is_dir())

    def launcher_state(self) -> dict[str, Any]:
        return launcher.read_state(self.opt)

    def update_state(self) -> dict[str, Any]:
        doc = launcher.read_json(self.data_dir / "update" / "state.json", {})
        return doc if isinstance(doc, dict) else {}

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_api(self, timeout_s: float = 60.0) -> None:
        """Until the agent's local API answers (after a start or restart)."""

        def up() -> bool:
            try:
                self.api_get("/v1/live")
                return True
            except (OSError, ValueError):
                return False

        wait_for(up, timeout_s, 0.1, what="the agent's local API")

    def api_get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.settings['api_port']}{path}", timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_all(terminals: list[Terminal], timeout_s: float = 30.0) -> None:
    """Stop several terminals as `Terminal.stop` does, all at once (each SIGTERM'd once, then waited for)."""
    running = [(t, t.proc) for t in terminals if t.proc is not None]
    for t, proc in running:
        t.proc = None
        if proc.poll() is None:
            proc.terminate()
    for _, proc in running:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
