"""The access rule of every view: bearer tokens checked, roles enforced.

Every request except those of views marked :func:`public` needs ``Authorization: Bearer <token>``
(:mod:`oma.access.tokens` looks it up). Roles, each including the one before: ``viewer``,
``operator``, ``admin`` (:mod:`oma.access.roles`); and ``vma``, which reaches only the views
marked :func:`allow_vma`. Every view that is not public declares the least role it needs with
:func:`requires`; a view that declares none is for administrators only (fail closed). The
endpoint → role table is docs/oma.md ("Users and roles"), which tests/oma/test_oma_roles.py walks
against every route of the app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from quart import g, request

from oma.access.roles import ROLES, Principal, Role
from oma.access.tokens import lookup_token
from pyapp.api import ApiError
from pyapp.db import Database

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC: Final = "public"

_PUBLIC = "_oma_public"
_ALLOW_VMA = "_oma_allow_vma"
_ROLE = "_oma_role"


def public(func: F) -> F:
    setattr(func, _PUBLIC, True)
    return func


def allow_vma(func: F) -> F:
    setattr(func, _ALLOW_VMA, True)
    return func


def requires(role: Role) -> Callable[[F], F]:
    """Declare the least user role a view needs (put it right under the route decorator)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def mark(func: F) -> F:
        setattr(func, _ROLE, role)
        return func

    return mark


def admin_only(func: F) -> F:
    return requires("admin")(func)


def view_role(view: Callable[..., Any], *, admin_area: bool = False) -> str:
    """The least role ``view`` needs: ``"public"``, or one of :data:`ROLES` — ``admin`` when the
    view declares none or belongs to an administrators' blueprint."""
    if getattr(view, _PUBLIC, False):
        return PUBLIC
    declared: str = getattr(view, _ROLE, "admin")
    return "admin" if admin_area else declared


def view_allows_vma(view: Callable[..., Any]) -> bool:
    return bool(getattr(view, _ALLOW_VMA, False))


def current_principal() -> Principal:
    principal: Principal | None = g.get("principal")
    if principal is None:
        raise ApiError.unauthorized()
    return principal


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authorize_request(db: Database, view: Callable[..., Any] | None, *, admin_area: bool) -> None:
    """The app's ``before_request``: authenticate, then apply the view's access rule.

    ``admin_area``: the view belongs to an administrators' blueprint (credentials, enrollment
    administration, debug)."""
    if view is None:
        return
    needed = view_role(view, admin_area=admin_area)
    if needed == PUBLIC:
        return
    token = bearer_token()
    if token is None:
        raise ApiError.unauthorized("missing bearer token (Authorization: Bearer <token>)")
    principal = await lookup_token(db, token)
    if principal is None:
        raise ApiError.unauthorized("invalid, expired or revoked token")
    g.principal = principal
    if principal.role == "vma":
        if not view_allows_vma(view):
            raise ApiError.forbidden("VMA appliances may not call this endpoint")
        return
    if not principal.has(needed):  # type: ignore[arg-type]
        raise ApiError.forbidden(f"{needed} role required (you are {principal.role})")
