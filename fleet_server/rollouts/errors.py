"""Why a rollout request was refused; the app's one handler turns these into HTTP answers."""

from __future__ import annotations


class RolloutError(Exception):
    """Root of rollout errors (HTTP 400)."""


class UnknownRollout(RolloutError):
    """No rollout by that id (HTTP 404)."""


class BadPlan(RolloutError):
    """The plan cannot be carried out as written: what and where is in the message (HTTP 422)."""


class UnknownRelease(BadPlan):
    """The plan names a release that is not published (HTTP 422)."""


class RolloutConflict(RolloutError):
    """The rollout is not in a state that allows this (e.g. resuming a finished one) (HTTP 409)."""
