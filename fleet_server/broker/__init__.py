"""The MQTT broker (Mosquitto): accounts, ACL and the way the server keeps them in step with the registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fleet_server.broker.accounts import (
    BrokerAccounts,
    BrokerAccountsError,
    BrokerAccountsUnavailable,
    BrokerCommandRefused,
)
from fleet_server.broker.mosquitto import (
    BrokerConfig,
    BrokerCredentials,
    hash_password,
    write_broker_files,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from fleet_server.config import ServerSettings

__all__ = [
    "BrokerAccounts",
    "BrokerAccountsError",
    "BrokerAccountsUnavailable",
    "BrokerCommandRefused",
    "BrokerConfig",
    "BrokerCredentials",
    "accounts_mode",
    "build_broker_accounts",
    "hash_password",
    "write_broker_files",
]


def accounts_mode(settings: ServerSettings) -> str:
    """FLEET_BROKER_ACCOUNTS, or its default: dynsec in production, none elsewhere."""
    return settings.broker_accounts or ("dynsec" if settings.environment == "production" else "none")


def build_broker_accounts(
    settings: ServerSettings,
    credentials: Callable[[], BrokerCredentials],
    registry: CollectorRegistry | None = None,
) -> BrokerAccounts | None:
    """The broker-accounts implementation the settings ask for (None: accounts are managed by hand).

    `credentials` reads every enabled account from the registry (the file path rewrites them all).
    Nothing connects here; the first command or `reconcile` does.
    """
    from fleet_server.config import ConfigurationError

    mode = accounts_mode(settings)
    if mode == "none":
        return None
    if mode == "files":
        from fleet_server.broker.files import FileAccounts, signal_pid_file

        return FileAccounts(
            settings.broker_passwd_file,
            settings.broker_acl_file,
            signal_pid_file(settings.broker_pid_file),
            credentials,
        )
    from fleet_server.broker.dynsec import DynsecAccounts, DynsecSettings

    if not settings.broker_dynsec_password:
        raise ConfigurationError(
            "FLEET_BROKER_DYNSEC_PASSWORD is empty: the server manages terminal accounts as the broker's"
            " dynamic-security admin; set it to the password given to `mosquitto_ctrl dynsec init`"
            " (or set FLEET_BROKER_ACCOUNTS=files or none)"
        )
    if settings.broker_dynsec_client_id == settings.broker_client_id:
        raise ConfigurationError(
            "FLEET_BROKER_DYNSEC_CLIENT_ID equals FLEET_BROKER_CLIENT_ID: the two connections would knock each"
            " other off; give them different client ids"
        )
    return DynsecAccounts(
        DynsecSettings(
            host=settings.broker_host,
            port=settings.broker_port,
            admin_username=settings.broker_dynsec_username,
            admin_password=settings.broker_dynsec_password,
            admin_client_id=settings.broker_dynsec_client_id,
            server_username=settings.broker_username,
            server_password=settings.broker_password,
            server_client_id=settings.broker_client_id,
            tls_ca=settings.tls_ca,
            timeout_s=settings.broker_command_timeout_s,
        ),
        registry,
    )
