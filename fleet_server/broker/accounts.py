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
