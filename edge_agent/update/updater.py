"""The terminal's updater: desired release in, verified install, trial, health gate, commit or
rollback out. Runs on its own thread: the pump only hands it the cmd payloads.

Phases of a job (persisted after every step, so a kill -9 anywhere resumes from the last one):

    verify    refresh TUF, read the signed description, refuse what must not be installed
    download  the target and the dependency wheels the wheel cache lacks (TUF-verified, resumable)
    wait      until the maintenance window (or the deadline) and no open citizen session
    install   build releases/<version>-<sha8>/ (config: the settings overlay), record the trial,
              switch `current`, exit with EXIT_RESTART so the launcher starts the new version
    trial     (in the new version) report on_trial, run the health gate, commit or roll back
    done

Only the signed target says what a release is (kind, version, counter, profiles, wheels); the
command says which target and when.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__, launcher
from edge_agent.update import face_model, overlay
from edge_agent.update.install import (
    Artifact,
    InstallFailed,
    build_release,
    find_pip_wheel,
    prune_releases,
    release_name,
)
from edge_agent.update.store import UpdateStore
from edge_agent.update.timing import install_wait_reason, parse_deadline
from fleet_wire.errors import WireError
from fleet_wire.events import UpdateStatus
from fleet_wire.release import DesiredRelease, ReleaseInfo, decode_desired

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_RETRY_S = 30.0
EARLY_PHASES = frozenset({"verify", "download", "wait"})  # a newer command may replace these


def running_release(root: Path | None) -> str | None:
    """The release directory this process runs from, when it runs from one under `root`."""
    if root is None:
        return None
    prefix = Path(sys.prefix).resolve()
    releases = (root / launcher.RELEASES).resolve()
    return prefix.name if prefix.parent == releases else None


def _now() -> datetime:
    return datetime.now(UTC)


class Updater:
    """Owns one terminal's update jobs. `submit()` is called from the pump with a cmd payload."""

    def __init__(self, agent: Agent, *, trust_factory: Any = None) -> None:
        self.agent = agent
        s = agent.settings
        self.settings = s
        self.root = s.install_root
        self.dir = s.data_dir / "update"
        self.store = UpdateStore(self.dir / "state.json")
        self.running = running_release(self.root)
        self.bad_cmds = 0
        self.errors = 0
        self._inbox: queue.SimpleQueue[DesiredRelease] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trust_factory = trust_factory
        self._trust: Any = None
        self._gate_started: float | None = None
        self._gate_link_seen = False
        self._retry_at = 0.0
        self._on_trial = False  # this process was started for the trial of the job in progress
        self.metadata_expires: str | None = None

    # -- called from other threads -------------------------------------------------------------

    def submit(self, payload: bytes) -> None:
        """A cmd message: decode it (a malformed one is logged and counted, never raised)."""
        try:
            desired = decode_desired(payload)
        except WireError as err:
            self.bad_cmds += 1
            log.warning("ignored malformed update command: %s", err)
            return
        self._inbox.put(desired)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"update-{self.settings.terminal_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def status(self) -> dict[str, Any]:
        """What the local API shows (`GET /v1/update`): nothing secret, nothing writable."""
        try:
            doc = self.store.snapshot()
        except RuntimeError:  # the updater thread changed the document mid-copy: take it again
            doc = self.store.snapshot()
        job = doc["job"]
        trial = launcher.read_state(self.root)["trial"] if self.root is not None else None
        return {
            "running": {"version": __version__, "release": self.running},
            "enabled": self.enabled,
            "bad_commands": self.bad_cmds,
            "open_sessions": len(self.agent.sessions.open_sessions()),
            "committed": doc["committed"],
            "failed": doc["failed"],
            "job": None
            if job is None
            else {
                "rollout": job["cmd"]["rollout"],
                "kind": job["cmd"]["kind"],
                "target": job["cmd"]["target"],
                "phase": job["phase"],
                "state": job.get("last_state"),
                "reports": job["report"],
                "release": job.get("release"),
            },
            "trial": trial,
            "metadata_expires": self.metadata_expires,
        }

    @property
    def enabled(self) -> bool:
        return bool(self.settings.update_repo_url and self.settings.update_root_file and self.root is not None)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume()
        except Exception:
            self.errors += 1
            log.exception("update state could not be resumed; continuing")
        while not self._stop.is_set():
            try:
                while True:
                    try:
                        self._accept(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                self._step()
            except Exception:
                self.errors += 1
                log.exception("update step failed; retrying")
                self._stop.wait(5.0)
            self._stop.wait(self.settings.update_tick_s)

    def _resume(self) -> None:
        self._flush()
        if self.root is None:
            return
        self._prune_failed()
        self._resume_job()

    def _prune_failed(self) -> None:
        """Remove the directories of releases that failed here (they are never started again)."""
        assert self.root is not None
        current = launcher.current_release(self.root)
        for name in launcher.read_state(self.root)["failed"]:
            path = launcher.release_dir(self.root, name)
            if "/" not in name and name != current and name != self.running and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed failed release %s", name)

    def _resume_job(self) -> None:
        assert self.root is not None
        job = self.store.job
        state = launcher.read_state(self.root)
        trial = state["trial"]
        note = launcher.take_rolled_back(self.root)
        if job is None:
            return
        ours = trial is not None and trial.get("job") == job["cmd"]["id"]
        if job["phase"] != "done" and self.enabled:
            self._note_expiry()
        if job["phase"] == "done":
            if ours and job.get("last_state") == "committed":
                launcher.clear_trial(self.root)  # cut between the commit and clearing the trial
            elif ours and job.get("last_state") == "rolled_back":
                self._finish_rollback(job)  # cut between the report and the switch back
            return
        if note is not None and note.get("job") == job["cmd"]["id"]:
            # the launcher rolled the crash-looping release back: say so from the old version
            self._fail_job(job, note.get("reason", "crash_loop"), "rolled_back", self._detail(note))
            return
        if job["phase"] == "install":
            job["phase"] = "wait"  # a cut mid-install: check window and sessions again, then rebuild
            self.store.save()
        elif job["phase"] == "trial":
            if ours:
                self._on_trial = True
            else:
                # cut between the trial record and the switch: the launcher ended the trial
                log.warning("update %s: the switch did not happen; installing again", job["cmd"]["target"])
                job["phase"] = "wait"
                self.store.save()

    @staticmethod
    def _detail(note: dict[str, Any]) -> str:
        reason = note.get("reason", "")
        if reason == "crash_loop":
            return f"release {note.get('release')} kept crashing at start; back on the previous release"
        return str(note.get("detail", ""))

    def _accept(self, desired: DesiredRelease) -> None:
        job = self.store.job
        if job is not None and job["cmd"]["id"] == desired.id:
            return  # the server re-sends until it hears from us; our reports are in the outbox
        if job is not None and job["phase"] != "done":
            if job["cmd"]["kind"] == desired.kind and job["phase"] in EARLY_PHASES:
                job["phase"] = "done"  # saved with the report
                self._report(job, "failed", "superseded", f"replaced by {desired.target}")
            else:
                self.store.doc["pending"] = desired.model_dump(mode="json")
                self.store.save()
                return
        self._new_job(desired)

    def _new_job(self, desired: DesiredRelease) -> None:
        # whatever trial this process was started for is over: the new job's gate runs in the
        # process started for it, never in this one on its way out
        self._on_trial = False
        self.store.doc["job"] = {
            "cmd": desired.model_dump(mode="json"),
            "phase": "verify",
            "report": 0,
            "last_state": None,
            "attempts": 0,
        }
        self.store.doc["pending"] = None
        job = self.store.job
        assert job is not None
        self._report(job, "notified")

    def _step(self) -> None:
        job = self.store.job
        if job is None or job["phase"] == "done":
            pending = self.store.doc.get("pending")
            if pending:
                self._new_job(DesiredRelease.model_validate_json(json.dumps(pending)))
            return
        if time.monotonic() < self._retry_at:
            return
        phase = job["phase"]
        if phase == "verify":
            self._verify(job)
        elif phase == "download":
            self._download(job)
        elif phase == "wait":
            self._wait(job)
        elif phase == "install":
            self._install(job)
        elif phase == "trial":
            self._gate(job)

    # -- phases --------------------------------------------------------------------------------

    def _client(self) -> Any:
        from edge_agent.update.trust import TrustClient

        if self._trust_factory is not None:
            return self._trust_factory()
        assert self.settings.update_root_file is not None
        return TrustClient(
            self.dir / "tuf",
            self.settings.update_repo_url,
            Path(self.settings.update_root_file).read_bytes(),
            self.dir / "downloads",
            timeout_s=self.settings.update_fetch_timeout_s,
        )

    def _refreshed(self) -> Any:
        client = self._client()
        client.refresh()
        try:
            self.metadata_expires = client.expires().astimezone(UTC).isoformat().replace("+00:00", "Z")
        except (RuntimeError, OSError, ValueError):
            self.metadata_expires = None
        return client

    def _note_expiry(self) -> None:
        """Learn when the trusted metadata expires (a new process reports it too); offline is fine."""
        from edge_agent.update.trust import TrustError

        try:
            self._refreshed()
        except (TrustError, OSError, ValueError) as err:
            log.info("release metadata not refreshed at start: %s", err)

    def _verify(self, job: dict[str, Any]) -> None:
        from edge_agent.update.trust import TrustError

        cmd = job["cmd"]
        if not self.enabled:
            why = "this terminal has no release repository or trusted root configured, or is not in the A/B layout"
            self._fail_job(job, "bad_signature", "rejected", why)
            return
        try:
            client = self._refreshed()
            info: ReleaseInfo = client.release(cmd["target"])
        except TrustError as err:
            if err.reason == "download_failed":
                self._retry(job, err.reason, str(err))
            else:
                self._fail_job(job, err.reason, "rejected", str(err))
            return
        self._trust = client
        job["info"] = info.model_dump(mode="json")
        refusal = self._refusal(cmd, info)
        if refusal is not None:
            reason, state, detail = refusal
            if state == "committed":
                self._report(job, "committed", "ok", detail)
                job["phase"] = "done"
                self.store.save()
            else:
                self._fail_job(job, reason, state, detail)
            return
        job["phase"] = "download"
        job["attempts"] = 0
        self._report(job, "downloading")
        self._download(job)

    def _refusal(self, cmd: dict[str, Any], info: ReleaseInfo) -> tuple[str, str, str] | None:
        kind = info.kind
        if kind != cmd["kind"]:
            return (
                "not_a_release",
                "rejected",
                f"the signed release is a {kind} release, the command said {cmd['kind']}",
            )
        if kind == "face_model":
            folder = cmd["target"].rsplit("/", 1)[0] + "/"
            if info.threshold_milli is None or not info.files:
                return ("not_a_release", "rejected", "the face-model release names no threshold or no model files")
            if any(f.rsplit("/", 1)[0] + "/" != folder for f in info.files):
                return ("not_a_release", "rejected", f"the face-model release names files outside {folder}")
        if kind == "config":
            try:
                overlay.validate(info.settings)
            except overlay.OverlayRefused as err:
                return ("not_a_release", "rejected", str(err))
        committed = self.store.committed(kind)
        if committed is not None:
            if committed["counter"] == info.counter and committed["target"] == cmd["target"]:
                return ("ok", "committed", "already committed on this terminal")
            if info.counter <= committed["counter"]:
                return (
                    "counter_downgrade",
                    "rejected",
                    f"release counter {info.counter} is not above the committed {committed['counter']}",
                )
        profile = self.agent.health_monitor.profile.id
        if not info.fits(profile):
            return ("incompatible_profile", "rejected", f"the release lists {list(info.profiles)}, not {profile!r}")
        failed = set(self.store.doc["failed"])
        if self.root is not None:
            failed |= set(launcher.read_state(self.root)["failed"])
        if cmd["target"] in failed or self._release_key(cmd["target"], info) in failed:
            return ("refused_before", "rejected", f"{cmd['target']} already failed on this terminal")
        return None

    def _release_key(self, target: str, info: ReleaseInfo) -> str:
        return f"{info.kind}:{info.version}:{info.counter}:{target}"

    def _download(self, job: dict[str, Any]) -> None:
        from edge_agent.update.trust import TrustError

        cmd = job["cmd"]
        info = _info(job)
        try:
            client = self._trust or self._refreshed()
            target = client.fetch(cmd["target"])
            files = [{"file": str(target.file), "sha256": target.sha256}]
            if info.kind == "face_model":
                files = []
                for path in sorted(set(info.files) | {cmd["target"]}):
                    got = client.fetch(path)
                    files.append({"file": str(got.file), "sha256": got.sha256})
            for wheel in info.wheels:
                got = client.fetch(wheel.path)
                if got.sha256 != wheel.sha256:
                    raise TrustError("tampered", f"{wheel.path} does not match the hash the release pins")
                files.append({"file": str(got.file), "sha256": got.sha256})
        except TrustError as err:
            self._trust = None
            if err.reason == "download_failed":
                self._retry(job, err.reason, str(err))
            else:
                self._fail_job(job, err.reason, "rejected", str(err))
            return
        job["files"] = files
        job["release"] = release_name(info.version, target.sha256)
        job["phase"] = "wait"
        self._trust = None
        self._report(job, "downloaded")
        self._wait(job)

    def _retry(self, job: dict[str, Any], reason: str, detail: str) -> None:
        job["attempts"] = int(job.get("attempts", 0)) + 1
        self._trust = None
        if job["attempts"] >= DOWNLOAD_ATTEMPTS:
            self._fail_job(job, reason, "failed", detail)
            return
        log.warning("update %s: %s (attempt %d); retrying", job["cmd"]["target"], detail, job["attempts"])
        self._retry_at = time.monotonic() + DOWNLOAD_RETRY_S
        self.store.save()

    def _wait(self, job: dict[str, Any]) -> None:
        cmd = job["cmd"]
        desired = DesiredRelease.model_validate_json(json.dumps(cmd))
        reason = install_wait_reason(
            _now(), desired.window, parse_deadline(desired.deadline), len(self.agent.sessions.open_sessions())
        )
        if reason is not None:
            if job.get("last_state") != reason:
                self._report(job, reason)
            return
        job["phase"] = "install"
        self._report(job, "installing")
        self._install(job)

    def _install(self, job: dict[str, Any]) -> None:
        assert self.root is not None
        cmd = job["cmd"]
        info = _info(job)
        previous = launcher.current_release(self.root)
        # the previous version could reach the server: then the new one must be heard by it too
        last = self.agent.last_receipt_at
        job["reachable_before"] = last is not None and time.time() - last < self.settings.update_reach_window_s
        if info.kind == "config":
            try:
                overlay.write_trial(self.dir, info.settings)
            except overlay.OverlayRefused as err:
                self._fail_job(job, "install_failed", "failed", str(err))
                return
            job["trial_release"] = previous
        elif info.kind == "face_model":
            if not self._install_face_model(job, info):
                return
            job["trial_release"] = previous
        else:
            try:
                pip_wheel = find_pip_wheel(self.root, self.settings.update_pip_wheel)
                artifacts = [Artifact(Path(f["file"]), f["sha256"]) for f in job["files"]]
                build_release(self.root, job["release"], artifacts, pip_wheel, sys.executable)
            except InstallFailed as err:
                self._fail_job(job, err.reason, "failed", str(err))
                return
            job["trial_release"] = job["release"]
        job["previous"] = previous
        job["phase"] = "trial"
        self.store.save()
        launcher.record_trial(
            self.root,
            job["trial_release"] or "",
            previous,
            job=cmd["id"],
            max_crashes=self.settings.update_max_crashes,
        )
        if info.kind == "agent":
            launcher.switch_current(self.root, job["release"])
        log.info("update %s installed; restarting into it", cmd["target"])
        self.agent.request_restart()

    def _install_face_model(self, job: dict[str, Any], info: ReleaseInfo) -> bool:
        """Stage the model files and self-test them on the golden images; write the trial pointer."""
        assert info.threshold_milli is not None
        data_dir = self.settings.data_dir
        try:
            model = face_model.stage(data_dir, job["release"], info.version, info.threshold_milli, job["files"])
        except OSError as err:
            self._fail_job(job, "install_failed", "failed", f"the model files could not be staged: {err}")
            return False
        try:
            result = face_model.self_test(model)
        except face_model.SelfTestFailed as err:
            face_model.prune(data_dir)  # the staged files, unless a pointer names them (a republish)
            self._fail_job(job, "self_test_failed", "rejected", str(err))
            return False
        log.info("update %s: self-test passed (%s)", job["cmd"]["target"], result)
        face_model.write_trial(data_dir, model)
        return True

    def _gate(self, job: dict[str, Any]) -> None:
        if not self._on_trial:
            return  # the old process, between the switch and its exit
        cmd = job["cmd"]
        if not job.get("on_trial_reported"):
            item = self._report(job, "on_trial")
            job["on_trial_reported"] = True
            job["on_trial_seq"] = item
            self.store.save()
        now = time.monotonic()
        if self._gate_started is None:
            # per process start: a restart during the gate starts it again (the launcher counts
            # unclean restarts and rolls a crash loop back)
            self._gate_started = now
        agent = self.agent
        if agent.link.connected:
            self._gate_link_seen = True
        problem = None
        if not agent.alive():
            problem = "the agent's pump is not turning"
        failing = [pid for pid, p in agent.health_monitor.peripherals().items() if p.get("state") == "fail"]
        if failing:
            problem = f"peripherals failing: {', '.join(sorted(failing))}"
        if problem is not None:
            self._rollback(job, "gate_failed", problem)
            return
        if now - self._gate_started < float(cmd.get("gate_s", 120.0)):
            return
        info = _info(job)
        loaded = getattr(agent, "face_model_version", None)
        if info.kind == "face_model" and loaded != info.version:
            why = "face login did not start" if loaded is None else f"face login runs model {loaded}"
            self._rollback(job, "gate_failed", f"{why}, not the new model {info.version}")
            return
        if job.get("reachable_before"):
            if not self._gate_link_seen:
                self._rollback(job, "gate_failed", "the new version never connected to the broker")
                return
            seq = job.get("on_trial_seq")
            if seq is not None and agent.outbox.get([seq], 1 << 20):
                self._rollback(job, "gate_unacknowledged", "the server did not acknowledge the new version in time")
                return
        self._commit(job)

    def _commit(self, job: dict[str, Any]) -> None:
        assert self.root is not None
        cmd = job["cmd"]
        info = _info(job)
        if info.kind == "config":
            overlay.commit_trial(self.dir)
        elif info.kind == "face_model":
            face_model.commit_trial(self.settings.data_dir)
            face_model.prune(self.settings.data_dir)
        self.store.doc["committed"][info.kind] = {
            "counter": info.counter,
            "target": cmd["target"],
            "version": info.version,
            "release": job.get("trial_release"),
        }
        job["phase"] = "done"
        self._report(job, "committed")
        launcher.clear_trial(self.root)
        if info.kind == "agent":
            keep = {n for n in (job.get("release"), job.get("previous")) if n}
            removed = prune_releases(self.root, keep)
            if removed:
                log.info("removed old releases %s", removed)
        log.info("update %s committed", cmd["target"])

    def _rollback(self, job: dict[str, Any], reason: str, detail: str) -> None:
        cmd = job["cmd"]
        info = _info(job)
        log.error("update %s rolled back: %s", cmd["target"], detail)
        key = self._release_key(cmd["target"], info)
        if key not in self.store.doc["failed"]:
            self.store.doc["failed"].append(key)
        job["phase"] = "done"
        job["rollback_reason"] = reason
        self._report(job, "rolled_back", reason, detail)
        self._finish_rollback(job)

    def _finish_rollback(self, job: dict[str, Any]) -> None:
        assert self.root is not None
        info = _info(job)
        reason = str(job.get("rollback_reason", "gate_failed"))
        if info.kind in ("config", "face_model"):
            overlay.drop_trial(self.dir)
            face_model.drop_trial(self.settings.data_dir)
            launcher.mark_failed(self.root, self._release_key(job["cmd"]["target"], info), reason)
        else:
            launcher.mark_failed(self.root, job["release"], reason, switch_to=job.get("previous"))
        launcher.take_rolled_back(self.root)  # reported already, from here
        self.agent.request_restart()

    def _fail_job(self, job: dict[str, Any], reason: str, state: str, detail: str) -> None:
        cmd = job["cmd"]
        if state == "rolled_back" and job.get("info"):
            info = _info(job)
            key = self._release_key(cmd["target"], info)
            if key not in self.store.doc["failed"]:
                self.store.doc["failed"].append(key)
            if info.kind == "config":
                overlay.drop_trial(self.dir)
            elif info.kind == "face_model":
                face_model.drop_trial(self.settings.data_dir)
        job["phase"] = "done"
        log.warning("update %s: %s (%s)", cmd["target"], state, detail)
        self._report(job, state, reason, detail)

    # -- reports -------------------------------------------------------------------------------

    def _report(self, job: dict[str, Any], state: str, reason: str = "ok", detail: str = "") -> int | None:
        """Persist the next report of this job, then put it in the outbox; returns its seq."""
        cmd = job["cmd"]
        info = job.get("info") or {}
        job["report"] = int(job["report"]) + 1
        job["last_state"] = state
        body = UpdateStatus(
            rollout=cmd["rollout"],
            cmd=cmd["id"],
            kind=cmd["kind"],
            target=cmd["target"],
            version=info.get("version", cmd["version"]),
            counter=info.get("counter", cmd["counter"]),
            state=state,  # type: ignore[arg-type]
            report=job["report"],
            reason=reason,
            detail=detail[:500],
            running=__version__,
            metadata_expires=self.metadata_expires,
        ).model_dump(mode="json")
        key = f"update:{cmd['id']}:{job['report']}"
        self.store.doc["outgoing"].append({"key": key, "body": body})
        self.store.save()
        seqs = self._flush()
        return seqs.get(key)

    def _flush(self) -> dict[str, int]:
        """Move persisted reports into the outbox (idempotent by key)."""
        out = self.store.doc["outgoing"]
        seqs: dict[str, int] = {}
        if not out:
            return seqs
        for entry in list(out):
            item = self.agent.post_event("update.status", entry["body"], key=entry["key"])
            seqs[entry["key"]] = item.seq
            out.remove(entry)
        self.store.save()
        return seqs


def _info(job: dict[str, Any]) -> ReleaseInfo:
    # strict models take JSON arrays as tuples only through model_validate_json
    return ReleaseInfo.model_validate_json(json.dumps(job["info"]))


def startup_overlay(data_dir: Path, root: Path | None) -> dict[str, Any]:
    """The config-release settings to apply at start (the trial ones while a config release is on
    trial and this start belongs to that trial)."""
    return overlay.load(data_dir / "update", _start_on_trial(data_dir, root, "config"))


def startup_face_model(data_dir: Path, root: Path | None) -> face_model.ActiveModel | None:
    """The face model to load at start: the trial one while a face-model release is on trial and
    this start belongs to that trial, else the committed one; None for the packaged model."""
    return face_model.load(data_dir, _start_on_trial(data_dir, root, "face_model"))


def _start_on_trial(data_dir: Path, root: Path | None, kind: str) -> bool:
    """Whether this start belongs to the trial of a release of `kind` (the launcher's trial is
    that job's, and the job is in its trial phase)."""
    if root is None:
        return False
    trial = launcher.read_state(root)["trial"]
    job = UpdateStore(data_dir / "update" / "state.json").job
    return (
        trial is not None
        and job is not None
        and job["cmd"]["kind"] == kind
        and job["phase"] == "trial"
        and trial.get("job") == job["cmd"]["id"]
    )


def note_clean_stop(root: Path | None) -> None:
    """Tell the launcher this stop was clean (the next start is no crash)."""
    if root is not None and (root / launcher.RELEASES).is_dir():
        launcher.write_clean_stop(root, running_release(root) or "")
