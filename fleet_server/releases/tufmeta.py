"""Small helpers over python-tuf's Metadata API that the keystore and the repository share."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

FACE_ROLE = "face-model"
# TUF path patterns match one segment per "*": models/<counter>/<file>
FACE_PATHS = ["models/*/*"]
TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
SERIALIZER = JSONSerializer(compact=False)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def in_days(days: float, now: datetime | None = None) -> datetime:
    return (now or now_utc()) + timedelta(days=days)


def to_bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(SERIALIZER)


def from_doc(doc: Any, role: str, where: str) -> Metadata[Any]:
    """Metadata from a JSON document, refusing anything that is not `role` metadata."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a TUF metadata object")
    try:
        md: Metadata[Any] = Metadata.from_dict(dict(doc))
    except KeyError as err:
        raise ValueError(f"{where}: not valid TUF metadata (missing field {err})") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: not valid TUF metadata ({err})") from err
    if md.signed.type != ("targets" if role not in TOP_ROLES else role):
        raise ValueError(f"{where}: {md.signed.type} metadata where {role} metadata was expected")
    return md


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
