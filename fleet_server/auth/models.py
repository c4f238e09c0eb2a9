"""Who is calling: a user with one role and, for managers, the offices they may see."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"  # everything
    MANAGER = "manager"  # read health and usage of their assigned offices
    AUDITOR = "auditor"  # read the audit log


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    offices: frozenset[str] | None = None  # None: every office (admins, auditors)

    def sees_office(self, office_id: str) -> bool:
        """Tell whether this user may read data of `office_id`."""
        return self.offices is None or office_id in self.offices

    def office_filter(self, requested: list[str] | None = None) -> list[str] | None:
        """Offices a query may cover: the requested ones cut down to what the user may see.

        None means "no restriction" (an admin asking for everything).
        """
        if self.offices is None:
            return requested
        if requested is None:
            return sorted(self.offices)
        return [o for o in requested if o in self.offices]
