"""What a kiosk app does with its terminal's agent: HTTP to the agent's local API.

`LocalApi` serves one in-process agent's local API the way `edge-agent run` does (uvicorn in a
thread, loopback, here on a free port) and stops when its agent stops. `KioskClient` is the kiosk
app's side: events with idempotency keys to `/v1/events`, peripheral readings to
`/v1/peripherals/readings`, the agent's API token as a bearer token when the agent has one.

A real agent started without an API token warns about it, once, as it should. A simulated fleet
starts many such agents in one process; `one_tokenless_warning` says it once for all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from fleet_dev.proc import free_port

if TYPE_CHECKING:
    from edge_agent.agent import Agent

START_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 10.0
# the agent's warning when its local API is served without a token (edge_agent.api.guard)
GUARD_LOGGER = "edge_agent.api.guard"
TOKENLESS_WARNING = "the local API runs WITHOUT a token"

log = logging.getLogger(__name__)


class _HoldTokenless(logging.Filter):
    """Holds back the guard's no-token warnings raised on one thread (the one building the fleet)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.environments: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or not record.getMessage().startswith(TOKENLESS_WARNING):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        self.environments.append(str(args[0]) if args else "?")
        return False


@contextmanager
def one_tokenless_warning(what: str = "simulated terminals") -> Iterator[None]:
    """While serving many agents' local APIs, warn once for all that run without a token.

    Only the agents started on this thread inside the block are summarised; any other agent's
    warning (a real one's, or one from another thread) passes through unchanged."""
    guard_log = logging.getLogger(GUARD_LOGGER)
    held = _HoldTokenless()
    guard_log.addFilter(held)
    try:
        yield
    finally:
        guard_log.removeFilter(held)
        if held.environments:
            log.warning(
                "the local APIs of %d %s run WITHOUT a token (environment %s, no api_token_file)",
                len(held.environments),
                what,
                ", ".join(sorted(set(held.environments))),
            )


def api_token(agent: "Agent") -> str | None:
    """The agent's local-API token, if its settings carry one (inline or in a file)."""
    token: Any = getattr(agent.settings, "api_token", None)
    if token is not None and hasattr(token, "get_secret_value"):
        token = token.get_secret_value()
    if not token:
        path = getattr(agent.settings, "api_token_file", None)
        if path:
            token = Path(path).read_text(encoding="utf-8").strip()
    return str(token) if token else None


def local_api_app(agent: "Agent") -> Any:
    """The agent's local API as `edge-agent run` builds it, with the peripheral routes."""
    from edge_agent.api import create_api
    from edge_agent.api.peripheral_routes import build_peripheral_router

    app = create_api(agent)
    if not any(getattr(r, "path", "") == "/v1/peripherals/readings" for r in app.routes):
        app.include_router(build_peripheral_router(agent.health_monitor))
    return app


class _AgentBoundServer(uvicorn.Server):
    """A uvicorn server that also exits when its agent has stopped."""

    def __init__(self, config: uvicorn.Config, agent: "Agent") -> None:
        super().__init__(config)
        self._agent = agent

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self._agent.stopped


class LocalApi:
    """One agent's local API on a free loopback port, served from a thread."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = local_api_app(agent)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = _AgentBoundServer(config, agent)
        self._thread = threading.Thread(
            target=self._server.run, name=f"local-api-{agent.settings.terminal_id}", daemon=True
        )

    def start(self) -> LocalApi:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"local API of {self.agent.settings.terminal_id} did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)


class KioskClient:
    """The kiosk app's HTTP client for one terminal."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def post_event(self, event_type: str, body: dict[str, Any], ts: str | None, key: str) -> httpx.Response:
        """POST /v1/events with an idempotency key; one retry on a dropped connection, same key."""
        doc: dict[str, Any] = {"type": event_type, "body": body, "key": key}
        if ts is not None:
            doc["ts"] = ts
        try:
            return self._http.post("/v1/events", json=doc)
        except httpx.TransportError:
            return self._http.post("/v1/events", json=doc)

    def post_readings(self, peripheral: str, readings: dict[str, float], fault: str | None = None) -> httpx.Response:
        doc: dict[str, Any] = {"peripheral": peripheral, "readings": readings}
        if fault is not None:
            doc["fault"] = fault
        return self._http.post("/v1/peripherals/readings", json=doc)

    def health(self) -> dict[str, Any]:
        response = self._http.get("/v1/health")
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
        return doc

    def peripherals(self) -> dict[str, Any]:
        response = self._http.get("/v1/peripherals")
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
        return doc

    def close(self) -> None:
        self._http.close()
