"""An account change and the broker's copy of it succeed or fail together (dynsec broker, real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_dev.devstack import DevStack
from fleet_server.broker.accounts import BrokerAccountsUnavailable
from fleet_server.registry.schemas import TerminalCreate
from tests.mqtt_util import connack


def test_enrol_while_the_broker_is_down_changes_nothing_and_a_retry_works(tmp_path: Path) -> None:
    st = DevStack(tmp_path / "stack", accounts="dynsec")
    try:
        assert st.server is not None and st.dynsec is not None
        st.start_server()
        audit_before = len(st.server.auth.audit_log())
        st.dynsec.kill()
        with pytest.raises(BrokerAccountsUnavailable):
            st.server.admin.enrol_terminal(TerminalCreate(id="hd-09", office_id="haidian"), "test")
        assert st.server.registry.store.terminal("hd-09") is None, "a terminal the broker never heard of"
        assert len(st.server.auth.audit_log()) == audit_before, "no audit line for a change that did not happen"

        st.dynsec.start()
        _, password = st.server.admin.enrol_terminal(TerminalCreate(id="hd-09", office_id="haidian"), "test")
        assert st.server.registry.store.terminal("hd-09") is not None
        assert not connack(st.port, "hd-09", password, "hd-09").is_failure
    finally:
        st.close()


def test_rotate_while_the_broker_is_down_keeps_the_old_password(tmp_path: Path) -> None:
    st = DevStack(tmp_path / "stack", accounts="dynsec")
    try:
        assert st.server is not None and st.dynsec is not None
        old = st.enrol("hd-10", "haidian")
        st.start_server()
        st.dynsec.kill()
        with pytest.raises(BrokerAccountsUnavailable):
            st.server.admin.rotate_credentials("hd-10", "test")
        st.dynsec.start()
        assert not connack(st.port, "hd-10", old, "hd-10").is_failure, "the broker still holds the old password"
        # and so does the registry: the old password still verifies against its stored hash
        from fleet_server.broker.mosquitto import hash_password

        stored = st.server.registry.broker_credentials("fleet-server", st.server_password).hashes["hd-10"]
        salt = __import__("base64").b64decode(stored.split("$")[3])
        assert hash_password(old, salt) == stored
    finally:
        st.close()
