"""Who is calling: bearer tokens, principals, roles, login throttling and the auth audit log.

Every request except those of views marked :func:`public` needs ``Authorization: Bearer <token>``.
Tokens are random (256 bits), stored as sha256 digests with their expiry; a lookup is one indexed
query that also checks that a user's account is enabled (and takes the user's *current* role, so
a demotion applies to tokens already issued) and, for a VMA token, that the VMA is still approved
— so revoking a VMA or disabling a user cuts its tokens off at once, in every OMA process sharing
the database.

Roles, each including the one before: ``viewer`` (read-only), ``operator`` (runs replications,
backups and restores), ``admin`` (users, credentials, enrollment administration, debug); and
``vma``, which reaches only the views marked :func:`allow_vma`. Every view that is not public
declares the least role it needs with :func:`requires`; a view that declares none is for
administrators only (fail closed). The endpoint → role table is docs/oma.md ("Users and roles"),
which tests/oma/test_oma_roles.py walks against every route of the app.

Login throttling lives in PostgreSQL (``login_throttle``), so every OMA process on the database
counts the same failures: each attempt is counted, per user name and per client address, before
its password is checked; from the ``*_FREE_FAILURES``-th failure on, the key is locked for
1 s, 2 s, 4 s, ... (at most 15 min), and attempts while it is locked are refused (429,
``Retry-After``) without checking the password. A success clears both keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args

from quart import g, request

from oma.crypto import new_token, token_digest
from pyapp.api import ApiError
from pyapp.db import Connection, Database

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)  # least to most privileged
PUBLIC: Final = "public"

_PUBLIC = "_oma_public"
_ALLOW_VMA = "_oma_allow_vma"
_ROLE = "_oma_role"


@dataclass(frozen=True)
class Principal:
    role: str  # viewer | operator | admin | vma
    subject: str  # user name or VMA appliance id
    user_id: int | None = None
    vma_id: str | None = None
    token_id: str | None = None  # the handle of the token this request came with

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def has(self, role: Role) -> bool:
        """The principal's role includes ``role`` (a VMA has none of the users' roles)."""
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


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
        "SELECT coalesce(u.role, t.role) AS role, t.subject, t.user_id, t.vma_id, t.id::text AS id"
        " FROM auth_tokens t"
        " LEFT JOIN vma_enrollments v ON v.id = t.vma_id"
        " LEFT JOIN users u ON u.id = t.user_id"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()"
        " AND (t.vma_id IS NULL OR v.status = 'approved')"
        " AND (t.user_id IS NULL OR u.disabled_at IS NULL)",
        token_digest(token),
    )
    if row is None:
        return None
    return Principal(
        role=row["role"],
        subject=row["subject"],
        user_id=row["user_id"],
        vma_id=row["vma_id"],
        token_id=row["id"],
    )


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


# --- audit log ---------------------------------------------------------------------------------


async def audit(
    db: Database | Connection,
    event: str,
    actor: str,
    *,
    subject: str | None = None,
    client_ip: str | None = None,
    **details: Any,
) -> None:
    """One row of ``auth_audit_log`` (never a password or a token: callers pass neither)."""
    await db.execute(
        "INSERT INTO auth_audit_log (event_type, actor, subject, client_ip, details)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        event,
        actor,
        subject,
        client_ip,
        json.dumps(details),
    )


# --- login throttling --------------------------------------------------------------------------

USER_FREE_FAILURES: Final = 5  # failed logins of one user name before its first lock
ADDRESS_FREE_FAILURES: Final = 20  # from one client address (several users behind one NAT)
FIRST_LOCK_S: Final = 1.0  # the first lock; each further failure doubles it ...
MAX_LOCK_S: Final = 900.0  # ... up to this
FAILURE_WINDOW_S: Final = 3600.0  # a key without a failure (or a lock) for this long starts over


# Count one attempt for a key unless it is locked, and lock it from the free_failures-th on
# ($1 key, $2 free failures, $3 first lock, $4 longest lock, $5 window; seconds). One statement:
# concurrent attempts, in any OMA process, serialise on the row, so a burst of guesses cannot all
# pass the check before any of them is counted. A locked key answers no row.
def _lock(n: str) -> str:
    return (
        f"CASE WHEN {n} >= $2::int THEN now() + make_interval(secs =>"
        f" least($3::float8 * 2 ^ least({n} - $2::int, 20), $4::float8)) END"
    )


_FAILURES = "CASE WHEN t.expires_at <= now() THEN 1 ELSE t.failures + 1 END"
_COUNT_SQL = (
    "INSERT INTO login_throttle AS t (key, failures, last_failure_at, locked_until, expires_at)"
    f" VALUES ($1, 1, now(), {_lock('1')}, greatest(now() + make_interval(secs => $5::float8), {_lock('1')}))"
    " ON CONFLICT (key) DO UPDATE SET"
    f" failures = {_FAILURES}, last_failure_at = now(), refused = 0, locked_until = {_lock(_FAILURES)},"
    f" expires_at = greatest(now() + make_interval(secs => $5::float8), {_lock(_FAILURES)})"
    " WHERE t.locked_until IS NULL OR t.locked_until <= now()"
    " RETURNING t.failures, extract(epoch FROM t.locked_until - now())::float8 AS locked_for"
)
_REFUSE_SQL = (
    "UPDATE login_throttle SET refused = refused + 1 WHERE key = $1 AND locked_until > now()"
    " RETURNING extract(epoch FROM locked_until - now())::float8 AS remaining, refused, failures"
)


@dataclass(frozen=True)
class Refusal:
    """A login refused because a key is locked."""

    scope: Literal["user", "address"]
    retry_after: int  # whole seconds, at least 1
    first: bool  # the first refusal of this lock (the one the audit log records)
    failures: int


def address_key(address: str) -> str:
    """What one client address is counted as: an IPv4 address (also when IPv4-mapped), or the
    /64 network of an IPv6 address — one host easily holds a whole /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def throttle_keys(username: str, address: str | None) -> list[tuple[Literal["user", "address"], str, int]]:
    """The keys an attempt counts against, address first: an attempt from a locked address does
    not count against the user it names."""
    keys: list[tuple[Literal["user", "address"], str, int]] = []
    if address:
        keys.append(("address", f"addr:{address_key(address)}", ADDRESS_FREE_FAILURES))
    keys.append(("user", f"user:{username}", USER_FREE_FAILURES))
    return keys


@dataclass(frozen=True)
class Counted:
    """An attempt counted against its keys: what to clear on success, what to audit on failure."""

    keys: list[str]
    failures: dict[str, int]  # scope -> failures counted so far, this one included
    locked_for: dict[str, float]  # scope -> seconds the key is now locked for, when it is


async def count_attempt(db: Database, username: str, address: str | None) -> Counted | Refusal:
    """Count a login attempt before its password is checked, or refuse it (a locked key)."""
    counted = Counted(keys=[], failures={}, locked_for={})
    for scope, key, free in throttle_keys(username, address):
        for _ in range(3):  # a lock that ends between the two statements: count again
            row = await db.fetchrow(_COUNT_SQL, key, free, FIRST_LOCK_S, MAX_LOCK_S, FAILURE_WINDOW_S)
            if row is not None:
                counted.keys.append(key)
                counted.failures[scope] = row["failures"]
                if row["locked_for"] is not None:
                    counted.locked_for[scope] = round(max(row["locked_for"], 0.0), 3)
                break
            refused = await db.fetchrow(_REFUSE_SQL, key)
            if refused is not None:
                return Refusal(
                    scope=scope,
                    retry_after=max(1, math.ceil(refused["remaining"])),
                    first=refused["refused"] == 1,
                    failures=refused["failures"],
                )
    return counted


async def clear_attempts(db: Database, counted: Counted) -> None:
    """A successful login: its user name and address start over."""
    await db.execute("DELETE FROM login_throttle WHERE key = ANY($1::text[])", counted.keys)


async def prune_attempts(db: Database) -> None:
    await db.execute("DELETE FROM login_throttle WHERE expires_at < now()")
