"""What an operator puts on the broker's host: `fleet-server broker-config` prints it."""

from __future__ import annotations

from fleet_server.broker import dynsec, files


def broker_config_text(mode: str, port: int, *, host: str = "", dynsec_file: str, accounts_dir: str) -> str:
    """mosquitto.conf for `mode` ("dynsec" or "files"), with the set-up steps and FLEET_* settings as comments."""
    if mode == "dynsec":
        conf = dynsec.broker_conf(port, dynsec_file, host=host)
        steps = [
            "# 1. Make the plugin's config with its admin account (once; keep the file private to the broker):",
            f"#      mosquitto_ctrl dynsec init {dynsec_file} fleet-dynsec-admin",
            f"#      chown mosquitto: {dynsec_file} && chmod 600 {dynsec_file}",
            "# 2. Put the lines below in /etc/mosquitto/conf.d/kiosk-fleet.conf and restart mosquitto.",
            "# 3. Run fleet-server with (it creates its own ingest account and every terminal's):",
            "#      FLEET_BROKER_ACCOUNTS=dynsec            (the default in production)",
            "#      FLEET_BROKER_HOST=<this broker>  FLEET_BROKER_PORT=" + str(port),
            "#      FLEET_BROKER_DYNSEC_USERNAME=fleet-dynsec-admin  FLEET_BROKER_DYNSEC_PASSWORD=<from step 1>",
            "#      FLEET_BROKER_PASSWORD=<a new random secret for the server's ingest account>",
        ]
    elif mode == "files":
        conf = files.broker_conf(port, accounts_dir, host=host)
        steps = [
            "# Broker and fleet-server on the same host; fleet-server rewrites the two files and SIGHUPs mosquitto.",
            "# 1. Make the folder, writable by fleet-server, readable by the broker's group:",
            f"#      install -d -o <fleet user> -g mosquitto -m 2750 {accounts_dir}",
            f"#      install -o <fleet user> -g mosquitto -m 640 /dev/null {accounts_dir}/passwd",
            f"#      install -o <fleet user> -g mosquitto -m 640 /dev/null {accounts_dir}/acl",
            "# 2. Put the lines below in /etc/mosquitto/conf.d/kiosk-fleet.conf and restart mosquitto.",
            "#    fleet-server must be allowed to signal the broker (the same user, or root).",
            "# 3. Run fleet-server with:",
            "#      FLEET_BROKER_ACCOUNTS=files",
            f"#      FLEET_BROKER_PASSWD_FILE={accounts_dir}/passwd  FLEET_BROKER_ACL_FILE={accounts_dir}/acl",
            "#      FLEET_BROKER_PID_FILE=/run/mosquitto/mosquitto.pid  FLEET_BROKER_PASSWORD=<a new random secret>",
        ]
    else:
        raise ValueError(f"broker accounts mode {mode!r}: choose dynsec or files")
    return "\n".join(steps) + "\n\n" + conf
