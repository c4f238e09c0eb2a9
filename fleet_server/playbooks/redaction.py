"""Keep secrets out of what we store: by key name, and by value wherever it reappears."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
# Substring match: terminal_password, new_password, api_token, client_secret are all secrets.
SECRET_KEY_RE = re.compile(r"password|passwd|token|secret", re.IGNORECASE)
# Values shorter than this are not scrubbed out of free text: "1" or "ok" would shred messages.
MIN_SCRUB_LENGTH = 6


def is_secret_key(key: object) -> bool:
    """Tell whether a mapping key names a secret."""
    return isinstance(key, str) and SECRET_KEY_RE.search(key) is not None


def secret_values(value: Any) -> set[str]:
    """Every string held under a secret-looking key anywhere inside `value`."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if is_secret_key(k) and isinstance(v, str | int | float) and not isinstance(v, bool):
                found.add(str(v))
            else:
                found |= secret_values(v)
    elif isinstance(value, list | tuple):
        for v in value:
            found |= secret_values(v)
    return found


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of `value` with secret keys replaced and known secret values cut out of strings."""
    scrub = sorted((s for s in secrets if len(s) >= MIN_SCRUB_LENGTH), key=len, reverse=True)
    return _redact(value, scrub)


def _redact(value: Any, scrub: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) else _redact(v, scrub)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, scrub) for v in value]
    if isinstance(value, str):
        for s in scrub:
            if s in value:
                value = value.replace(s, REDACTED)
        return value
    return value
