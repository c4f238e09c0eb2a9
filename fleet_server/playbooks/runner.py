"""The one place that talks to ansible-runner: run a playbook, hand back our own event type."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

# Task results we record; item events are left out because their task's own event follows them.
_TASK_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "failed",
}
MESSAGE_MAX_CHARS = 2000
RUN_TIMEOUT_S = 1800  # a whole office over slow links; a stuck ssh must not hold a worker forever


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One task's result on one host, as ansible-runner reported it."""

    host: str
    task: str
    action: str
    status: str  # ok / changed / failed / skipped
    duration_s: float | None
    message: str
    paths: list[str] = field(default_factory=list)
    ignored: bool = False  # failed, but the task said ignore_errors


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended: runner's status, ansible-playbook's exit code, and why if it never ran."""

    status: str  # successful / failed / timeout / canceled
    rc: int
    error: str = ""


class PlaybookRunner:
    """Runs playbooks from one directory, each in a fresh private data dir that is removed after.

    The private data dir holds the extra vars (secrets included) and the raw event artifacts, so
    it lives only as long as the run; everything worth keeping goes through `on_event`.
    """

    def __init__(
        self,
        playbooks_dir: Path,
        work_dir: Path,
        *,
        envvars: Mapping[str, str] | None = None,
        keep_artifacts: bool = False,
        timeout_s: int = RUN_TIMEOUT_S,
    ) -> None:
        self.playbooks_dir = Path(playbooks_dir).resolve()
        self.work_dir = Path(work_dir)
        self.envvars = dict(envvars or {})
        self.keep_artifacts = keep_artifacts
        self.timeout_s = timeout_s

    def run(
        self,
        playbook: str,
        *,
        inventory: dict[str, Any] | str,
        extravars: Mapping[str, Any],
        on_event: Callable[[TaskEvent], None],
        limit: str | None = None,
        ident: str | None = None,
    ) -> RunOutcome:
        """Run `playbook` to the end, calling `on_event` for every task result."""
        # The run directories hold the extra vars, passwords included: only the server's user may look.
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.work_dir.chmod(0o700)
        private = Path(tempfile.mkdtemp(prefix=f"run-{ident or 'x'}-", dir=self.work_dir))  # 0700
        (private / "tmp").mkdir()
        bin_dir = str(Path(sys.executable).parent)
        envvars = {
            # ansible-runner spawns `ansible-playbook` by name: without our venv on PATH it is rc 127.
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
            "ANSIBLE_ROLES_PATH": str(self.playbooks_dir / "roles"),
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_NOCOLOR": "true",
            # one process per task instead of copy-then-run: halves the per-task cost locally
            "ANSIBLE_PIPELINING": "true",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            **self.envvars,
        }

        def handle(event: dict[str, Any]) -> bool:
            task_event = _task_event(event)
            if task_event is not None:
                on_event(task_event)
            return True

        try:
            result = ansible_runner.run(
                private_data_dir=str(private),
                project_dir=str(self.playbooks_dir),
                playbook=str(self.playbooks_dir / playbook),
                inventory=inventory,
                extravars=dict(extravars),
                envvars=envvars,
                limit=limit,
                ident=ident,
                event_handler=handle,
                quiet=True,
                timeout=self.timeout_s,
            )
            return RunOutcome(str(result.status), int(result.rc if result.rc is not None else -1))
        except Exception as err:
            return RunOutcome("failed", -1, f"{type(err).__name__}: {err}")
        finally:
            if not self.keep_artifacts:
                shutil.rmtree(private, ignore_errors=True)


def _task_event(event: Mapping[str, Any]) -> TaskEvent | None:
    kind = _TASK_EVENTS.get(str(event.get("event", "")))
    if kind is None:
        return None
    data = event.get("event_data") or {}
    res = data.get("res") or {}
    if not isinstance(res, dict):
        res = {"msg": str(res)}
    status = "changed" if kind == "ok" and res.get("changed") else kind
    duration = data.get("duration")
    return TaskEvent(
        host=str(data.get("host") or data.get("remote_addr") or ""),
        task=str(data.get("task") or data.get("task_action") or ""),
        action=str(data.get("task_action") or ""),
        status=status,
        duration_s=float(duration) if isinstance(duration, int | float) else None,
        message=_message(kind, res)[:MESSAGE_MAX_CHARS],
        paths=_paths(res),
        ignored=bool(data.get("ignore_errors")),
    )


def _message(kind: str, res: Mapping[str, Any]) -> str:
    if kind == "skipped":
        return str(res.get("skip_reason") or res.get("false_condition") or "skipped")
    for key in ("msg", "censored", "stderr"):
        value = res.get(key)
        if value:
            return value if isinstance(value, str) else str(value)
    return ""


def _paths(res: Mapping[str, Any]) -> list[str]:
    """Files a task touched, from its own result and its loop items' results."""
    found: list[str] = []
    for item in [res, *(r for r in res.get("results") or [] if isinstance(r, dict))]:
        for key in ("dest", "path"):
            value = item.get(key)
            if isinstance(value, str) and value and value not in found:
                found.append(value)
    return found
