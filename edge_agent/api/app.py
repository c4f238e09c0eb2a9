"""Local HTTP API: the kiosk app posts events and reads the agent's health here."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from edge_agent.api.guard import LIVENESS_PATH, LocalGuard, resolve_api_token
from edge_agent.outbox.store import IdempotencyKeyReused, InvalidEvent, OutboxFull, OutboxStorageError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

# Every route's body limit unless it has its own: an event, a peripheral report, a face erase.
MAX_REQUEST_BYTES = 64 * 1024
EVENTS_PATH = "/v1/events"
# Face routes carry base64 camera frames: their limit comes from the face settings.
FACE_PREFIX = "/v1/face/"


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=64, examples=["service.completed"])
    body: dict[str, Any] = Field(examples=[{"session": "s-1", "service_code": "TQ02", "duration_s": 142.5}])
    ts: AwareDatetime | None = None
    key: str | None = Field(
        default=None,
        min_length=8,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="idempotency key: a retry with the same key stores nothing new",
    )


class EventStored(BaseModel):
    seq: int
    epoch: str
    type: str
    replayed: bool = False


def error(status: int, code: str, detail: str, where: str | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, "where": where}, status_code=status)


def create_api(agent: "Agent", extra_routers: list[APIRouter] | None = None) -> FastAPI:
    """Build the local API around a running agent.

    Raises ApiTokenUnusable when the agent's api_token_file is unusable, or unset in production.
    """
    from edge_agent.api.peripheral_routes import build_peripheral_router

    settings = agent.settings
    token = resolve_api_token(settings.api_token_file, settings.environment)
    app = FastAPI(title="kiosk edge agent (local API)", version="1")
    app.add_middleware(
        LocalGuard,
        token=token,
        limits=[(EVENTS_PATH, MAX_REQUEST_BYTES), (FACE_PREFIX, settings.face.max_request_bytes)],
        default_limit=MAX_REQUEST_BYTES,
    )
    registry = agent.metrics_registry

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, "invalid_request", str(first.get("msg")), where)

    @app.post("/v1/events", status_code=201, response_model=EventStored)
    def post_event(
        event: EventIn, response: Response, idempotency_key: Annotated[str | None, Header(max_length=128)] = None
    ) -> Any:
        """Store one event durably; 201 means it is on disk and will reach the centre.

        Send a key (body `key` or header `Idempotency-Key`) and retry freely: a repeat of a stored
        event answers 200 with the first event's seq and stores nothing; the same key with a
        different event answers 409 `idempotency_key_reused` and stores nothing.
        """
        ts: datetime | None = event.ts
        key = event.key or idempotency_key
        try:
            item = agent.post_event(event.type, event.body, ts=ts, key=key)
        except InvalidEvent as err:
            return error(422, err.reason, str(err), "body" if err.reason == "bad_body" else "type")
        except IdempotencyKeyReused as err:
            return error(409, "idempotency_key_reused", str(err), "key")
        except OutboxFull as err:
            return error(507, "outbox_full", str(err))
        except OutboxStorageError as err:
            return error(507, "storage_failed", str(err))
        if item.replayed:
            response.status_code = 200
        return EventStored(seq=item.seq, epoch=agent.outbox.epoch, type=item.type, replayed=item.replayed)

    @app.get(LIVENESS_PATH)
    def live() -> Response:
        """Liveness probe, the one route without a token: 200 and nothing else, not even a version."""
        return Response(status_code=200)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        """The agent's health: link, outbox, peripherals, and plain-language problems."""
        return agent.health()

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_peripheral_router(agent.health_monitor))
    from edge_agent.api.update_routes import build_update_router

    app.include_router(build_update_router(agent.updater))
    for router in extra_routers or []:
        app.include_router(router)
    return app
