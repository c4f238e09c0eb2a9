"""Broker accounts over Mosquitto's dynamic-security plugin (the production path).

The server speaks to the plugin as its admin account: JSON commands published to
`$CONTROL/dynamic-security/v1`, answers read on `.../response` and matched by `correlationData`.
No file is rewritten and nothing is signalled, so the broker may run on another host.

Every terminal gets a dynsec client whose username *and bound client id* are its terminal id
(its credentials are refused under any other client id, so they cannot knock another terminal or
the server's ingest session off), and a role of its own that grants exactly its five topics:
Mosquitto 2.0's dynsec ACLs have no `%u`/`%c` substitution, so one shared role could not confine
terminals to their own subtree. The server's ingest account is kept the same way (bound to
FLEET_BROKER_CLIENT_ID, a role over `fleet/v1/#`). Clients and roles we manage are marked by their
`textname`; nothing else on the broker is ever modified or deleted.
"""

from __future__ import annotations

import glob
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import CollectorRegistry, Gauge

from fleet_server.broker.accounts import BrokerAccountsUnavailable, BrokerCommandRefused
from fleet_server.broker.mosquitto import BrokerCredentials
from fleet_wire import topics

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
TERMINAL_ROLE_PREFIX = "kiosk-fleet-terminal-"
SERVER_ROLE = "kiosk-fleet-server"
# textname of the clients and roles we own: reconcile deletes or rewrites only these.
TERMINAL_MARK = "kiosk-fleet terminal"
SERVER_MARK = "kiosk-fleet server ingest"
COMMANDS_PER_MESSAGE = 10  # each changing command rewrites the whole plugin JSON (~55 ms at 1,000 terminals)
LIST_PAGE = 500  # clients/roles per list call: keeps each answer well under message size limits
RECONCILE_RETRY_S = 5.0
MISSING_IN_LOG = 20  # terminal ids named in the "missing on the broker" line; the rest are counted
PLUGIN_NAME = "mosquitto_dynamic_security.so"
DEBIAN_PLUGIN_PATH = f"/usr/lib/x86_64-linux-gnu/{PLUGIN_NAME}"


def find_plugin() -> str:
    """Where this host's Mosquitto keeps the dynamic-security plugin (Debian's path if not found)."""
    for pattern in (f"/usr/lib/*/{PLUGIN_NAME}", f"/usr/lib/{PLUGIN_NAME}", f"/usr/local/lib/{PLUGIN_NAME}"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return DEBIAN_PLUGIN_PATH


def terminal_role(terminal_id: str) -> str:
    return TERMINAL_ROLE_PREFIX + topics.check_terminal_id(terminal_id)


def terminal_acls(terminal_id: str) -> list[dict[str, Any]]:
    """What a terminal may do: write its uplink topics, subscribe to and receive its downlink ones."""
    acls: list[dict[str, Any]] = [
        {"acltype": "publishClientSend", "topic": topics.topic(terminal_id, c), "allow": True} for c in topics.UPLINK
    ]
    for c in topics.DOWNLINK:
        acls.append({"acltype": "subscribeLiteral", "topic": topics.topic(terminal_id, c), "allow": True})
        acls.append({"acltype": "publishClientReceive", "topic": topics.topic(terminal_id, c), "allow": True})
    return acls


def server_acls() -> list[dict[str, Any]]:
    """The ingest account reads and writes every terminal's topics, and nothing outside them."""
    everything = f"{topics.PREFIX}/#"
    return [
        {"acltype": t, "topic": everything, "allow": True}
        for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
    ]


def _acl_key(acls: Iterable[dict[str, Any]]) -> set[tuple[str, str, bool]]:
    return {(str(a.get("acltype")), str(a.get("topic")), bool(a.get("allow"))) for a in acls}


def broker_conf(port: int, config_file: str, *, host: str = "", plugin: str | None = None) -> str:
    """The conf.d snippet an operator uses with these accounts (and the one the tests run).

    Debian's /etc/mosquitto/mosquitto.conf already sets pid_file and persistence and includes
    /etc/mosquitto/conf.d; repeating those here would stop the broker ("Duplicate ... value").
    """
    lines = [
        "# kiosk-fleet broker: accounts managed by fleet-server over the dynamic-security plugin",
        "per_listener_settings false",
        f"listener {port}{' ' + host if host else ''}",
        "allow_anonymous false",
        f"plugin {plugin or find_plugin()}",
        f"plugin_opt_config_file {config_file}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class DynsecSettings:
    host: str
    port: int
    admin_username: str
    admin_password: str
    admin_client_id: str
    server_username: str
    server_password: str
    server_client_id: str
    tls_ca: str | None = None
    timeout_s: float = 5.0


class _Pending:
    def __init__(self, expected: Sequence[str]) -> None:
        self.expected = list(expected)
        self.responses: dict[str, dict[str, Any]] = {}
        self.done = threading.Event()


class DynsecAccounts:
    """BrokerAccounts over Mosquitto's dynamic-security plugin."""

    def __init__(self, settings: DynsecSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self._lock = threading.RLock()  # one change at a time; hooks, reconcile and its retries
        self._client: paho.Client | None = None
        self._ready = threading.Event()  # connected and subscribed to the response topic
        self._refused = ""  # why the broker refused our admin account, if it did
        self._subscribe_mid: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._closed = threading.Event()
        self._retry: threading.Thread | None = None
        # Terminal ids changed through the hooks since the last reconcile snapshot was taken: a
        # late (retried) reconcile must not undo them.
        self._touched: set[str] = set()
        self.missing: list[str] = []
        self._missing_gauge = (
            Gauge(
                "fleet_broker_accounts_missing",
                "Enabled terminals with no account on the broker at the last reconcile (rotate their credentials)",
                registry=registry,
            )
            if registry is not None
            else None
        )

    # -- BrokerAccounts -----------------------------------------------------------------------------

    def terminal_enrolled(self, terminal_id: str, password: str) -> None:
        with self._lock:
            self._touched.add(terminal_id)
            self._put_terminal(terminal_id, password)

    def terminal_password_changed(self, terminal_id: str, password: str) -> None:
        # The same as enrol: if the account went missing on the broker, rotating re-creates it,
        # which is what an operator is told to do. Mosquitto cuts the live connection either way.
        with self._lock:
            self._touched.add(terminal_id)
            self._put_terminal(terminal_id, password)

    def terminal_revoked(self, terminal_id: str) -> None:
        with self._lock:
            self._touched.add(terminal_id)
            self._check_not_reserved(terminal_id)
            (got,) = self._call([{"command": "getClient", "username": terminal_id}])
            if _error(got) == "Client not found":
                pass
            elif _error(got):
                _raise(got)
            elif not _ours(got, TERMINAL_MARK):
                raise BrokerCommandRefused(
                    "deleteClient", f"broker account {terminal_id!r} was not made by kiosk-fleet", "left untouched"
                )
            # deleteClient cuts the live connection at once.
            for r in self._call(
                [
                    {"command": "deleteClient", "username": terminal_id},
                    {"command": "deleteRole", "rolename": terminal_role(terminal_id)},
                ]
            ):
                _check(r, ok={"Client not found", "Role not found"})
            log.info("broker account of %s deleted", terminal_id)

    def reconcile(self, credentials: BrokerCredentials) -> None:
        """Make the broker match the registry; if the broker cannot be reached, keep trying in the background."""
        with self._lock:
            self._touched = set()
        try:
            self._reconcile(credentials)
        except BrokerAccountsUnavailable as err:
            log.error(
                "broker accounts not reconciled yet (%s); retrying every %.0f s in the background",
                err,
                RECONCILE_RETRY_S,
            )
            self._retry = threading.Thread(
                target=self._retry_reconcile, args=(credentials,), name="dynsec-reconcile", daemon=True
            )
            self._retry.start()

    def close(self) -> None:
        self._closed.set()
        if self._retry is not None:
            self._retry.join(timeout=self.settings.timeout_s + 1)
        with self._lock:
            if self._client is not None:
                self._client.disconnect()
                self._client.loop_stop()
                self._client = None
            self._ready.clear()

    # -- terminals ------------------------------------------------------------------------------------

    def _check_not_reserved(self, terminal_id: str) -> None:
        reserved = {self.settings.admin_username, self.settings.server_username}
        if terminal_id in reserved:
            raise BrokerCommandRefused(
                "createClient",
                f"terminal id {terminal_id!r} is the name of the server's own broker account",
                "revoke it and enrol the terminal under another id",
            )

    def _put_terminal(self, terminal_id: str, password: str) -> None:
        """Create or update a terminal's role and account, bound to its own client id."""
        self._check_not_reserved(terminal_id)
        role = terminal_role(terminal_id)
        acls = terminal_acls(terminal_id)
        got, made_role = self._call(
            [
                {"command": "getClient", "username": terminal_id},
                {"command": "createRole", "rolename": role, "textname": TERMINAL_MARK, "acls": acls},
            ]
        )
        _check(made_role, ok={"Role already exists"})
        follow: list[dict[str, Any]] = []
        if _error(made_role):  # an old role may carry other ACLs: set them to what they must be
            follow.append({"command": "modifyRole", "rolename": role, "acls": acls})
        account = {"username": terminal_id, "password": password, "clientid": terminal_id}
        if _error(got) == "Client not found":
            follow.append(
                {"command": "createClient", **account, "textname": TERMINAL_MARK, "roles": [{"rolename": role}]}
            )
        elif _error(got):
            _raise(got)
        elif not _ours(got, TERMINAL_MARK):
            raise BrokerCommandRefused(
                "createClient",
                f"a broker account named {terminal_id!r} exists and was not made by kiosk-fleet",
                "remove it from the broker (mosquitto_ctrl dynsec deleteClient) or enrol the terminal under another id",
            )
        else:
            # modifyClient replaces password, bound client id and roles at once; Mosquitto cuts
            # any live connection under the account, so an old password cannot linger.
            follow.append({"command": "modifyClient", **account, "roles": [{"rolename": role}]})
        for r in self._call(follow):
            _check(r)
        log.info("broker account of %s set (client id bound)", terminal_id)

    # -- reconcile ------------------------------------------------------------------------------------

    def _retry_reconcile(self, credentials: BrokerCredentials) -> None:
        while not self._closed.wait(RECONCILE_RETRY_S):
            try:
                self._reconcile(credentials)
                return
            except BrokerAccountsUnavailable as err:
                log.warning("broker accounts still not reconciled: %s", err)
            except Exception:
                log.exception("reconciling broker accounts failed; not retrying: fix the cause and restart")
                return

    def _reconcile(self, credentials: BrokerCredentials) -> None:
        with self._lock:
            touched = set(self._touched)
            enabled = set(credentials.hashes) - {credentials.server_username}
            self._put_server_account()
            clients = {c["username"]: c for c in self._list("listClients", "clients")}
            roles = {r["rolename"]: r for r in self._list("listRoles", "roles")}
            commands: list[dict[str, Any]] = []
            deleted, fixed, missing, conflicts = [], [], [], []
            for name, c in clients.items():
                if _ours(c, TERMINAL_MARK) and name not in enabled and name not in touched:
                    commands.append({"command": "deleteClient", "username": name})
                    deleted.append(name)
            for name, r in roles.items():
                tid = name[len(TERMINAL_ROLE_PREFIX) :] if name.startswith(TERMINAL_ROLE_PREFIX) else None
                if tid and _ours(r, TERMINAL_MARK) and tid not in enabled and tid not in touched:
                    commands.append({"command": "deleteRole", "rolename": name})
            reserved = {self.settings.admin_username, self.settings.server_username}
            for tid in sorted(enabled - touched):
                account = clients.get(tid)
                if account is None:
                    missing.append(tid)
                    continue
                if not _ours(account, TERMINAL_MARK) or tid in reserved:
                    conflicts.append(tid)
                    continue
                role = terminal_role(tid)
                before = len(commands)
                if role not in roles:
                    commands.append(
                        {
                            "command": "createRole",
                            "rolename": role,
                            "textname": TERMINAL_MARK,
                            "acls": terminal_acls(tid),
                        }
                    )
                elif _acl_key(roles[role].get("acls", [])) != _acl_key(terminal_acls(tid)):
                    commands.append({"command": "modifyRole", "rolename": role, "acls": terminal_acls(tid)})
                if account.get("clientid") != tid:
                    commands.append({"command": "setClientId", "username": tid, "clientid": tid})
                if role not in {x.get("rolename") for x in account.get("roles", [])}:
                    commands.append({"command": "addClientRole", "username": tid, "rolename": role})
                if len(commands) > before:
                    fixed.append(tid)
            for i in range(0, len(commands), COMMANDS_PER_MESSAGE):
                for r in self._call(commands[i : i + COMMANDS_PER_MESSAGE]):
                    _check(r, ok={"Client not found", "Role not found"})
            self.missing = missing
            if self._missing_gauge is not None:
                self._missing_gauge.set(len(missing))
            log.info(
                "broker accounts reconciled: %d terminals enabled, %d accounts deleted, %d repaired, %d missing",
                len(enabled),
                len(deleted),
                len(fixed),
                len(missing),
            )
            if deleted:
                log.info("deleted broker accounts of terminals no longer enabled: %s", _names(deleted))
            if missing:
                log.warning(
                    "%d enabled terminals have no account on the broker: %s. Their passwords are known only to"
                    " the terminals; rotate each one's credentials (POST /api/v1/terminals/{id}/credentials or"
                    " the rotate_credentials playbook) to give it a new account",
                    len(missing),
                    _names(missing),
                )
            if conflicts:
                log.error(
                    "broker accounts named like enabled terminals were not made by kiosk-fleet (left untouched;"
                    " remove them from the broker, then rotate these terminals): %s",
                    _names(conflicts),
                )

    def _put_server_account(self) -> None:
        """The ingest account: our password, bound to FLEET_BROKER_CLIENT_ID, role over fleet/v1/#."""
        s = self.settings
        got, made_role = self._call(
            [
                {"command": "getClient", "username": s.server_username},
                {"command": "createRole", "rolename": SERVER_ROLE, "textname": SERVER_MARK, "acls": server_acls()},
            ]
        )
        _check(made_role, ok={"Role already exists"})
        follow: list[dict[str, Any]] = []
        if _error(made_role):
            follow.append({"command": "modifyRole", "rolename": SERVER_ROLE, "acls": server_acls()})
        account = {"username": s.server_username, "password": s.server_password, "clientid": s.server_client_id}
        if _error(got) == "Client not found":
            follow.append(
                {"command": "createClient", **account, "textname": SERVER_MARK, "roles": [{"rolename": SERVER_ROLE}]}
            )
        elif _error(got):
            _raise(got)
        else:
            # An account made by hand keeps its other roles; it gets our password, client id and role.
            follow.append({"command": "modifyClient", **account})
            if SERVER_ROLE not in {r.get("rolename") for r in got.get("data", {}).get("client", {}).get("roles", [])}:
                follow.append({"command": "addClientRole", "username": s.server_username, "rolename": SERVER_ROLE})
        for r in self._call(follow):
            _check(r)

    def _list(self, command: str, key: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            (r,) = self._call([{"command": command, "verbose": True, "count": LIST_PAGE, "offset": len(out)}])
            _check(r)
            data = r.get("data", {})
            page = data.get(key, [])
            out.extend(page)
            if not page or len(out) >= int(data.get("totalCount", 0)):
                return out

    # -- the admin connection -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._client is not None:
            return
        s = self.settings
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.admin_client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        c.username_pw_set(s.admin_username, s.admin_password)
        if s.tls_ca:
            c.tls_set(ca_certs=s.tls_ca)
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.connect_async(s.host, s.port, keepalive=30, clean_start=True)
        c.loop_start()
        self._client = c

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("the broker refused the dynsec admin account %r: %s", self.settings.admin_username, reason_code)
            return
        self._refused = ""
        self._subscribe_mid = client.subscribe(RESPONSE_TOPIC, qos=1)[1]

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            self._refused = f"subscription to {RESPONSE_TOPIC} refused ({reason_codes[0]})"
            log.error("the dynsec admin account may not read %s: give it the plugin's admin role", RESPONSE_TOPIC)
            return
        self._ready.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._ready.clear()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable answer on %s ignored", message.topic)
            return
        with self._pending_lock:
            for r in responses:
                corr = r.get("correlationData") if isinstance(r, dict) else None
                tag = corr.rpartition("-")[0] if isinstance(corr, str) else ""
                pending = self._pending.get(tag)
                if pending is not None and isinstance(corr, str):
                    pending.responses[corr] = r
                    if len(pending.responses) == len(pending.expected):
                        pending.done.set()

    def _call(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; their answers in the same order. Never logs a password."""
        if not commands:
            return []
        s = self.settings
        where = f"{s.host}:{s.port}"
        with self._lock:
            self._start()
        deadline = time.monotonic() + s.timeout_s
        if not self._ready.wait(s.timeout_s):
            if self._refused:
                raise BrokerCommandRefused(
                    "connect",
                    f"the broker at {where} refused the dynsec admin account {s.admin_username!r} ({self._refused})",
                    "check FLEET_BROKER_DYNSEC_USERNAME and FLEET_BROKER_DYNSEC_PASSWORD against the account made"
                    " with `mosquitto_ctrl dynsec init`",
                )
            raise BrokerAccountsUnavailable(
                f"no answer from the broker at {where} within {s.timeout_s:.0f} s; is it running with the"
                " dynamic-security plugin loaded?"
            )
        tag = uuid.uuid4().hex
        corrs = [f"{tag}-{i}" for i in range(len(commands))]
        pending = _Pending(corrs)
        with self._pending_lock:
            self._pending[tag] = pending
        try:
            payload = json.dumps({"commands": [{**c, "correlationData": k} for c, k in zip(commands, corrs)]})
            assert self._client is not None
            # QoS 0: the answer is the acknowledgement (a PUBACK ahead of it cost a 40 ms Nagle stall)
            self._client.publish(CONTROL_TOPIC, payload, qos=0)
            if not pending.done.wait(max(0.0, deadline - time.monotonic())):
                names = ", ".join(sorted({str(c["command"]) for c in commands}))
                raise BrokerAccountsUnavailable(
                    f"the broker at {where} did not answer {names} within {s.timeout_s:.0f} s; it may or may not"
                    " have been applied (safe to retry)"
                )
            return [pending.responses[k] for k in corrs]
        finally:
            with self._pending_lock:
                self._pending.pop(tag, None)


def _error(response: dict[str, Any]) -> str:
    return str(response.get("error") or "")


def _raise(response: dict[str, Any]) -> None:
    raise BrokerCommandRefused(str(response.get("command", "?")), _error(response))


def _check(response: dict[str, Any], ok: set[str] | frozenset[str] = frozenset()) -> None:
    err = _error(response)
    if err and err not in ok:
        _raise(response)


def _ours(item: dict[str, Any], mark: str) -> bool:
    """A listed client/role, or a getClient answer, carries our mark."""
    inner = item.get("data", {}).get("client", item) if "data" in item else item
    return inner.get("textname") == mark


def _names(ids: list[str]) -> str:
    shown = ", ".join(ids[:MISSING_IN_LOG])
    return shown + (f" and {len(ids) - MISSING_IN_LOG} more" if len(ids) > MISSING_IN_LOG else "")
