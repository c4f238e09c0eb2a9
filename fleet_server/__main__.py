"""`fleet-server run`: serve the API and run the ingest (settings from FLEET_* variables)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-server", description="Kiosk fleet server")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the server (settings from FLEET_* environment variables)")
    bc = sub.add_parser("broker-config", help="print the mosquitto.conf and set-up steps for the broker accounts")
    bc.add_argument("--accounts", choices=["dynsec", "files"], default="dynsec")
    bc.add_argument("--port", type=int, default=1883)
    bc.add_argument("--host", default="", help="address to listen on (all, if empty)")
    bc.add_argument("--dynsec-file", default="/var/lib/mosquitto/dynamic-security.json")
    bc.add_argument("--accounts-dir", default="/etc/mosquitto/kiosk-fleet")
    args = parser.parse_args(argv)
    if args.cmd == "broker-config":  # needs no settings: it runs on the broker's host
        from fleet_server.broker.operator import broker_config_text

        print(
            broker_config_text(
                args.accounts, args.port, host=args.host, dynsec_file=args.dynsec_file, accounts_dir=args.accounts_dir
            ),
            end="",
        )
        return 0
    # Everything the server writes (database, run directories with credentials, logs) is its own:
    # no group or world bits unless a file is created with an explicit mode.
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fleet_server.config import ServerSettings

    try:
        settings = ServerSettings()
    except (ValidationError, ValueError) as err:
        print(f"fleet-server: configuration is not usable:\n{err}", file=sys.stderr)
        return 2
    if args.cmd == "run":
        import uvicorn

        from fleet_server.app import create_app
        from fleet_server.config import ConfigurationError
        from fleet_server.registry.profiles import ProfileError

        try:
            app = create_app(settings)
        except (ConfigurationError, ProfileError) as err:
            print(f"fleet-server: cannot start: {err}", file=sys.stderr)
            return 2
        uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
