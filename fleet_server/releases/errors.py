"""Why a release operation was refused; the app's one error handler makes HTTP answers of these."""

from __future__ import annotations


class ReleaseError(Exception):
    """Root of release errors: the request was wrong; fix it and send it again (HTTP 400)."""


class PublishRefused(ReleaseError):
    """Signed metadata or target files do not pass the server's checks (HTTP 422)."""


class SignatureRefused(PublishRefused):
    """Metadata not signed by enough of the keys root trusts for that role (HTTP 422)."""


class VersionConflict(ReleaseError):
    """Metadata version or release counter is not the next one: sign again against the current state (HTTP 409)."""


class MissingTargetFile(PublishRefused):
    """A signed target's file was never uploaded or does not match its signed hash (HTTP 422)."""


class UnknownRelease(ReleaseError):
    """No published release has this target path (HTTP 404)."""


class RepositoryNotReady(ReleaseError):
    """The TUF repository is not initialised, or already is (HTTP 409)."""


class OnlineKeyUnusable(ReleaseError):
    """The server's online key (FLEET_TUF_ONLINE_KEY) is missing or not the one root trusts (HTTP 503)."""
