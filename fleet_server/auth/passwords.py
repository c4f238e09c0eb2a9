"""Console passwords: scrypt (memory-hard, in the standard library), stored with their parameters.

A stored hash reads `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, so the cost can be raised later
and old hashes still verify. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCRYPT_N = 2**14  # ~16 MB of memory and tens of ms per check: slow for guessing, quick for a login
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 256
# scrypt refuses to run beyond this much memory (128 * n * r bytes plus slack)
_MAXMEM = 64 * 1024 * 1024


class WeakPassword(ValueError):
    """The password is too short or too long: choose another."""


def check_policy(password: str) -> None:
    """Refuse a password a login should not rest on (too short, too long, only blanks)."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise WeakPassword(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise WeakPassword(f"a password has at most {MAX_PASSWORD_CHARS} characters")
    if not password.strip():
        raise WeakPassword("a password cannot be only blanks")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash of `password`, with its parameters, for storage."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Tell whether `password` matches a stored hash (False for a malformed one)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password[:MAX_PASSWORD_CHARS].encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


@functools.cache
def dummy_hash() -> str:
    """A hash to check when the user is unknown or has no password, so that answer takes as long."""
    return hash_password(secrets.token_urlsafe(16))
