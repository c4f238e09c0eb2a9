"""`edge-agent run`: start the agent and its local API."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Kiosk terminal edge agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent (settings from EDGE_* variables or --config)")
    run.add_argument("--config", help="YAML settings file")
    run.add_argument("--no-api", action="store_true", help="do not serve the local HTTP API")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from edge_agent.agent import Agent
    from edge_agent.api.guard import ApiTokenUnusable
    from edge_agent.config import AgentSettings

    # The outbox, face templates and logs hold citizens' data: nothing the agent creates is for others.
    os.umask(0o077)
    try:
        settings = AgentSettings.from_file(args.config) if args.config else AgentSettings()
    except (ValidationError, ValueError, OSError) as err:
        print(f"edge-agent: configuration is not usable:\n{err}", file=sys.stderr)
        return 2
    from edge_agent.update.overlay import OverlayRefused
    from edge_agent.update.updater import note_clean_stop, startup_overlay

    try:
        overlay = startup_overlay(settings.data_dir, settings.install_root)
    except (OverlayRefused, OSError, ValueError) as err:
        logging.getLogger("edge_agent.update").error("config release settings not applied: %s", err)
        overlay = {}
    if overlay:
        logging.getLogger("edge_agent.update").info("settings from config releases: %s", sorted(overlay))
        settings = settings.model_copy(update=overlay)
    agent = Agent(settings)
    server = None
    if not args.no_api:
        import uvicorn

        from edge_agent.api import create_api

        try:
            app = create_api(agent, extra_routers=_face_routers(agent))
        except ApiTokenUnusable as err:
            agent.outbox.close()
            print(f"edge-agent: configuration is not usable:\n{err}", file=sys.stderr)
            return 2
        config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="warning")
        server = uvicorn.Server(config)
        # run in a thread, uvicorn installs no signal handlers: SIGTERM stays ours (below)
    agent.start()
    # set by SIGTERM/SIGINT, or by the updater after an install (exit code EXIT_RESTART)
    stop = agent.exit_requested
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    api_thread = None
    if server is not None:
        api_thread = threading.Thread(target=server.run, name="local-api", daemon=True)
        api_thread.start()
    from edge_agent import systemd

    systemd.notify("READY=1")
    systemd.start_watchdog(agent.alive, stop)
    stop.wait()
    systemd.notify("STOPPING=1")
    if server and api_thread:
        # requests in flight finish before the outbox closes (a restart after an install must not
        # answer the kiosk app 500 for an event it posted during the switch)
        server.should_exit = True
        api_thread.join(10)
    agent.stop(graceful=True)
    note_clean_stop(settings.install_root)
    return agent.exit_code


def _face_routers(agent: Any) -> list[Any]:
    """Build face login if its packages and models are usable; the agent runs without it."""
    log = logging.getLogger("edge_agent.face")
    try:
        from edge_agent.face import FaceError, build_face_service

        settings = agent.settings.face
        if not settings.enabled:
            log.info("face login disabled by configuration (face.enabled in agent.yaml, or EDGE_FACE_ENABLED)")
            return []
        service = build_face_service(agent, settings)
        from edge_agent.api.face_routes import build_face_router
    except (FaceError, ValidationError, ImportError, OSError) as err:
        log.warning("face login is unavailable on this terminal: %s", err)
        return []
    log.info("face login ready: model %s, %d templates", settings.model_version, len(service.gallery))
    return [build_face_router(service)]


if __name__ == "__main__":
    sys.exit(main())
