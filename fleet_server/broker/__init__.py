"""The MQTT broker (Mosquitto): credentials, ACL, configuration and process control."""

from fleet_server.broker.mosquitto import (
    BrokerConfig,
    BrokerCredentials,
    Mosquitto,
    MosquittoNotInstalled,
    hash_password,
    write_broker_files,
)

__all__ = ["BrokerConfig", "BrokerCredentials", "Mosquitto", "MosquittoNotInstalled",
           "hash_password", "write_broker_files"]
