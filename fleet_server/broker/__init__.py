"""The MQTT broker (Mosquitto): accounts, ACL and the way the server keeps them in step with the registry."""

from fleet_server.broker.mosquitto import (
    BrokerConfig,
    BrokerCredentials,
    hash_password,
    write_broker_files,
)

__all__ = ["BrokerConfig", "BrokerCredentials", "hash_password", "write_broker_files"]
