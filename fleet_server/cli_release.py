"""fleetctl release …: see the commands below. Registered on the main app by fleet_server/cli.py."""

from __future__ import annotations

import typer

app = typer.Typer(help="Releases (see `fleetctl release --help`).", no_args_is_help=True, add_completion=False)
