"""Playbook runs: start one in a worker thread, record it and every task event, report status."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from fleet_server.playbooks.redaction import redact, secret_values
from fleet_server.playbooks.runner import PlaybookRunner, TaskEvent
from fleet_server.playbooks.schemas import PLAYBOOK_NAME_PATTERN, PlaybookInfo, RunDetail, RunPublic, TaskEventPublic
from fleet_server.playbooks.store import PlaybookStore

log = logging.getLogger(__name__)

MAX_PARALLEL_RUNS = 2  # the server also ingests; two ansible processes are what a small VM carries
_NAME_RE = re.compile(PLAYBOOK_NAME_PATTERN)


class PlaybookError(Exception):
    """Root of playbook-run errors."""


class UnknownPlaybook(PlaybookError):
    """No such playbook in the playbooks directory: fix the name, do not retry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no playbook named {name!r}")
        self.name = name


class RunNotFound(PlaybookError):
    """No run with this id."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"no playbook run {run_id}")
        self.run_id = run_id


class NoInventory(PlaybookError):
    """Neither the service nor the request says which hosts to run on: configure an inventory."""


class PlaybookService:
    """Lists the playbooks in one directory, runs them and keeps a redacted record of each run.

    `base_extravars` go into every run (e.g. the agent wheel, the broker address); a request's own
    extra vars override them. `inventory` is the default inventory (dict or path) for runs that do
    not bring one.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        playbooks_dir: str | os.PathLike[str],
        *,
        registry: CollectorRegistry | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        inventory: dict[str, Any] | str | None = None,
        base_extravars: Mapping[str, Any] | None = None,
        envvars: Mapping[str, str] | None = None,
        max_parallel: int = MAX_PARALLEL_RUNS,
        keep_artifacts: bool = False,
    ) -> None:
        self.playbooks_dir = Path(playbooks_dir)
        self.store = PlaybookStore(db_path)
        self.runner = PlaybookRunner(
            self.playbooks_dir,
            Path(work_dir) if work_dir else Path(db_path).parent / "playbook-runs",
            envvars=envvars,
            keep_artifacts=keep_artifacts,
        )
        self.inventory = inventory
        self.base_extravars = dict(base_extravars or {})
        self.runs_total = Counter(
            "fleet_playbook_runs_total",
            "Finished playbook runs by playbook and outcome",
            ["playbook", "status"],
            registry=registry or CollectorRegistry(),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="playbook-run")
        self._futures: dict[int, Future[None]] = {}
        # Runs a previous process left behind will never finish: say so instead of "running" forever.
        self.store.fail_unfinished("the server stopped before this run finished")

    # -- playbooks --------------------------------------------------------------------------------

    def playbooks(self) -> list[PlaybookInfo]:
        """The playbooks that can be run, with the description from their header comment."""
        return [
            PlaybookInfo(name=p.stem, file=p.name, description=_description(p))
            for p in sorted(self.playbooks_dir.glob("*.yml"))
        ]

    def _resolve(self, name: str) -> str:
        stem = name.removesuffix(".yml")
        # Only plain names from the listing: a request must not reach files outside the directory.
        if not _NAME_RE.match(stem) or not (self.playbooks_dir / f"{stem}.yml").is_file():
            raise UnknownPlaybook(name)
        return stem

    # -- runs -------------------------------------------------------------------------------------

    def start_run(
        self,
        playbook: str,
        *,
        started_by: str,
        target: str | None = None,
        extravars: Mapping[str, Any] | None = None,
        inventory: dict[str, Any] | str | None = None,
        limit: str | None = None,
    ) -> int:
        """Queue a run and return its id; it runs in a worker thread (queued → running → done)."""
        name = self._resolve(playbook)
        inventory = inventory if inventory is not None else self.inventory
        if inventory is None:
            raise NoInventory("no inventory configured for playbook runs")
        variables = {**self.base_extravars, **(extravars or {})}
        target = target or str(variables.get("terminal_id") or variables.get("office_id") or limit or "all")
        secrets = secret_values(variables)
        run_id = self.store.create_run(name, target, started_by, redact(variables, secrets))
        self._futures[run_id] = self._pool.submit(self._execute, run_id, name, variables, secrets, inventory, limit)
        return run_id

    def _execute(
        self,
        run_id: int,
        name: str,
        variables: dict[str, Any],
        secrets: set[str],
        inventory: dict[str, Any] | str,
        limit: str | None,
    ) -> None:
        status, rc, error = "failed", -1, ""
        try:
            self.store.mark_running(run_id)

            def record(event: TaskEvent) -> None:
                # ansible hides no_log results, but a secret can still surface in a failure message.
                clean = redact({"task": event.task, "message": event.message, "paths": event.paths}, secrets)
                self.store.add_event(
                    run_id,
                    event.host,
                    clean["task"],
                    event.action,
                    event.status,
                    event.duration_s,
                    clean["message"],
                    clean["paths"],
                    counted=not (event.status == "failed" and event.ignored),
                )

            outcome = self.runner.run(
                f"{name}.yml", inventory=inventory, extravars=variables, on_event=record, limit=limit, ident=str(run_id)
            )
            rc, error = outcome.rc, outcome.error
            if outcome.status == "successful" and outcome.rc == 0:
                status = "successful"
            elif not error:
                error = f"ansible-runner ended with status {outcome.status!r}, rc {outcome.rc}"
        except Exception as err:
            log.exception("playbook run %d (%s) crashed", run_id, name)
            error = f"{type(err).__name__}: {err}"
        finally:
            self.store.finish_run(run_id, status, rc, str(redact(error, secrets)))
            self.runs_total.labels(playbook=name, status=status).inc()

    def wait(self, run_id: int, timeout_s: float | None = None) -> RunDetail:
        """Block until run `run_id` has finished (or `timeout_s` passed); return it."""
        future = self._futures.get(run_id)
        if future is not None:
            future.result(timeout=timeout_s)
        return self.get_run(run_id)

    def get_run(self, run_id: int) -> RunDetail:
        """One run with its task events in order."""
        row = self.store.get_run(run_id)
        if row is None:
            raise RunNotFound(run_id)
        events = [TaskEventPublic(**e) for e in self.store.events(run_id)]
        return RunDetail(**_public(row).model_dump(), events=events)

    def runs(self, limit: int = 50, playbook: str | None = None, target: str | None = None) -> list[RunPublic]:
        """Recent runs, newest first."""
        return [_public(r) for r in self.store.runs(limit, playbook, target)]

    def close(self, wait: bool = True) -> None:
        """Stop taking runs; with `wait`, let running ones finish."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def _public(row: dict[str, Any]) -> RunPublic:
    doc = dict(row)
    for key in ("ok", "changed", "failed", "skipped"):
        doc[key] = doc.pop(f"{key}_count")
    return RunPublic(**doc)


def _description(path: Path) -> str:
    """The playbook's leading comment block, joined into one paragraph."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() in ("", "---") and not lines:
            continue
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)
