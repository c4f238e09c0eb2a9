"""Face errors, named for what the caller should do next."""

from __future__ import annotations


class FaceError(Exception):
    """Root of every face error."""


class FaceUnavailable(FaceError):
    """Face matching cannot run here (packages or models missing): offer another login."""


class ModelIntegrityError(FaceUnavailable):
    """A model file is missing or its SHA-256 differs from the pinned one: never run it."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class BadImage(FaceError):
    """The bytes given are not a usable image: the caller must send another one."""

    def __init__(self, reason: str, message: str, *, status: int = 400, where: str = "image") -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.where = where


class UnknownCitizen(FaceError):
    """No template is enrolled for this citizen: enrol first."""

    reason = "unknown_citizen"


class TemplateStoreError(FaceError):
    """The template store cannot be used (key file unsafe, storage broken): stop and report."""
