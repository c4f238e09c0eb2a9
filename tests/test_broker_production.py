"""`fleet-server run`, as its own process, keeps a production-configured Mosquitto in step.

The broker runs the dynamic-security plugin with an admin account made by `mosquitto_ctrl dynsec
init` (fleet_dev/dynsec.py); the server is started with FLEET_BROKER_ACCOUNTS=dynsec and nothing
of the dev stack's wiring. Every check is made by connecting, as a terminal would.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_dev.broker import Mosquitto
from fleet_dev.dynsec import DynsecBroker, write_operator_layout
from fleet_dev.proc import die_with_parent, free_port, wait_for
from fleet_server.broker import BrokerAccountsUnavailable, BrokerCommandRefused
from fleet_server.broker.dynsec import DynsecAccounts, DynsecSettings
from fleet_server.broker.files import broker_conf as files_broker_conf
from fleet_server.broker.mosquitto import BrokerConfig, new_password
from fleet_wire import topics
from fleet_wire.envelope import encode_batch, new_epoch, new_event_id, utc_now_iso
from fleet_wire.receipt import Receipt
from fleet_wire.topics import Channel
from tests.mqtt_util import RawClient, connack

SERVER_CLIENT_ID = "fleet-server-ingest"
NOT_AUTHORISED = {134, 135}  # MQTT 5 CONNACK: bad user name or password / not authorised


class ServerProcess:
    """`python -m fleet_server run` with FLEET_* settings, spoken to over its HTTP API."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.admin_token = new_password()
        self.broker_password = new_password()
        self.http_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.env.update(
            {
                "FLEET_ENVIRONMENT": "development",
                "FLEET_DB_PATH": str(root / "fleet.db"),
                "FLEET_BROKER_PASSWORD": self.broker_password,
                "FLEET_ADMIN_TOKEN": self.admin_token,
                "FLEET_HTTP_PORT": str(self.http_port),
                **env,
            }
        )
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_timeout_s = 30.0
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet_server", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            wait_for(self._broker_connected, self.start_timeout_s, what="fleet-server run connected to the broker")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; its log:\n{self.log()[-4000:]}") from None

    def _broker_connected(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"fleet-server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.broker_connected()
        except httpx.TransportError:
            return False

    def broker_connected(self) -> bool:
        """/healthz: the liveness probe is ok while the ingest is connected to the broker."""
        doc = self.http.get("/healthz").json()
        return bool(doc.get("broker_connected", doc["ok"]))

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.http.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def enrol(self, terminal_id: str, office: str = "dongcheng") -> str:
        r = self.http.post("/api/v1/terminals", json={"id": terminal_id, "office_id": office})
        assert r.status_code == 201, r.text
        return str(r.json()["mqtt_password"])

    def rotate(self, terminal_id: str) -> str:
        r = self.http.post(f"/api/v1/terminals/{terminal_id}/credentials")
        assert r.status_code == 200, r.text
        return str(r.json()["mqtt_password"])

    def revoke(self, terminal_id: str) -> None:
        r = self.http.delete(f"/api/v1/terminals/{terminal_id}")
        assert r.status_code == 200, r.text

    def stored(self, terminal_id: str) -> int:
        r = self.http.get(f"/api/v1/terminals/{terminal_id}/streams")
        assert r.status_code == 200, r.text
        return sum(int(s["stored"]) for s in r.json())

    def ingest_sessions(self) -> int:
        """How often the server's ingest connected: 1 means nobody knocked its session off."""
        return self.log().count("ingest connected")


@pytest.fixture
def dynsec_broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    broker = DynsecBroker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def prod(tmp_path: Path, dynsec_broker: DynsecBroker) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path,
        {
            "FLEET_BROKER_PORT": str(dynsec_broker.port),
            "FLEET_BROKER_ACCOUNTS": "dynsec",
            "FLEET_BROKER_DYNSEC_USERNAME": dynsec_broker.admin_username,
            "FLEET_BROKER_DYNSEC_PASSWORD": dynsec_broker.admin_password,
        },
    )
    server.start()
    yield server
    server.stop()


def ok(rc: Any) -> bool:
    return not rc.is_failure


def refused(rc: Any) -> bool:
    return bool(rc.is_failure) and rc.value in NOT_AUTHORISED


def honest_event_is_stored_and_receipted(server: ServerProcess, port: int, terminal_id: str, password: str) -> None:
    """A terminal publishes one event as the agent does; the server stores it and receipts it."""
    before = server.stored(terminal_id)
    t = RawClient(port, terminal_id, password, client_id=terminal_id)
    try:
        assert ok(t.connect_rc), t.connect_rc
        assert all(ok(rc) for rc in t.subscribe(topics.topic(terminal_id, Channel.RECEIPT)))
        epoch = new_epoch()
        envelope = {
            "v": 1,
            "terminal": terminal_id,
            "epoch": epoch,
            "seq": 1,
            "id": new_event_id(),
            "ts": utc_now_iso(),
            "type": "service.completed",
            "body": {"session": "s-1", "service_code": "TQ02", "duration_s": 95.0, "face_login": True},
        }
        assert ok(t.publish(topics.topic(terminal_id, Channel.EVENTS), encode_batch([envelope])))
        receipts: list[Receipt] = []

        def receipted() -> bool:
            receipts.extend(Receipt.decode(p) for _, p in t.drain())
            return any(r.epoch == epoch and r.covers(1) for r in receipts)

        wait_for(receipted, 15, what=f"receipt for {terminal_id}'s event")
        assert server.stored(terminal_id) == before + 1
    finally:
        t.close()


def test_enrol_rotate_revoke_and_no_takeover_with_dynsec(prod: ServerProcess, dynsec_broker: DynsecBroker) -> None:
    port = dynsec_broker.port
    pw_a, pw_b = prod.enrol("kiosk-a"), prod.enrol("kiosk-b")
    # enrol: the account exists when the API answers (the broker was told before the 201)
    assert ok(connack(port, "kiosk-a", pw_a, "kiosk-a"))
    victim = RawClient(port, "kiosk-b", pw_b, client_id="kiosk-b")
    assert ok(victim.connect_rc)
    try:
        # a's credentials under b's client id, or the server's, are refused: nobody is knocked off
        assert refused(connack(port, "kiosk-a", pw_a, "kiosk-b"))
        assert refused(connack(port, "kiosk-a", pw_a, SERVER_CLIENT_ID))
        assert refused(connack(port, "kiosk-a", pw_a, f"random-{new_event_id()[:8]}"))
        assert not victim.disconnected.is_set()
        assert prod.broker_connected()
        assert prod.ingest_sessions() == 1
        # each terminal's role grants its own topics only
        a = RawClient(port, "kiosk-a", pw_a, client_id="kiosk-a")
        try:
            assert not ok(a.publish(topics.topic("kiosk-b", Channel.EVENTS), b"{}"))
            assert not ok(a.publish(topics.topic("kiosk-b", Channel.RECEIPT), b"{}"))
            assert all(rc.is_failure for rc in a.subscribe(topics.topic("kiosk-b", Channel.RECEIPT)))
            assert all(rc.is_failure for rc in a.subscribe(f"{topics.PREFIX}/#"))
        finally:
            a.close()
        honest_event_is_stored_and_receipted(prod, port, "kiosk-b", pw_b)
        assert prod.ingest_sessions() == 1
    finally:
        victim.close()

    # rotate: the live connection is cut, the old password refused, the new one works
    live = RawClient(port, "kiosk-a", pw_a, client_id="kiosk-a")
    try:
        assert ok(live.connect_rc)
        new_a = prod.rotate("kiosk-a")
        assert live.disconnected.wait(10), "rotation did not cut the live connection"
    finally:
        live.close()
    assert refused(connack(port, "kiosk-a", pw_a, "kiosk-a"))
    assert ok(connack(port, "kiosk-a", new_a, "kiosk-a"))
    assert refused(connack(port, "kiosk-a", new_a, "kiosk-b"))

    # revoke: the live connection is cut at once and reconnecting is refused
    live = RawClient(port, "kiosk-a", new_a, client_id="kiosk-a")
    try:
        assert ok(live.connect_rc)
        prod.revoke("kiosk-a")
        assert live.disconnected.wait(10), "revocation did not cut the live connection"
    finally:
        live.close()
    assert refused(connack(port, "kiosk-a", new_a, "kiosk-a"))
    # the server never lost its session through any of it, and b still gets its events through
    honest_event_is_stored_and_receipted(prod, port, "kiosk-b", pw_b)
    assert prod.ingest_sessions() == 1
    assert pw_a not in prod.log() and new_a not in prod.log() and pw_b not in prod.log()


def test_restart_after_kill9_reconciles_accounts(prod: ServerProcess, dynsec_broker: DynsecBroker) -> None:
    port = dynsec_broker.port
    pw = {tid: prod.enrol(tid) for tid in ("kiosk-a", "kiosk-b", "kiosk-c")}
    live = RawClient(port, "kiosk-a", pw["kiosk-a"], client_id="kiosk-a")
    assert ok(live.connect_rc)
    try:
        prod.kill9()
        # While the server is down the registry and the broker drift apart: kiosk-c is revoked
        # without the broker hearing of it, and kiosk-b's broker account is lost.
        with sqlite3.connect(prod.root / "fleet.db") as db:
            db.execute("UPDATE terminals SET enabled=0 WHERE id='kiosk-c'")
        db.close()
        ctrl = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(port), "-u", dynsec_broker.admin_username]
        subprocess.run(
            [*ctrl, "-P", dynsec_broker.admin_password, "dynsec", "deleteClient", "kiosk-b"],
            check=True,
            capture_output=True,
        )
        assert ok(connack(port, "kiosk-c", pw["kiosk-c"], "kiosk-c"))  # still there before the restart

        prod.start()
        # kept: the account that matches is left alone (its live connection too), and still works
        assert not live.disconnected.is_set()
        assert "1 accounts deleted, 0 repaired, 1 missing" in prod.log()
        live.close()
        assert ok(connack(port, "kiosk-a", pw["kiosk-a"], "kiosk-a"))
        # deleted: the registry no longer has kiosk-c enabled
        assert refused(connack(port, "kiosk-c", pw["kiosk-c"], "kiosk-c"))
        # missing: reported (log + metric) with what to do, and rotating gives it a working account
        missing = [line for line in prod.log().splitlines() if "no account on the broker" in line]
        assert missing and "kiosk-b" in missing[-1] and "rotate" in missing[-1]
        metrics = prod.http.get("/metrics").text
        assert "fleet_broker_accounts_missing 1.0" in metrics
        assert refused(connack(port, "kiosk-b", pw["kiosk-b"], "kiosk-b"))
        new_b = prod.rotate("kiosk-b")
        assert ok(connack(port, "kiosk-b", new_b, "kiosk-b"))
        # the server's own account is still bound to its client id after the restart
        assert refused(connack(port, "kiosk-a", pw["kiosk-a"], SERVER_CLIENT_ID))
        honest_event_is_stored_and_receipted(prod, port, "kiosk-b", new_b)
    finally:
        live.close()


def test_dynsec_errors_say_retry_or_report(tmp_path: Path, dynsec_broker: DynsecBroker) -> None:
    def accounts(port: int, admin_password: str, timeout_s: float = 5.0) -> DynsecAccounts:
        return DynsecAccounts(
            DynsecSettings(
                "127.0.0.1",
                port,
                dynsec_broker.admin_username,
                admin_password,
                "test-dynsec-admin",
                "fleet-server",
                new_password(),
                SERVER_CLIENT_ID,
                timeout_s=timeout_s,
            )
        )

    nobody = accounts(free_port(), "x", timeout_s=1.0)  # nothing listens there
    with pytest.raises(BrokerAccountsUnavailable, match="no answer from the broker"):
        nobody.terminal_enrolled("kiosk-a", new_password())
    nobody.close()

    wrong = accounts(dynsec_broker.port, "not-the-password")
    with pytest.raises(BrokerCommandRefused, match="FLEET_BROKER_DYNSEC_PASSWORD"):
        wrong.terminal_enrolled("kiosk-a", new_password())
    wrong.close()

    right = accounts(dynsec_broker.port, dynsec_broker.admin_password)
    try:
        # an account an operator made by hand is never taken over, nor deleted by reconcile
        ctrl = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(dynsec_broker.port), "-u", dynsec_broker.admin_username]
        subprocess.run(
            [*ctrl, "-P", dynsec_broker.admin_password, "dynsec", "createClient", "kiosk-x", "-p", "operator-pw"],
            check=True,
            capture_output=True,
        )
        with pytest.raises(BrokerCommandRefused, match="not made by kiosk-fleet"):
            right.terminal_enrolled("kiosk-x", new_password())
        with pytest.raises(BrokerCommandRefused, match="server's own broker account"):
            right.terminal_enrolled("fleet-server", new_password())
        from fleet_server.broker.mosquitto import BrokerCredentials

        right.reconcile(BrokerCredentials("fleet-server", {"fleet-server": "h"}))
        assert ok(connack(dynsec_broker.port, "kiosk-x", "operator-pw", "anything"))
    finally:
        right.close()


def test_production_refuses_to_start_without_the_dynsec_admin_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_ENVIRONMENT="production",
        FLEET_DB_PATH=str(tmp_path / "fleet.db"),
        FLEET_BROKER_PASSWORD=new_password(),
        FLEET_ADMIN_TOKEN=new_password(),
        FLEET_HTTP_PORT=str(free_port()),
    )
    r = subprocess.run([sys.executable, "-m", "fleet_server", "run"], env=env, capture_output=True, timeout=60)
    assert r.returncode == 2
    assert b"FLEET_BROKER_DYNSEC_PASSWORD is empty" in r.stderr


def test_files_path_binds_client_ids_and_reloads_the_broker(tmp_path: Path) -> None:
    """One host: fleet-server rewrites password file + ACL and SIGHUPs the broker via its pid file."""
    accounts_dir = tmp_path / "accounts"
    accounts_dir.mkdir()
    (accounts_dir / "passwd").write_text("")  # what the operator creates before the broker's first start
    (accounts_dir / "acl").write_text("")
    port = free_port()
    config = BrokerConfig(tmp_path / "broker", port)
    write_operator_layout(config, files_broker_conf(port, str(accounts_dir), host="127.0.0.1"))
    broker = Mosquitto(config)
    broker.start()
    server = ServerProcess(
        tmp_path,
        {
            "FLEET_BROKER_PORT": str(port),
            "FLEET_BROKER_ACCOUNTS": "files",
            "FLEET_BROKER_PASSWD_FILE": str(accounts_dir / "passwd"),
            "FLEET_BROKER_ACL_FILE": str(accounts_dir / "acl"),
            "FLEET_BROKER_PID_FILE": str(config.directory / "mosquitto.pid"),
        },
    )
    try:
        server.start()
        pw_a, pw_b = server.enrol("kiosk-a"), server.enrol("kiosk-b")
        victim = RawClient(port, "kiosk-b", pw_b, client_id="kiosk-b")
        assert ok(victim.connect_rc)
        # use_username_as_clientid: a's credentials under b's or the server's client id connect as
        # kiosk-a, so neither b nor the server's ingest session is knocked off
        for foreign in ("kiosk-b", SERVER_CLIENT_ID, "fleet-server"):
            assert ok(connack(port, "kiosk-a", pw_a, foreign))
        assert not victim.disconnected.is_set()
        victim.close()
        assert server.ingest_sessions() == 1
        honest_event_is_stored_and_receipted(server, port, "kiosk-b", pw_b)
        # rotate: old password refused after the reload, new one works
        new_a = server.rotate("kiosk-a")
        wait_for(lambda: refused(connack(port, "kiosk-a", pw_a, "kiosk-a")), 10, what="old password refused")
        assert ok(connack(port, "kiosk-a", new_a, "kiosk-a"))
        # revoke: the live connection is cut and reconnecting is refused
        live = RawClient(port, "kiosk-a", new_a, client_id="kiosk-a")
        assert ok(live.connect_rc)
        server.revoke("kiosk-a")
        assert live.disconnected.wait(10), "revocation did not cut the live connection"
        live.close()
        assert refused(connack(port, "kiosk-a", new_a, "kiosk-a"))
        assert server.ingest_sessions() == 1
    finally:
        server.stop()
        broker.kill()


def test_server_started_before_the_broker_reconciles_once_it_is_up(tmp_path: Path) -> None:
    broker = DynsecBroker(tmp_path / "broker")  # made, not started: the server comes up first
    server = ServerProcess(
        tmp_path,
        {
            "FLEET_BROKER_PORT": str(broker.port),
            "FLEET_BROKER_ACCOUNTS": "dynsec",
            "FLEET_BROKER_DYNSEC_USERNAME": broker.admin_username,
            "FLEET_BROKER_DYNSEC_PASSWORD": broker.admin_password,
            "FLEET_BROKER_COMMAND_TIMEOUT_S": "2",
        },
    )
    try:
        with pytest.raises(TimeoutError):
            server.start_timeout_s = 8.0
            server.start()
        assert "broker accounts not reconciled yet" in server.log()
        assert server.proc is not None and server.proc.poll() is None  # serving, not dead
        broker.start()
        # the background retry creates the ingest account; the ingest then connects by itself
        wait_for(server.broker_connected, 60, what=f"ingest connected after the broker came up:\n{server.log()}")
        password = server.enrol("kiosk-a")
        assert ok(connack(broker.port, "kiosk-a", password, "kiosk-a"))
        assert refused(connack(broker.port, "kiosk-a", password, SERVER_CLIENT_ID))
    finally:
        server.stop()
        broker.kill()


def test_broker_config_command_prints_what_the_tests_run(tmp_path: Path) -> None:
    from fleet_server.broker.dynsec import broker_conf

    out = subprocess.run(
        [sys.executable, "-m", "fleet_server", "broker-config", "--port", "8883", "--dynsec-file", "/x/dynsec.json"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
    ).stdout
    assert out.endswith(broker_conf(8883, "/x/dynsec.json"))
    assert "mosquitto_ctrl dynsec init /x/dynsec.json fleet-dynsec-admin" in out
    assert "allow_anonymous false" in out and "FLEET_BROKER_DYNSEC_PASSWORD" in out
