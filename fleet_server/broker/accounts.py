"""How the server keeps the broker's accounts in step with the registry.

`FleetServer` calls these hooks after each registry change has committed; the implementation
(Mosquitto's dynamic-security plugin, or the password and ACL files of a broker on the same host)
is chosen from settings in the composition root.
"""

from __future__ import annotations

from typing import Protocol

from fleet_server.broker.mosquitto import BrokerCredentials


class BrokerAccounts(Protocol):
    def terminal_enrolled(self, terminal_id: str, password: str) -> None:
        """A new terminal may connect with `password`, under its own client id only."""

    def terminal_password_changed(self, terminal_id: str, password: str) -> None:
        """The old password is refused from now on."""

    def terminal_revoked(self, terminal_id: str) -> None:
        """The account is gone and any live connection under it is cut."""

    def reconcile(self, credentials: BrokerCredentials) -> None:
        """At start: make the broker's accounts match the registry (`credentials` holds every enabled one)."""

    def close(self) -> None:
        """Release connections to the broker."""


class BrokerAccountsError(RuntimeError):
    """The broker's accounts could not be brought in step with the registry."""


class BrokerAccountsUnavailable(BrokerAccountsError):
    """The broker did not answer (down, unreachable, or no reply in time).

    The change may or may not have been applied; every change is idempotent, so retry it (for a
    terminal: rotate its credentials) once the broker is reachable again.
    """


class BrokerCommandRefused(BrokerAccountsError):
    """The broker answered and refused: a configuration or naming problem to report, not to retry."""

    def __init__(self, command: str, error: str, what_next: str = "") -> None:
        self.command = command
        self.error = error
        super().__init__(f"broker refused {command}: {error}" + (f"; {what_next}" if what_next else ""))
