"""FastAPI dependencies: who is calling (401 if nobody), and may they (403 if not)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request

from fleet_server.auth.errors import NotAllowed
from fleet_server.auth.models import Role, User

if TYPE_CHECKING:
    from fleet_server.app import FleetServer


def get_fleet(request: Request) -> "FleetServer":
    return request.app.state.fleet  # type: ignore[no-any-return]


FleetDep = Annotated["FleetServer", Depends(get_fleet)]


def client_address(request: Request) -> str:
    """The peer address of the request (behind a reverse proxy: the proxy's)."""
    return request.client.host if request.client else "unknown"


def current_user(request: Request, authorization: Annotated[str | None, Header()] = None) -> User:
    """The caller, from `Authorization: Bearer <token>`; 401 when missing or unknown, 429 when throttled."""
    return get_fleet(request).auth.login(authorization, client_address(request))


CurrentUser = Annotated[User, Depends(current_user)]


def require_role(*roles: Role) -> Callable[[User], User]:
    """A dependency that lets only `roles` through (403 for everyone else)."""
    allowed = frozenset(roles)

    def check(user: CurrentUser) -> User:
        if user.role not in allowed:
            raise NotAllowed(
                f"role {user.role.value!r} may not do this; needs {' or '.join(sorted(r.value for r in allowed))}"
            )
        return user

    return check


AdminUser = Annotated[User, Depends(require_role(Role.ADMIN))]
ReaderUser = Annotated[User, Depends(require_role(Role.ADMIN, Role.MANAGER))]
AuditorUser = Annotated[User, Depends(require_role(Role.ADMIN, Role.AUDITOR))]
