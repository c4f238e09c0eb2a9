"""Console logins: sessions held in the server's memory, a CSRF token per session.

The session cookie carries a random token; the server keeps only its SHA-256, the user's name, a
CSRF token and two times. A session ends when it is idle for `idle_s`, `max_s` after the login, on
logout, or when the server restarts (everyone logs in again; nothing to steal from the disk).
The user's role is read again on every request, so a changed or disabled user takes effect at once,
and a session made before the user's password changed ends.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_SESSIONS = 10_000


@dataclass(slots=True)
class Session:
    user: str
    csrf: str
    created: float
    last_seen: float
    stamp: str = ""  # of the password it was made with (AuthService.login_stamp)


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(
        self,
        idle_s: float,
        max_s: float,
        *,
        clock: Callable[[], float] = time.time,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, user: str, stamp: str = "") -> tuple[str, Session]:
        """A new session for `user`: its cookie token (shown once) and the session."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(user, secrets.token_urlsafe(32), now, now, stamp)
        with self._lock:
            self._sessions[_key(token)] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)  # the least recently used goes
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie token (and mark it used), or None."""
        if not token or len(token) > 100:
            return None
        key = _key(token)
        now = self.clock()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if now - session.last_seen > self.idle_s or now - session.created > self.max_s:
                del self._sessions[key]
                return None
            session.last_seen = now
            self._sessions.move_to_end(key)
            return session

    def drop(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(_key(token), None)

    def drop_user(self, user: str) -> int:
        """End every session of `user` (e.g. after their password changed); returns how many."""
        with self._lock:
            keys = [k for k, s in self._sessions.items() if s.user == user]
            for k in keys:
                del self._sessions[k]
        return len(keys)


def same_token(expected: str, given: str | None) -> bool:
    """Compare a CSRF token in constant time."""
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
