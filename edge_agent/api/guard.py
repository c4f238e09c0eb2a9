"""What stands between the local API and any caller but the kiosk app.

One ASGI middleware, in this order, before a route sees a byte of the body:

1. **Host header**: only loopback names (`127.0.0.1`, `localhost`, `[::1]`, any port). A web page
   in the kiosk's browser that rebinds its own DNS name to 127.0.0.1 still sends its own name as
   Host, so it is refused (421) and can neither read nor write here.
2. **Token**: every route but the bare liveness probe needs `Authorization: Bearer <token>`, the
   per-terminal token the provisioning playbook writes into a file that only the agent and the
   kiosk app may read. Compared in constant time.
3. **Body size, while reading**: a declared Content-Length over the route's limit is refused
   before reading; a chunked (or lying) body is counted message by message and refused with 413
   the moment it passes the limit, so at most one limit's worth is ever held in memory.
"""

from __future__ import annotations

import hmac
import json
import logging
import stat
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LIVENESS_PATH = "/v1/live"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
# 32 characters of a random token: what `openssl rand -hex 16` gives; the playbook writes 64.
MIN_TOKEN_CHARS = 32
MAX_TOKEN_FILE_BYTES = 4096


class ApiTokenUnusable(Exception):
    """The local API's token file is missing, empty, too short or readable by others: fix it, then start."""


def load_api_token(path: Path) -> bytes:
    """Read the API token from `path`, refusing a file that anyone but its owner and group may read."""
    try:
        info = path.stat()
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ApiTokenUnusable(f"API token file {path} is not a regular file")
        if mode & 0o037:  # other users: nothing; the group: read only (0640 for the kiosk app's group)
            raise ApiTokenUnusable(
                f"API token file {path} has mode {mode:o}; it must be 0600 or 0640 (owner and the kiosk "
                f"app's group only): chmod 640 it"
            )
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as err:
        raise ApiTokenUnusable(f"API token file {path} cannot be read: {err}") from err
    token = raw.strip()
    if len(raw) > MAX_TOKEN_FILE_BYTES or len(token) < MIN_TOKEN_CHARS or not token.isascii() or b" " in token:
        raise ApiTokenUnusable(
            f"API token file {path} must hold one token of {MIN_TOKEN_CHARS} or more printable characters"
        )
    return token


def resolve_api_token(token_file: Path | None, environment: str) -> bytes | None:
    """The token the API requires, or None when a non-production agent is configured without one."""
    if token_file is not None:
        return load_api_token(token_file)
    if environment == "production":
        raise ApiTokenUnusable(
            "api_token_file is not set: a production terminal's local API needs the token file the "
            "provisioning playbook writes (EDGE_API_TOKEN_FILE or api_token_file in agent.yaml)"
        )
    log.warning("the local API runs WITHOUT a token (environment %s, no api_token_file)", environment)
    return None


def host_is_loopback(value: str) -> bool:
    """`127.0.0.1`, `localhost` or `[::1]`, each with or without `:port`."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end > 0 else (host, "")
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return False
    return name in LOOPBACK_HOSTS


class LocalGuard:
    """ASGI middleware: loopback Host, the API token, and body limits enforced while reading."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: bytes | None,
        limits: Sequence[tuple[str, int]],
        default_limit: int,
    ) -> None:
        self.app = app
        self.token = token
        # longest prefix first, so "/v1/face/" wins over a shorter one
        self.limits = sorted(limits, key=lambda item: -len(item[0]))
        self.default_limit = default_limit

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), []).append(value)
        hosts = headers.get(b"host", [])
        if len(hosts) != 1 or not host_is_loopback(hosts[0].decode("latin-1")):
            await _refuse(
                send,
                421,
                "wrong_host",
                "this API answers only to requests addressed to 127.0.0.1, localhost or [::1] "
                "(the Host header said otherwise)",
            )
            return
        path: str = scope["path"]
        if self.token is not None and not (path == LIVENESS_PATH and scope["method"] in ("GET", "HEAD")):
            problem = self._token_problem(headers.get(b"authorization", []))
            if problem:
                await _refuse(send, 401, *problem, extra=[(b"www-authenticate", b'Bearer realm="kiosk-agent"')])
                return
        limit = self.limit_for(path)
        lengths = headers.get(b"content-length", [])
        if lengths and (len(lengths) > 1 or not lengths[0].isdigit() or int(lengths[0]) > limit):
            await _refuse(send, 413, "too_large", f"request body over {limit} bytes", close=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(send, 413, "too_large", f"request body over {limit} bytes", close=True)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _token_problem(self, values: list[bytes]) -> tuple[str, str] | None:
        assert self.token is not None
        values = [v for v in values if v.strip()]
        if not values:
            return (
                "missing_token",
                "this API needs the terminal's API token: send 'Authorization: Bearer <token>' "
                "(the token is in the file named by the agent's api_token_file)",
            )
        scheme, _, presented = values[0].strip().partition(b" ")
        if len(values) != 1 or scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self.token):
            return "bad_token", "the API token is wrong: use the one in the agent's api_token_file"
        return None


async def _refuse(
    send: Send,
    status: int,
    code: str,
    detail: str,
    *,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": code, "detail": detail, "where": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        # the rest of the body is never read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
