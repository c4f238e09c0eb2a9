"""Admin use-cases on the registry: enrol, revoke, rotate, onboard an office. Each is audited,
runs under one lock on the shared writer connection, and then tells the broker and the readers.

A change to a terminal's account and the broker's copy of it succeed or fail together: the
registry rows and the audit line are written inside a savepoint, the broker is told before it is
released, and a broker that cannot be told rolls the registry back (the API answers 503 and the
admin retries). Otherwise an enrolment could commit while its one-time password never reached the
broker, and the password would be lost. The cost is that the write lock is held for the broker's
round trip (1-4 ms measured; at most the broker command timeout)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import Any

from fleet_server.auth.models import User
from fleet_server.auth.service import AuthService
from fleet_server.broker.accounts import BrokerAccounts
from fleet_server.playbooks.redaction import redact, secret_values
from fleet_server.playbooks.schemas import RunPublic
from fleet_server.playbooks.service import PlaybookError, PlaybookService
from fleet_server.registry.schemas import Office, TerminalCreate, TerminalPublic
from fleet_server.registry.service import RegistryService
from fleet_server.registry.store import OfficeMismatch, UnknownOffice, UnknownProfile
from fleet_wire.storage import savepoint

log = logging.getLogger(__name__)


class RegistryAdmin:
    def __init__(
        self,
        conn: sqlite3.Connection,
        registry: RegistryService,
        auth: AuthService,
        playbooks: PlaybookService,
        profiles: Mapping[str, object],
        *,
        lock: threading.RLock,
        broker: BrokerAccounts | None,
        on_change: list[Callable[[], None]],
    ) -> None:
        self._conn = conn
        self.registry = registry
        self.auth = auth
        self.playbooks = playbooks
        self.profiles = profiles
        # One shared writer connection for admin changes; this lock keeps two request threads from
        # interleaving statements inside each other's transaction.
        self.lock = lock
        self.broker = broker
        self.on_change = on_change
        # Per-terminal variables for onboarding runs (address, connection… from the site survey).
        self.onboard_terminal_vars: Callable[[TerminalPublic], dict[str, Any]] = lambda t: {}

    def _changed(self) -> None:
        for hook in self.on_change:
            hook()

    def _check_profile(self, body: TerminalCreate) -> None:
        if body.profile not in self.profiles:
            raise UnknownProfile(
                f"terminal {body.id}: device profile {body.profile!r} is unknown; "
                f"known: {', '.join(sorted(self.profiles))}"
            )

    def upsert_office(self, office: Office, actor: User | str) -> None:
        """Add or update an office (data, not code)."""
        with self.lock:
            before = next((o.model_dump() for o in self.registry.store.offices() if o.id == office.id), None)
            self.registry.store.upsert_offices([office])
            self.auth.audit(actor, "office.upsert", office.id, before, office.model_dump())
            self._changed()

    def enrol_terminal(self, body: TerminalCreate, actor: User | str) -> tuple[TerminalPublic, str]:
        """Enrol one terminal; returns it and its broker password (shown once)."""
        self._check_profile(body)
        with self.lock:
            with savepoint(self._conn, "enrol"):
                terminal, password = self.registry.enrol(body)
                self.auth.audit(actor, "terminal.enrol", terminal.id, None, terminal.model_dump())
                if self.broker is not None:
                    self.broker.terminal_enrolled(terminal.id, password)
            self._changed()
        return terminal, password

    def revoke_terminal(self, terminal_id: str, actor: User | str) -> None:
        with self.lock:
            with savepoint(self._conn, "revoke"):
                before = self.registry.store.terminal(terminal_id)
                self.registry.revoke(terminal_id)
                self.auth.audit(
                    actor, "terminal.revoke", terminal_id, before.model_dump() if before else None, {"enabled": False}
                )
                if self.broker is not None:
                    self.broker.terminal_revoked(terminal_id)
            self._changed()

    def rotate_credentials(self, terminal_id: str, actor: User | str) -> str:
        with self.lock:
            with savepoint(self._conn, "rotate"):
                password = self.registry.rotate(terminal_id)
                self.auth.audit(
                    actor, "terminal.rotate_credentials", terminal_id, {"password": "old"}, {"password": "new"}
                )
                if self.broker is not None:
                    self.broker.terminal_password_changed(terminal_id, password)
            self._changed()
        return password

    def onboard_office(
        self, office_id: str, terminals: list[TerminalCreate], actor: User | str, *, run_playbook: bool = False
    ) -> dict[str, Any]:
        """Enrol every terminal of an office in one transaction (all or none), then provision."""
        for t in terminals:
            if t.office_id != office_id:
                raise OfficeMismatch(f"terminal {t.id} names office {t.office_id!r}, not {office_id!r}")
        with self.lock:
            if office_id not in {o.id for o in self.registry.store.offices()}:
                raise UnknownOffice(f"office {office_id!r} is not in the registry")
            for body in terminals:
                self._check_profile(body)
            with savepoint(self._conn, "onboard"):
                issued = [self.registry.enrol(body) for body in terminals]
                self.auth.audit(
                    actor,
                    "office.onboard",
                    office_id,
                    None,
                    {"terminals": [t.id for t, _ in issued], "run_playbook": run_playbook},
                )
                if self.broker is not None:
                    try:
                        for enrolled, pw in issued:
                            self.broker.terminal_enrolled(enrolled.id, pw)
                    except BaseException:
                        # all or none, at the broker too: remove the accounts this call already made
                        self._undo_enrolments([t.id for t, _ in issued])
                        raise
            self._changed()
        result: dict[str, Any] = {
            "office": office_id,
            "terminals": [{"id": t.id, "mqtt_username": t.id, "mqtt_password": pw} for t, pw in issued],
        }
        if run_playbook:
            try:
                result["playbook_run"] = {"id": self.start_onboard_playbook(office_id, issued, actor)}
            except PlaybookError as err:  # enrolled all the same: provision later, or by hand
                result["playbook_run"] = None
                result["playbook_error"] = f"terminals enrolled, but provisioning did not start: {err}"
        return result

    def _undo_enrolments(self, terminal_ids: list[str]) -> None:
        assert self.broker is not None
        for tid in terminal_ids:
            try:
                self.broker.terminal_revoked(tid)
            except Exception as err:  # the registry rolls back; reconcile at start removes leftovers
                log.warning("could not remove broker account %s after a failed onboarding: %s", tid, err)

    def start_onboard_playbook(
        self, office_id: str, issued: list[tuple[TerminalPublic, str]], actor: User | str
    ) -> int:
        """Provision every new terminal of an office with the onboard_office playbook."""
        items = [
            {"terminal_id": t.id, "password": pw, "profile": t.profile, **self.onboard_terminal_vars(t)}
            for t, pw in issued
        ]
        run_id = self.playbooks.start_run(
            "onboard_office",
            started_by=getattr(actor, "name", str(actor)),
            target=office_id,
            extravars={"office_id": office_id, "office_terminals": items},
        )
        self.auth.audit(
            actor,
            "playbook.run",
            office_id,
            None,
            {"playbook": "onboard_office", "run_id": run_id, "terminals": [t.id for t, _ in issued]},
        )
        return run_id

    def start_playbook_run(
        self,
        playbook: str,
        actor: User,
        *,
        target: str | None = None,
        extravars: dict[str, Any] | None = None,
        limit: str | None = None,
    ) -> RunPublic:
        """Start a playbook run for an admin; audited with its extra vars (secrets redacted)."""
        variables = dict(extravars or {})
        run_id = self.playbooks.start_run(
            playbook, started_by=actor.name, target=target, extravars=variables, limit=limit
        )
        run = self.playbooks.get_run(run_id)
        self.auth.audit(
            actor,
            "playbook.run",
            run.target,
            before=None,
            after={
                "run_id": run_id,
                "playbook": run.playbook,
                "limit": limit,
                "extravars": redact(variables, secret_values(variables)),
            },
        )
        return RunPublic(**run.model_dump(exclude={"events"}))
