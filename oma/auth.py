"""Who is calling: bearer tokens, principals and the per-view access rules.

Every request except those of views marked :func:`public` needs ``Authorization: Bearer <token>``.
Tokens are random (256 bits), stored as sha256 digests with their expiry; a lookup is one indexed
query that also checks, for a VMA token, that the VMA is still approved — so revoking a VMA cuts
its token off at once, in every OMA process sharing the database.

Roles: ``admin`` (everything), ``operator`` (everything but credentials, enrollment administration
and debug), ``vma`` (only the views marked :func:`allow_vma`: inventory push, replications,
change IDs, progress).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from quart import g, request

from oma.crypto import new_token, token_digest
from pyapp.api import ApiError
from pyapp.db import Connection, Database

F = TypeVar("F", bound=Callable[..., Any])

_PUBLIC = "_oma_public"
_ALLOW_VMA = "_oma_allow_vma"
_ADMIN_ONLY = "_oma_admin_only"


@dataclass(frozen=True)
class Principal:
    role: str  # admin | operator | vma
    subject: str  # user name or VMA appliance id
    user_id: int | None = None
    vma_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def public(func: F) -> F:
    setattr(func, _PUBLIC, True)
    return func


def allow_vma(func: F) -> F:
    setattr(func, _ALLOW_VMA, True)
    return func


def admin_only(func: F) -> F:
    setattr(func, _ADMIN_ONLY, True)
    return func


def current_principal() -> Principal:
    principal: Principal | None = g.get("principal")
    if principal is None:
        raise ApiError.unauthorized()
    return principal


async def issue_token(
    db: Database | Connection,
    *,
    role: str,
    subject: str,
    ttl_seconds: int,
    user_id: int | None = None,
    vma_id: str | None = None,
) -> tuple[str, dt.datetime]:
    token = new_token()
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_seconds)
    await db.execute(
        "INSERT INTO auth_tokens (token_hash, role, user_id, vma_id, subject, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        token_digest(token),
        role,
        user_id,
        vma_id,
        subject,
        expires_at,
    )
    return token, expires_at


async def lookup_token(db: Database, token: str) -> Principal | None:
    row = await db.fetchrow(
        "SELECT t.role, t.subject, t.user_id, t.vma_id FROM auth_tokens t"
        " LEFT JOIN vma_enrollments v ON v.id = t.vma_id"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()"
        " AND (t.vma_id IS NULL OR v.status = 'approved')",
        token_digest(token),
    )
    if row is None:
        return None
    return Principal(role=row["role"], subject=row["subject"], user_id=row["user_id"], vma_id=row["vma_id"])


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
    if view is None or getattr(view, _PUBLIC, False):
        return
    token = bearer_token()
    if token is None:
        raise ApiError.unauthorized("missing bearer token (Authorization: Bearer <token>)")
    principal = await lookup_token(db, token)
    if principal is None:
        raise ApiError.unauthorized("invalid, expired or revoked token")
    g.principal = principal
    if principal.role == "vma" and not getattr(view, _ALLOW_VMA, False):
        raise ApiError.forbidden("VMA appliances may not call this endpoint")
    if (admin_area or getattr(view, _ADMIN_ONLY, False)) and not principal.is_admin:
        raise ApiError.forbidden("administrator role required")
