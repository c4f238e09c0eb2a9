"""What a kiosk app does with its terminal's agent: HTTP to the agent's local API.

`LocalApi` serves one in-process agent's local API the way `edge-agent run` does (uvicorn in a
thread, loopback, here on a free port) and stops when its agent stops. `KioskClient` is the kiosk
app's side: events with idempotency keys to `/v1/events`, peripheral readings to
`/v1/peripherals/readings`, the agent's API token as a bearer token when the agent has one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from fleet_dev.proc import free_port

if TYPE_CHECKING:
    from edge_agent.agent import Agent

START_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 10.0


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
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
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
