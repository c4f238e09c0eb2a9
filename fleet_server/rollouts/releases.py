"""What rollouts need from the release service: a published release by target path, and the
pre-signed rollback twin of one. Coded against this small protocol so either the TUF-backed
`ReleaseService` or `ReleaseCatalog` (below, a plain in-memory list for the benchmark and for a
server without a TUF repository) can stand behind it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class ReleaseLike(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def counter(self) -> int: ...
    @property
    def profiles(self) -> Sequence[str]: ...


class ReleaseSource(Protocol):
    def get(self, path: str) -> ReleaseLike | None: ...
    def rollback_twin(self, path: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Release:
    path: str
    kind: str
    version: str
    counter: int
    profiles: tuple[str, ...] = ("*",)


@dataclass
class ReleaseCatalog:
    """Releases known by listing them (no signing): each with an optional rollback twin."""

    releases: dict[str, Release] = field(default_factory=dict)
    twins: dict[str, str] = field(default_factory=dict)

    def add(self, release: Release, rollback_twin: str | None = None) -> Release:
        self.releases[release.path] = release
        if rollback_twin is not None:
            self.twins[release.path] = rollback_twin
        return release

    def get(self, path: str) -> Release | None:
        return self.releases.get(path)

    def rollback_twin(self, path: str) -> str | None:
        return self.twins.get(path)


def fits(profiles: Sequence[str], profile: str) -> bool:
    return "*" in profiles or profile in profiles
