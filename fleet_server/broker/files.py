"""Broker accounts for a Mosquitto on the same host: password file + ACL rewritten, then SIGHUP.

Every change rewrites both files from the registry (the one source of truth, so a lost change
heals at the next one) and signals the broker, which re-reads them without dropping anyone else
and disconnects clients whose account is gone. Client ids are bound by the broker's
`use_username_as_clientid true` (see `broker_conf`): a terminal's credentials then always connect
as its own id, whatever client id they ask for.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from fleet_server.broker.accounts import BrokerAccountsUnavailable, BrokerCommandRefused
from fleet_server.broker.mosquitto import BrokerCredentials, write_account_files

log = logging.getLogger(__name__)

# Group-readable: Debian's broker runs as user mosquitto; give the folder group mosquitto and the
# set-group-id bit (chmod 2750) so the files it must read are its group's.
FILE_MODE = 0o640


def signal_pid_file(pid_file: Path) -> Callable[[], None]:
    """A reload that sends SIGHUP to the process named in Mosquitto's `pid_file`."""

    def reload() -> None:
        try:
            pid = int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError) as err:
            raise BrokerAccountsUnavailable(
                f"FLEET_BROKER_PID_FILE={pid_file}: no broker pid there ({err}); is Mosquitto running with"
                " `pid_file` set to this path? The files are written; it reads them when it (re)starts"
            ) from err
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError as err:
            raise BrokerAccountsUnavailable(
                f"FLEET_BROKER_PID_FILE={pid_file} names pid {pid}, which is not running: start the broker"
            ) from err
        except PermissionError as err:
            raise BrokerCommandRefused(
                "SIGHUP",
                f"not allowed to signal the broker (pid {pid})",
                "run fleet-server as the broker's user, or use FLEET_BROKER_ACCOUNTS=dynsec",
            ) from err

    return reload


class FileAccounts:
    """BrokerAccounts over Mosquitto's password file and ACL on this host."""

    def __init__(
        self,
        passwd_path: Path,
        acl_path: Path,
        reload: Callable[[], None],
        credentials: Callable[[], BrokerCredentials],
        *,
        file_mode: int = FILE_MODE,
    ) -> None:
        self.passwd_path = passwd_path
        self.acl_path = acl_path
        self._reload = reload
        self._credentials = credentials
        self.file_mode = file_mode

    def _apply(self, credentials: BrokerCredentials | None = None) -> None:
        creds = credentials or self._credentials()
        try:
            write_account_files(self.passwd_path, self.acl_path, creds, self.file_mode)
        except OSError as err:
            raise BrokerCommandRefused(
                "write", f"cannot write {self.passwd_path} or {self.acl_path}: {err}", "fix the folder's permissions"
            ) from err
        self._reload()
        log.info("broker password file and ACL rewritten (%d accounts); broker reloaded", len(creds.hashes))

    def _check_not_server(self, terminal_id: str) -> None:
        server = self._credentials().server_username
        if terminal_id == server:
            raise BrokerCommandRefused(
                "write",
                f"terminal id {terminal_id!r} is the server's own broker account",
                "revoke it and enrol the terminal under another id",
            )

    def terminal_enrolled(self, terminal_id: str, password: str) -> None:
        self._check_not_server(terminal_id)
        self._apply()

    def terminal_password_changed(self, terminal_id: str, password: str) -> None:
        self._check_not_server(terminal_id)
        self._apply()

    def terminal_revoked(self, terminal_id: str) -> None:
        self._apply()

    def reconcile(self, credentials: BrokerCredentials) -> None:
        self._apply(credentials)

    def close(self) -> None:
        pass


def broker_conf(port: int, directory: str, *, host: str = "") -> str:
    """The conf.d snippet for the file-based path (broker on the server's host).

    Debian's main mosquitto.conf already sets `pid_file /run/mosquitto/mosquitto.pid` (what
    FLEET_BROKER_PID_FILE points at) and persistence; they are not repeated here.
    """
    lines = [
        "# kiosk-fleet broker: accounts in files written by fleet-server (same host)",
        "per_listener_settings false",
        f"listener {port}{' ' + host if host else ''}",
        "allow_anonymous false",
        f"password_file {directory}/passwd",
        f"acl_file {directory}/acl",
        # Binds every account to its own client id: the same credentials cannot take over another
        # terminal's session or the server's. The server's session is then named by its username.
        "use_username_as_clientid true",
    ]
    return "\n".join(lines) + "\n"
