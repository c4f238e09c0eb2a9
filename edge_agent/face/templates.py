"""Face templates at rest: AES-GCM encrypted files named by an HMAC of the citizen id."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_agent.face.errors import TemplateStoreError, UnknownCitizen

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
FILE_MAGIC = b"KFT1"
SUFFIX = ".tpl"


@dataclass(frozen=True, slots=True)
class TemplateRecord:
    """A decrypted template, held in memory only."""

    template_id: str
    citizen_id: str
    vector: np.ndarray
    model_version: str
    enrolled_at: str


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    """What `list` shows: metadata only, never the vector or the citizen id."""

    template_id: str
    model_version: str
    enrolled_at: str
    size_bytes: int


def load_or_create_key(path: Path) -> bytes:
    """Read the 32-byte master key, creating it 0600 if absent; refuse a key others can read."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TemplateStoreError(
            f"key file {path} has mode {mode:o}; it must be 0600 (chmod 600 it, or remove it and re-enrol)"
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise TemplateStoreError(f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def _derive(master: bytes, purpose: bytes) -> bytes:
    # Separate keys for encryption and for the id hash, so neither use weakens the other.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


class TemplateStore:
    """Encrypted template files in one directory; the citizen id appears only inside ciphertext."""

    def __init__(self, directory: Path, key_file: Path) -> None:
        master = load_or_create_key(key_file)
        self._aead = AESGCM(_derive(master, b"kiosk-face-template-aead-v1"))
        self._id_key = _derive(master, b"kiosk-face-citizen-hmac-v1")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.unreadable = 0

    def template_id(self, citizen_id: str) -> str:
        """Keyed hash of a citizen id: stable on this terminal, meaningless without its key."""
        return hmac.new(self._id_key, citizen_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def _path(self, template_id: str) -> Path:
        return self.directory / f"{template_id}{SUFFIX}"

    def save(self, citizen_id: str, vector: np.ndarray, model_version: str) -> TemplateRecord:
        """Encrypt and write a template atomically (replacing any earlier one for this citizen)."""
        tid = self.template_id(citizen_id)
        record = TemplateRecord(
            tid,
            citizen_id,
            np.asarray(vector, dtype=np.float32).copy(),
            model_version,
            datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )
        plain = json.dumps(
            {
                "citizen_id": citizen_id,
                "model_version": model_version,
                "enrolled_at": record.enrolled_at,
                "vector": base64.b64encode(record.vector.tobytes()).decode("ascii"),
            }
        ).encode("utf-8")
        nonce = os.urandom(NONCE_BYTES)
        # The template id is bound as associated data: a file renamed to another id fails to open.
        blob = FILE_MAGIC + nonce + self._aead.encrypt(nonce, plain, FILE_MAGIC + tid.encode("ascii"))
        final = self._path(tid)
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._sync_dir()
        return record

    def load(self, template_id: str) -> TemplateRecord:
        """Decrypt one template file; raise TemplateStoreError if it is not ours or was altered."""
        path = self._path(template_id)
        blob = path.read_bytes()
        if not blob.startswith(FILE_MAGIC) or len(blob) < len(FILE_MAGIC) + NONCE_BYTES + 16:
            raise TemplateStoreError(f"{path.name} is not a template file")
        nonce = blob[len(FILE_MAGIC) : len(FILE_MAGIC) + NONCE_BYTES]
        try:
            plain = self._aead.decrypt(
                nonce,
                blob[len(FILE_MAGIC) + NONCE_BYTES :],
                FILE_MAGIC + template_id.encode("ascii"),
            )
        except InvalidTag as err:
            raise TemplateStoreError(f"{path.name} does not decrypt with this terminal's key") from err
        doc = json.loads(plain)
        vector = np.frombuffer(base64.b64decode(doc["vector"]), dtype=np.float32).copy()
        return TemplateRecord(template_id, doc["citizen_id"], vector, doc["model_version"], doc["enrolled_at"])

    def load_all(self) -> Iterator[TemplateRecord]:
        """Yield every readable template; unreadable files are counted and logged, not fatal."""
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                yield self.load(path.name[: -len(SUFFIX)])
            except (TemplateStoreError, OSError, ValueError, KeyError) as err:
                self.unreadable += 1
                log.warning("face template skipped: %s", err)

    def exists(self, citizen_id: str) -> bool:
        """True if a template is stored for this citizen."""
        return self._path(self.template_id(citizen_id)).exists()

    def erase(self, citizen_id: str) -> str:
        """Delete the citizen's template file; raise UnknownCitizen if there is none."""
        tid = self.template_id(citizen_id)
        try:
            self._path(tid).unlink()
        except FileNotFoundError as err:
            raise UnknownCitizen(f"no template enrolled for template id {tid[:12]}…") from err
        self._sync_dir()
        return tid

    def infos(self) -> list[TemplateInfo]:
        """Metadata of every stored template (decrypts each; the vector is dropped at once)."""
        out = []
        for rec in self.load_all():
            size = self._path(rec.template_id).stat().st_size
            out.append(TemplateInfo(rec.template_id, rec.model_version, rec.enrolled_at, size))
        return out

    def _sync_dir(self) -> None:
        # The rename/unlink is durable only once the directory entry itself is on disk.
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
