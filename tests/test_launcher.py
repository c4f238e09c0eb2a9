"""The launcher as a real process over real release directories: exec resolves `current` once,
starts are counted only on trial, a clean stop or a power cut is not a crash, a crash loop rolls
back, supervise mode forwards SIGTERM and restarts at once on the restart-me code.

The release "agents" here are small stdlib scripts standing in for `bin/edge-agent` (what the
launcher sees of a release); the real agent under the launcher is in tests/test_update_*.py."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import launcher
from fleet_dev.proc import wait_for

LAUNCHER = Path(launcher.__file__)
pytestmark = pytest.mark.timeout(120)

# What each stand-in agent does; every start appends "<release> <pid>" to <root>/starts.log.
_SCRIPT = """\
#!{python}
import os, signal, sys, time
root = os.environ["EDGE_INSTALL_ROOT"]
name = {name!r}
with open(os.path.join(root, "starts.log"), "a") as fh:
    fh.write(name + " " + str(os.getpid()) + " " + sys.argv[0] + " " + " ".join(sys.argv[1:]) + "\\n")
behaviour = {behaviour!r}
if behaviour == "crash":
    sys.exit(1)
if behaviour == "restart-once":
    flag = os.path.join(root, "restarted")
    if not os.path.exists(flag):
        open(flag, "w").close()
        open(os.path.join(root, "clean-stop"), "w").close()
        sys.exit(75)
if behaviour == "clean-exit":
    open(os.path.join(root, "clean-stop"), "w").close()
    sys.exit(0)
def stop(*_):
    open(os.path.join(root, "clean-stop"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.1)
"""


def make_release(root: Path, name: str, behaviour: str = "serve", complete: bool = True) -> Path:
    rel = root / "releases" / name
    (rel / "bin").mkdir(parents=True)
    script = rel / "bin" / "edge-agent"
    script.write_text(_SCRIPT.format(python=sys.executable, name=name, behaviour=behaviour))
    script.chmod(0o755)
    if complete:
        (rel / launcher.COMPLETE_MARKER).write_text("ok\n")
    return rel


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "opt"
    (r / "releases").mkdir(parents=True)
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    os.environ[launcher.BOOT_ID_ENV] = str(boot)
    yield r
    os.environ.pop(launcher.BOOT_ID_ENV, None)


def starts(root: Path) -> list[list[str]]:
    path = root / "starts.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def run_exec(root: Path, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), "exec", "--root", str(root), "--config", "/etc/agent.yaml"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ.copy(),
    )


def supervise(root: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child holds its own copy
    with out:
        return subprocess.Popen(
            [sys.executable, str(LAUNCHER), "supervise", "--root", str(root), "--backoff-s", "0.05"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )


def test_launcher_imports_the_standard_library_only() -> None:
    tree = ast.parse(LAUNCHER.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names - {"__future__"} <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_exec_resolves_current_once_and_execs_the_real_path(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "clean-exit")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    assert os.readlink(root / "current") == "releases/0.1.0-aaaaaaaa"
    done = run_exec(root)
    assert done.returncode == 0, done.stderr
    (name, _pid, argv0, *args) = starts(root)[0]
    assert name == "0.1.0-aaaaaaaa"
    assert argv0 == str((root / "releases" / "0.1.0-aaaaaaaa" / "bin" / "edge-agent").resolve())
    assert "/current/" not in argv0
    assert args == ["run", "--config", "/etc/agent.yaml"]


def test_unclean_ends_are_not_counted_without_a_trial(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "crash")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    for _ in range(5):
        assert run_exec(root).returncode == 1
    state = launcher.read_state(root)
    assert state["trial"] is None and state["failed"] == [] and state["rolled_back"] is None
    assert launcher.current_release(root) == "0.1.0-aaaaaaaa"


def test_crash_loop_on_trial_rolls_back_and_marks_the_release_failed(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "serve")
    make_release(root, "0.2.0-bbbbbbbb", "crash")
    launcher.record_trial(root, "0.2.0-bbbbbbbb", "0.1.0-aaaaaaaa", job="job-1", max_crashes=3)
    launcher.switch_current(root, "0.2.0-bbbbbbbb")
    proc = supervise(root, root.parent / "launcher.log")
    try:
        wait_for(lambda: any(s[0] == "0.1.0-aaaaaaaa" for s in starts(root)), 30, what="rollback to 0.1.0")
        names = [s[0] for s in starts(root)]
        # three starts of the broken one: the first is the trial start, the next ones follow crashes 1, 2;
        # the third crash is counted at the fourth start, which rolls back instead
        assert names == ["0.2.0-bbbbbbbb"] * 3 + ["0.1.0-aaaaaaaa"]
        state = launcher.read_state(root)
        assert state["trial"] is None
        assert state["failed"] == ["0.2.0-bbbbbbbb"]
        assert state["rolled_back"]["reason"] == "crash_loop"
        assert state["rolled_back"]["job"] == "job-1"
        assert launcher.current_release(root) == "0.1.0-aaaaaaaa"
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    assert (root / launcher.CLEAN_STOP).exists(), "SIGTERM was forwarded and the agent stopped cleanly"


def test_clean_stops_on_trial_are_not_crashes(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "serve")
    make_release(root, "0.2.0-bbbbbbbb", "clean-exit")
    launcher.record_trial(root, "0.2.0-bbbbbbbb", "0.1.0-aaaaaaaa", max_crashes=2)
    launcher.switch_current(root, "0.2.0-bbbbbbbb")
    for _ in range(4):
        assert run_exec(root).returncode == 0
    trial = launcher.read_state(root)["trial"]
    assert trial is not None and trial["crashes"] == 0 and trial["starts"] == 4
    assert launcher.current_release(root) == "0.2.0-bbbbbbbb"


def test_a_power_cut_on_trial_is_not_a_crash(root: Path, tmp_path: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "clean-exit")
    make_release(root, "0.2.0-bbbbbbbb", "crash")
    launcher.record_trial(root, "0.2.0-bbbbbbbb", "0.1.0-aaaaaaaa", max_crashes=2)
    launcher.switch_current(root, "0.2.0-bbbbbbbb")
    boot = tmp_path / "boot_id"
    for n in range(4):  # every start after a new boot: each unclean end was a power cut
        boot.write_text(f"boot-{n + 2}\n")
        run_exec(root)
    trial = launcher.read_state(root)["trial"]
    assert trial is not None and trial["crashes"] == 0
    assert launcher.current_release(root) == "0.2.0-bbbbbbbb"
    run_exec(root)  # same boot as the last unclean end: a crash
    run_exec(root)
    assert launcher.read_state(root)["failed"] == ["0.2.0-bbbbbbbb"]
    assert launcher.current_release(root) == "0.1.0-aaaaaaaa"


def test_a_trial_whose_switch_never_happened_ends_on_the_running_release(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "clean-exit")
    make_release(root, "0.2.0-bbbbbbbb", "clean-exit")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    launcher.record_trial(root, "0.2.0-bbbbbbbb", "0.1.0-aaaaaaaa")  # power cut before the switch
    assert run_exec(root).returncode == 0
    assert starts(root)[0][0] == "0.1.0-aaaaaaaa"
    assert launcher.read_state(root)["trial"] is None


def test_supervise_restarts_at_once_on_the_restart_code(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "restart-once")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    proc = supervise(root, root.parent / "launcher.log")
    try:
        wait_for(lambda: len(starts(root)) == 2, 30, what="second start")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_killing_the_supervisor_takes_its_agent_with_it(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "serve")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    proc = supervise(root, root.parent / "launcher.log")
    wait_for(lambda: len(starts(root)) == 1, 30, what="agent start")
    pid = int(starts(root)[0][1])
    proc.kill()
    proc.wait(10)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie waiting for init to reap it is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[1].split()[0] == "Z"

    wait_for(gone, 10, what="agent gone with its launcher")
    assert not (root / launcher.CLEAN_STOP).exists()


def test_missing_release_answers_a_configuration_error(root: Path) -> None:
    done = run_exec(root)
    assert done.returncode == launcher.EXIT_CONFIG
    assert "points to no release" in done.stderr


def test_state_file_is_replaced_whole_and_unreadable_state_does_not_stop_a_start(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa", "clean-exit")
    launcher.switch_current(root, "0.1.0-aaaaaaaa")
    (root / launcher.STATE_FILE).write_text("{not json")
    done = run_exec(root)
    assert done.returncode == 0
    assert "unreadable" in done.stderr
    assert json.loads((root / launcher.STATE_FILE).read_text())["failed"] == []
    assert not [p for p in root.iterdir() if ".tmp" in p.name]


def test_take_rolled_back_reports_once(root: Path) -> None:
    make_release(root, "0.1.0-aaaaaaaa")
    make_release(root, "0.2.0-bbbbbbbb")
    launcher.switch_current(root, "0.2.0-bbbbbbbb")
    launcher.mark_failed(root, "0.2.0-bbbbbbbb", "gate_failed", job="j", switch_to="0.1.0-aaaaaaaa")
    assert launcher.current_release(root) == "0.1.0-aaaaaaaa"
    note = launcher.take_rolled_back(root)
    assert note is not None and note["reason"] == "gate_failed"
    assert launcher.take_rolled_back(root) is None
    assert launcher.read_state(root)["failed"] == ["0.2.0-bbbbbbbb"]
