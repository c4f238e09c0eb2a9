"""Rollouts as the API, the CLI and the console see them: plan, preview, create, the admin
controls (each audited), and what a rollout, a wave, an office or a terminal is doing and why."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from fleet_server.auth.errors import NotAllowed
from fleet_server.auth.models import Role, User
from fleet_server.db import connect
from fleet_server.rollouts.engine import EngineSettings, RolloutEngine, TerminalCondition, TickStats, _ts
from fleet_server.rollouts.errors import BadPlan, RolloutConflict, UnknownRelease, UnknownRollout
from fleet_server.rollouts.metrics import RolloutMetrics
from fleet_server.rollouts.planner import OfficeRef, TerminalInfo, plan_waves
from fleet_server.rollouts.releases import ReleaseLike, ReleaseSource
from fleet_server.rollouts.schemas import (
    FAILED,
    LIVE,
    NOT_COUNTED,
    SERVER_STATES,
    FailureLimit,
    RollbackRequest,
    RolloutPlan,
    Size,
    Targets,
    WavePlan,
)
from fleet_server.rollouts.store import T_ATTEMPTS, RolloutStore
from fleet_wire.storage import transaction

SYSTEM = "rollout-engine"  # the actor of what the engine does by itself (automatic rollback)
STALE_METADATA_S = 24 * 3600.0  # metadata expiring within a day is flagged in a preview


def _iso(at: float | None) -> str | None:
    return _ts(at) if at is not None else None


class RolloutService:
    def __init__(
        self,
        db_path: str,
        *,
        releases: Callable[[], ReleaseSource | None],
        terminals: Callable[[], list[TerminalInfo]],
        offices: Callable[[], dict[str, OfficeRef]],
        health: Callable[[], Mapping[str, TerminalCondition]],
        publish: Callable[[str, bytes], None],
        audit: Callable[[User | str, str, str, Any, Any], Any],
        registry: CollectorRegistry,
        settings: EngineSettings | None = None,
        low_disk_pct: float = 90.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db_path = db_path
        self._releases = releases
        self._terminals = terminals
        self._offices = offices
        self._health = health
        self._audit = audit
        self.low_disk_pct = low_disk_pct
        self.clock = clock
        self.lock = threading.RLock()
        self._conn = connect(db_path)
        self.store = RolloutStore(self._conn)
        self.metrics = RolloutMetrics(registry)
        self.engine = RolloutEngine(
            self.store,
            self.lock,
            publish,
            terminals=terminals,
            offices=offices,
            health=health,
            metrics=self.metrics,
            settings=settings,
            clock=clock,
            on_halt_rollback=self._auto_rollback,
        )

    def close(self) -> None:
        with self.lock:
            self._conn.close()

    def tick(self) -> TickStats:
        return self.engine.tick()

    def use_releases(self, source: ReleaseSource) -> None:
        """Take releases from `source` instead of the server's release service."""
        self._releases = lambda: source

    def registry_changed(self) -> None:
        self.engine.registry_changed()

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _require_admin(user: User) -> None:
        if user.role is not Role.ADMIN:
            raise NotAllowed(f"role {user.role.value!r} may read rollouts but not change them; needs admin")

    def _release(self, path: str, where: str = "release") -> ReleaseLike:
        source = self._releases()
        if source is None:
            raise UnknownRelease(f"{where}: no release repository is configured on this server")
        rel = source.get(path)
        if rel is None:
            raise UnknownRelease(f"{where}: {path!r} is not a published release")
        return rel

    def _rollout(self, rollout_id: str) -> dict[str, Any]:
        doc = self.store.rollout(rollout_id)
        if doc is None:
            raise UnknownRollout(f"no rollout {rollout_id!r}")
        return doc

    def _new_id(self, release: ReleaseLike) -> str:
        base = re.sub(r"[^a-z0-9-]+", "-", f"{release.kind}-{release.version}".lower()).strip("-")[:50] or "rollout"
        return f"{base}-{uuid.uuid4().hex[:6]}"

    # -- planning ------------------------------------------------------------------------------------

    def preview(self, plan: RolloutPlan) -> dict[str, Any]:
        """Which terminals each wave would hit, each flagged (offline, low disk, stale metadata)."""
        release = self._release(plan.release)
        offices = self._offices()
        planned = plan_waves(plan, release, self._terminals(), offices)
        return self._describe_plan(plan, release, planned.waves, planned.excluded, offices)

    def _describe_plan(
        self,
        plan: RolloutPlan,
        release: ReleaseLike,
        waves: list[list[TerminalInfo]],
        excluded: list[tuple[str, str]],
        offices: dict[str, OfficeRef],
    ) -> dict[str, Any]:
        health = self._health()
        with self.lock:
            meta = self.store.meta()
        now = self.clock()
        flagged = 0
        out_waves = []
        for i, (wplan, members) in enumerate(zip(plan.waves, waves, strict=True)):
            terms = []
            per_office: dict[str, int] = {}
            for t in sorted(members, key=lambda t: (t.office, t.id)):
                flags = self._flags(t.id, health, meta, now)
                flagged += bool(flags)
                per_office[t.office] = per_office.get(t.office, 0) + 1
                terms.append(
                    {
                        "terminal": t.id,
                        "office": t.office,
                        "office_name": offices[t.office].name if t.office in offices else t.office,
                        "profile": t.profile,
                        "flags": flags,
                    }
                )
            out_waves.append(
                {
                    "wave": i + 1,
                    "name": wplan.name,
                    "size": len(members),
                    "soak_s": wplan.soak_s,
                    "on_success": wplan.on_success,
                    "offices": per_office,
                    "terminals": terms,
                }
            )
        return {
            "release": {
                "path": release.path,
                "kind": release.kind,
                "version": release.version,
                "counter": release.counter,
                "profiles": list(release.profiles),
            },
            "terminals": sum(len(w) for w in waves),
            "flagged": flagged,
            "excluded": [{"terminal": t, "why": why} for t, why in excluded],
            "waves": out_waves,
        }

    def _flags(
        self, tid: str, health: Mapping[str, TerminalCondition], meta: dict[str, tuple[str | None, str]], now: float
    ) -> list[str]:
        flags = []
        cond = health.get(tid)
        if cond is None or cond.state != "online":
            flags.append(cond.state if cond is not None and cond.state else "offline")
        if cond is not None and cond.disk_pct is not None and cond.disk_pct >= self.low_disk_pct:
            flags.append("low_disk")
        expires = meta.get(tid, (None, ""))[0]
        if expires:
            try:
                at = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
                if at - now < STALE_METADATA_S:
                    flags.append("stale_metadata")
            except ValueError:
                flags.append("stale_metadata")
        return flags

    def create(self, plan: RolloutPlan, user: User) -> dict[str, Any]:
        self._require_admin(user)
        release = self._release(plan.release)
        offices = self._offices()
        planned = plan_waves(plan, release, self._terminals(), offices)
        rid = plan.id or self._new_id(release)
        plan = plan.model_copy(update={"id": rid})
        self._insert(rid, plan, release, planned.waves, user.name, parent=None)
        self._audit(
            user, "rollout.create", rid, None, {"release": release.path, "waves": [len(w) for w in planned.waves]}
        )
        doc = self._describe_plan(plan, release, planned.waves, planned.excluded, offices)
        return {"rollout": self.get(rid), "preview": doc}

    def _insert(
        self,
        rid: str,
        plan: RolloutPlan,
        release: ReleaseLike,
        waves: list[list[TerminalInfo]],
        creator: str,
        parent: str | None,
    ) -> None:
        now = self.clock()
        state = "awaiting_approval" if plan.approval_required else "running"
        doc = {
            "id": rid,
            "release": release.path,
            "kind": release.kind,
            "version": release.version,
            "counter": release.counter,
            "profiles": list(release.profiles),
            "plan": plan.model_dump(mode="json"),
            "state": state,
            "current_wave": 0 if plan.approval_required else 1,
            "reason": "waiting for a second admin's approval" if plan.approval_required else "",
            "reason_code": "approval" if plan.approval_required else "",
            "created_by": creator,
            "created_at": _ts(now),
            "updated_at": _ts(now),
            "parent": parent,
        }
        wave_rows = [
            (i + 1, w.name, "running" if (i == 0 and not plan.approval_required) else "pending", len(members))
            for i, (w, members) in enumerate(zip(plan.waves, waves, strict=True))
        ]
        terminal_rows = [(t.id, i + 1, t.office, uuid.uuid4().hex) for i, members in enumerate(waves) for t in members]
        with self.lock, transaction(self._conn):
            if self.store.exists(rid):
                raise RolloutConflict(f"a rollout {rid!r} exists already; choose another id")
            self.store.insert_rollout(doc, wave_rows, terminal_rows)
            if not plan.approval_required:
                self.store.update_waves([self._wave_started(rid, 1, now)])

    def _wave_started(self, rid: str, idx: int, now: float) -> dict[str, Any]:
        wave = self.store.waves([rid])[rid][idx - 1]
        wave.update(state="running", started_at=now, note="started")
        return wave

    # -- controls ------------------------------------------------------------------------------------

    def approve(self, rollout_id: str, user: User, note: str = "") -> dict[str, Any]:
        self._require_admin(user)
        with self.lock, transaction(self._conn):
            r = self._rollout(rollout_id)
            if r["state"] not in ("awaiting_approval", "waiting_approval"):
                raise RolloutConflict(f"rollout {rollout_id!r} is {r['state']}; nothing waits for approval")
            if r["created_by"] == user.name:
                raise NotAllowed(f"rollout {rollout_id!r} was created by {user.name!r}; a second admin must approve it")
            now = self.clock()
            nxt = r["current_wave"] + 1
            waves = self.store.waves([rollout_id])[rollout_id]
            changes: list[dict[str, Any]] = []
            self.engine.start_wave(r, waves, nxt, now, changes)
            self.store.update_waves(changes)
            self.store.update_rollout(rollout_id, approved_by=user.name, approved_at=_ts(now))
        self._audit(
            user, "rollout.approve", rollout_id, {"state": r["state"]}, {"state": "running", "wave": nxt, "note": note}
        )
        return self.get(rollout_id)

    def pause(self, rollout_id: str, user: User, note: str = "") -> dict[str, Any]:
        self._require_admin(user)
        with self.lock, transaction(self._conn):
            r = self._rollout(rollout_id)
            if r["state"] not in ("running", "waiting_approval", "awaiting_approval"):
                raise RolloutConflict(f"rollout {rollout_id!r} is {r['state']}; only a running one can be paused")
            reason = f"paused by {user.name}" + (f": {note}" if note else "")
            self.store.update_rollout(
                rollout_id,
                state="paused",
                reason=reason,
                reason_code=f"paused:{r['state']}",
                updated_at=_ts(self.clock()),
            )
        self._audit(user, "rollout.pause", rollout_id, {"state": r["state"]}, {"state": "paused", "note": note})
        return self.get(rollout_id)

    def resume(self, rollout_id: str, user: User, note: str = "") -> dict[str, Any]:
        """Continue a paused rollout, or a halted one: the failures that halted it are accepted (the
        wave's limit then counts new failures only)."""
        self._require_admin(user)
        with self.lock, transaction(self._conn):
            r = self._rollout(rollout_id)
            if r["state"] not in ("paused", "halted"):
                raise RolloutConflict(f"rollout {rollout_id!r} is {r['state']}; only a paused or halted one resumes")
            to = "running"
            if r["state"] == "paused" and r["reason_code"].startswith("paused:"):
                to = r["reason_code"].split(":", 1)[1]
            reason = {"waiting_approval": "waiting for an admin to approve the next wave"}.get(to, "")
            if to == "awaiting_approval":
                reason = "waiting for a second admin's approval"
            if r["state"] == "halted":
                wave = self.store.waves([rollout_id])[rollout_id][r["current_wave"] - 1]
                failed = sum(
                    1
                    for t in self.store.terminals_of(rollout_id, r["current_wave"])
                    if t["state"] in FAILED and t["retry_at"] is None and t["reason"] not in NOT_COUNTED
                )
                wave.update(
                    state="running", forgiven=failed, note=f"resumed by {user.name}; {failed} failure(s) accepted"
                )
                self.store.update_waves([wave])
            self.store.update_rollout(
                rollout_id,
                state=to,
                reason=reason,
                reason_code="" if to == "running" else to,
                updated_at=_ts(self.clock()),
            )
        self._audit(
            user,
            "rollout.resume",
            rollout_id,
            {"state": r["state"], "reason": r["reason"]},
            {"state": to, "note": note},
        )
        return self.get(rollout_id)

    def abort(self, rollout_id: str, user: User, note: str = "") -> dict[str, Any]:
        self._require_admin(user)
        with self.lock, transaction(self._conn):
            r = self._rollout(rollout_id)
            if r["state"] not in LIVE:
                raise RolloutConflict(f"rollout {rollout_id!r} is {r['state']} already")
            reason = f"aborted by {user.name}" + (f": {note}" if note else "")
            self.store.update_rollout(
                rollout_id, state="aborted", reason=reason, reason_code="aborted", updated_at=_ts(self.clock())
            )
        self._audit(user, "rollout.abort", rollout_id, {"state": r["state"]}, {"state": "aborted", "note": note})
        return self.get(rollout_id)

    def retry(self, rollout_id: str, user: User, wave: int | None = None, note: str = "") -> dict[str, Any]:
        """Send the release again to the failed terminals only (of one wave, or of every wave so far)."""
        self._require_admin(user)
        with self.lock, transaction(self._conn):
            r = self._rollout(rollout_id)
            if r["state"] not in LIVE and r["state"] != "completed":
                raise RolloutConflict(f"rollout {rollout_id!r} is {r['state']}; nothing to retry")
            if wave is not None and not 1 <= wave <= r["current_wave"]:
                raise RolloutConflict(f"wave {wave} of {rollout_id!r} has not started; nothing to retry there")
            keys = [
                (rollout_id, t["terminal"])
                for t in self.store.terminals_of(rollout_id, wave)
                if t["state"] in FAILED and t["wave"] <= r["current_wave"] and t["reason"] != "revoked"
            ]
            rows = self.store.rows_for(keys)
            now = self.clock()
            history: list[tuple[str, str, float, str, str, str, str, str, int, str]] = []
            for row in rows:
                self.engine._restart(row, now, history, "retry", f"retried by {user.name}")
                row[T_ATTEMPTS] = 0  # automatic retries start over
            self.store.save_terminals(rows)
            self.store.add_history(history)
            before = r["state"]
            if rows and r["state"] in ("halted", "completed"):
                waves = self.store.waves([rollout_id])[rollout_id]
                for w in waves:
                    if w["state"] == "halted" or (r["state"] == "completed" and w["idx"] == r["current_wave"]):
                        w.update(
                            state="running", forgiven=0, soak_since=None, passed_at=None, note=f"retried by {user.name}"
                        )
                self.store.update_waves(waves)
                self.store.update_rollout(rollout_id, state="running", reason="", reason_code="", updated_at=_ts(now))
        self._audit(
            user,
            "rollout.retry",
            rollout_id,
            {"state": before},
            {"terminals": [k[1] for k in keys], "wave": wave, "note": note},
        )
        return {**self.get(rollout_id), "retried": [k[1] for k in keys]}

    def rollback(self, rollout_id: str, user: User | str, request: RollbackRequest | None = None) -> dict[str, Any]:
        """A new rollout over the terminals this one reached, to the release's rollback twin (or a
        named published release, which must carry a higher counter); this one ends as rolled_back."""
        req = request or RollbackRequest()
        actor = user.name if isinstance(user, User) else user
        if isinstance(user, User):
            self._require_admin(user)
        r = self._rollout(rollout_id)
        if r["state"] in ("rolled_back", "aborted") and r["superseded_by"]:
            raise RolloutConflict(f"rollout {rollout_id!r} was rolled back already by {r['superseded_by']!r}")
        path = req.release
        if path is None:
            source = self._releases()
            path = source.rollback_twin(r["release"]) if source is not None else None
            if path is None:
                raise BadPlan(
                    f"release {r['release']!r} has no published rollback twin; name the release to roll back to"
                )
        target = self._release(path, "rollback release")
        if target.kind != r["kind"]:
            raise BadPlan(f"rollback release {path!r} is a {target.kind} release, not {r['kind']}")
        if target.counter <= r["counter"]:
            raise BadPlan(
                f"rollback release {path!r} has release counter {target.counter}, not above {r['counter']} of"
                f" {r['release']!r}: terminals that committed it would refuse the downgrade"
            )
        reached = [
            t
            for t in self.store.terminals_of(rollout_id)
            if t["sends"] > 0 or t["report"] > 0 or t["state"] != "pending"
        ]
        if not reached:
            raise RolloutConflict(f"rollout {rollout_id!r} has not reached any terminal; abort it instead")
        old_plan = RolloutPlan.model_validate(r["plan"])
        rid = req.id or f"{rollout_id[:50]}-rb-{uuid.uuid4().hex[:4]}"
        plan = RolloutPlan(
            id=rid,
            release=target.path,
            targets=Targets(terminals=sorted(t["terminal"] for t in reached)),
            waves=[WavePlan(name="rollback", size=Size(), failures=FailureLimit(percent=100))],
            window=req.window,
            gate_s=old_plan.gate_s,
            on_halt="pause",
            max_retries=old_plan.max_retries,
            timeouts=old_plan.timeouts,
            note=req.note or f"rollback of {rollout_id}",
        )
        offices = self._offices()
        members = {t["terminal"] for t in reached}
        infos = [t for t in self._terminals() if t.id in members]
        planned = plan_waves(plan, target, infos, offices)
        self._insert(rid, plan, target, planned.waves, actor, parent=rollout_id)
        now = self.clock()
        why = f"rolled back by {actor} to {target.path} (rollout {rid})" + (f": {req.note}" if req.note else "")
        with self.lock, transaction(self._conn):
            self.store.update_rollout(
                rollout_id,
                state="rolled_back",
                superseded_by=rid,
                reason=why,
                reason_code="rolled_back",
                updated_at=_ts(now),
            )
        self._audit(
            user,
            "rollout.rollback",
            rollout_id,
            {"state": r["state"], "release": r["release"]},
            {"rollout": rid, "release": target.path},
        )
        return self.get(rid)

    def _auto_rollback(self, rollout_id: str, reason: str) -> None:
        try:
            self.rollback(rollout_id, SYSTEM, RollbackRequest(note=f"automatic, the rollout halted: {reason}"))
        except (BadPlan, RolloutConflict) as err:
            with self.lock, transaction(self._conn):
                self.store.update_rollout(rollout_id, reason=f"{reason} — automatic rollback impossible: {err}")

    # -- reading -------------------------------------------------------------------------------------

    def list_rollouts(self, state: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.store.rollouts([state] if state else None)
            counts = self.store.counts([r["id"] for r in rows])
        totals: dict[str, dict[str, int]] = {}
        for rid, _, _, st, n in counts:
            totals.setdefault(rid, {}).setdefault(st, 0)
            totals[rid][st] += n
        return [self._public(r, totals.get(r["id"], {})) for r in rows]

    @staticmethod
    def _public(r: dict[str, Any], states: dict[str, int]) -> dict[str, Any]:
        return {
            "id": r["id"],
            "release": r["release"],
            "kind": r["kind"],
            "version": r["version"],
            "counter": r["counter"],
            "state": r["state"],
            "reason": r["reason"],
            "current_wave": r["current_wave"],
            "waves": len(r["plan"]["waves"]),
            "terminals": sum(states.values()),
            "states": states,
            "created_by": r["created_by"],
            "created_at": r["created_at"],
            "approved_by": r["approved_by"],
            "updated_at": r["updated_at"],
            "parent": r["parent"],
            "superseded_by": r["superseded_by"],
            "on_halt": r["plan"].get("on_halt"),
            "window": r["plan"].get("window"),
            # the plan's own install period and deadline, as planned (ISO 8601 with its zone) or None
            "window_start": r["plan"].get("window_start"),
            "window_end": r["plan"].get("window_end"),
            "deadline": r["plan"].get("deadline"),
        }

    def get(self, rollout_id: str) -> dict[str, Any]:
        """A rollout with its waves, per-state counts per wave and per office, and why it stands."""
        with self.lock:
            r = self._rollout(rollout_id)
            waves = self.store.waves([rollout_id])[rollout_id]
            counts = self.store.counts([rollout_id])
        offices = self._offices()
        states: dict[str, int] = {}
        per_wave: dict[int, dict[str, int]] = {}
        per_wave_office: dict[int, dict[str, dict[str, int]]] = {}
        per_office: dict[str, dict[str, int]] = {}
        for _, w, office, st, n in counts:
            states[st] = states.get(st, 0) + n
            per_wave.setdefault(w, {}).setdefault(st, 0)
            per_wave[w][st] += n
            per_wave_office.setdefault(w, {}).setdefault(office, {}).setdefault(st, 0)
            per_wave_office[w][office][st] += n
            per_office.setdefault(office, {}).setdefault(st, 0)
            per_office[office][st] += n
        doc = self._public(r, states)
        plan = r["plan"]

        def office_list(m: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
            return [
                {"office": o, "name": offices[o].name if o in offices else o, "states": s, "terminals": sum(s.values())}
                for o, s in sorted(m.items())
            ]

        doc["waves"] = [
            {
                "wave": w["idx"],
                "name": w["name"],
                "state": w["state"],
                "size": w["size"],
                "terminals": sum(per_wave.get(w["idx"], {}).values()),
                "states": per_wave.get(w["idx"], {}),
                "offices": office_list(per_wave_office.get(w["idx"], {})),
                "started_at": _iso(w["started_at"]),
                "soak_since": _iso(w["soak_since"]),
                "passed_at": _iso(w["passed_at"]),
                "note": w["note"],
                "plan": plan["waves"][w["idx"] - 1],
            }
            for w in waves
        ]
        doc["offices"] = office_list(per_office)
        doc["plan"] = plan
        doc["approved_at"] = r["approved_at"]
        return doc

    def terminals(self, rollout_id: str, wave: int | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Each terminal's state in the rollout, with its history."""
        if state is not None and state not in SERVER_STATES:
            raise BadPlan(f"state {state!r} is not one of {', '.join(SERVER_STATES)}")
        with self.lock:
            self._rollout(rollout_id)
            rows = self.store.terminals_of(rollout_id, wave)
            histories = self.store.histories(rollout_id)
        out = []
        for t in rows:
            if state is not None and t["state"] != state:
                continue
            out.append(
                {
                    "terminal": t["terminal"],
                    "wave": t["wave"],
                    "office": t["office"],
                    "state": t["state"],
                    "reason": t["reason"],
                    "detail": t["detail"],
                    "attempts": t["attempts"],
                    "sends": t["sends"],
                    "last_sent": _iso(t["last_sent"]),
                    "retry_at": _iso(t["retry_at"]),
                    "joined_late": bool(t["late"]),
                    "history": [{**h, "at": _iso(h["at"])} for h in histories.get(t["terminal"], [])],
                }
            )
        return out

    def terminal_updates(self, terminal_id: str) -> dict[str, Any]:
        """One terminal's update timeline over every rollout, oldest first."""
        with self.lock:
            history = self.store.history(terminal_id)
            rows = self._conn.execute(
                "SELECT t.rollout, r.release, r.version, r.state, t.state, t.reason, t.detail FROM rollout_terminals t"
                " JOIN rollouts r ON r.id = t.rollout WHERE t.terminal=? ORDER BY r.created_at",
                (terminal_id,),
            ).fetchall()
        return {
            "terminal": terminal_id,
            "rollouts": [
                {
                    "rollout": r[0],
                    "release": r[1],
                    "version": r[2],
                    "rollout_state": r[3],
                    "state": r[4],
                    "reason": r[5],
                    "detail": r[6],
                }
                for r in rows
            ],
            "timeline": [{**h, "at": _iso(h["at"])} for h in history],
        }


def now_utc() -> datetime:
    return datetime.now(UTC)
