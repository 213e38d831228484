"""Authentication: ``POST /auth/login`` issues a bearer token (24 h by default); a user's own
session and password under ``/auth/...`` (additions to the seed).

Users log in with their user name and password; an enrolled VMA logs in with the appliance id
and secret issued when an administrator approved it. Wrong user, wrong password, a disabled user
and a VMA that is not (or no longer) approved all answer the same 401. Failed logins are
throttled per user name and per client address (:func:`oma.auth.count_attempt`): a locked one is
refused with 429 and ``Retry-After``. Successes, failures and refusals go to ``auth_audit_log``.

Any user (not a VMA) may read who they are, log out (revoke the token of the request), list and
revoke their own tokens, and change their own password (every other session of theirs ends).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma import users
from oma.api.requests import MAX_NAME, PageQuery, RequestModel, client_ip
from oma.auth import (
    Counted,
    Refusal,
    audit,
    clear_attempts,
    count_attempt,
    current_principal,
    issue_token,
    prune_attempts,
    public,
    requires,
)
from oma.crypto import verify_password
from oma.state import state
from oma.store.pages import page_body
from oma.store.rows import iso
from pyapp.api import ApiError, error_response

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)

TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"


class LoginRequest(RequestModel):
    username: str = Field(min_length=1, max_length=MAX_NAME)
    password: str = Field(min_length=1, max_length=1024)


class ChangePasswordRequest(RequestModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=users.MIN_PASSWORD, max_length=1024)


def _throttled(refusal: Refusal) -> Response:
    response = error_response(
        429,
        TOO_MANY_REQUESTS,
        f"too many failed logins for this {'user' if refusal.scope == 'user' else 'client address'};"
        f" retry after {refusal.retry_after} s",
    )
    response.headers["Retry-After"] = str(refusal.retry_after)
    return response


async def _check(username: str, password: str) -> tuple[str, str, int | None, str | None] | None:
    """``(role, subject, user_id, vma_id)`` when the credentials are right, else None (every
    wrong case costs one password verification)."""
    db = state().db
    if username.startswith(users.RESERVED_PREFIX):
        row = await db.fetchrow(
            "SELECT id, secret_hash FROM vma_enrollments WHERE appliance_id = $1 AND status = 'approved'",
            username,
        )
        if not await verify_password(row["secret_hash"] if row else None, password) or row is None:
            return None
        return "vma", username, None, row["id"]
    row = await db.fetchrow(
        "SELECT id, password_hash, role, disabled_at IS NULL AS enabled FROM users WHERE username = $1",
        username,
    )
    if not await verify_password(row["password_hash"] if row else None, password) or row is None:
        return None
    if not row["enabled"]:
        return None
    return row["role"], username, row["id"], None


@bp.post("/auth/login")
@public
@validate_request(LoginRequest)
async def login(data: LoginRequest) -> tuple[dict[str, Any], int] | Response:
    st = state()
    db = st.db
    ttl = st.config.token_ttl_seconds
    address = client_ip()
    attempt = await count_attempt(db, data.username, address)
    if isinstance(attempt, Refusal):
        log.warning(
            "login throttled",
            extra={"action": "auth_login", "subject": data.username, "scope": attempt.scope},
        )
        if attempt.first:  # once per lock: a flood of refused attempts does not flood the table
            await audit(
                db,
                "login_throttled",
                data.username,
                client_ip=address,
                scope=attempt.scope,
                retry_after=attempt.retry_after,
                failures=attempt.failures,
            )
        return _throttled(attempt)
    found = await _check(data.username, data.password)
    if found is None:
        await _failed(attempt, data.username, address)
        raise ApiError.unauthorized("invalid credentials")
    role, subject, user_id, vma_id = found
    await clear_attempts(db, attempt)
    token, expires_at = await issue_token(
        db, role=role, subject=subject, ttl_seconds=ttl, user_id=user_id, vma_id=vma_id
    )
    if user_id is not None:
        await db.execute("UPDATE users SET last_login_at = now() WHERE id = $1", user_id)
    await audit(db, "login_succeeded", subject, client_ip=address, role=role)
    log.info("token issued", extra={"action": "auth_login", "subject": subject, "role": role})
    return {
        "token": token,
        "token_type": "Bearer",
        "expires_at": iso(expires_at),
        "expires_in": ttl,
        "role": role,
    }, 200


async def _failed(attempt: Counted, username: str, address: str | None) -> None:
    db = state().db
    log.warning("login refused", extra={"action": "auth_login", "subject": username})
    details: dict[str, Any] = {"failures": attempt.failures}
    if attempt.locked_for:
        details["locked_for"] = attempt.locked_for
    await audit(db, "login_failed", username, client_ip=address, **details)
    await prune_attempts(db)


def _user_principal() -> tuple[int, str, str | None]:
    principal = current_principal()
    if principal.user_id is None:  # a VMA: the views below are for users (and refuse VMAs anyway)
        raise ApiError.forbidden("only users have an account")
    return principal.user_id, principal.subject, principal.token_id


@bp.get("/auth/me")
@requires("viewer")
async def me() -> dict[str, Any]:
    user_id, _, _ = _user_principal()
    return await users.get_user(state().db, user_id)


@bp.post("/auth/logout")
@requires("viewer")
async def logout() -> dict[str, Any]:
    user_id, subject, token_id = _user_principal()
    assert token_id is not None
    await users.revoke_own_token(
        state().db, user_id=user_id, token_id=token_id, actor=subject, client_ip=client_ip(), event="logout"
    )
    return {"message": "logged out: this token is revoked"}


@bp.post("/auth/password")
@requires("viewer")
@validate_request(ChangePasswordRequest)
async def change_password(data: ChangePasswordRequest) -> dict[str, Any]:
    user_id, subject, token_id = _user_principal()
    revoked = await users.change_own_password(
        state().db,
        user_id,
        data.current_password,
        data.new_password,
        actor=subject,
        token_id=token_id,
        client_ip=client_ip(),
    )
    return {"message": "password changed; your other sessions are ended", "tokens_revoked": revoked}


@bp.get("/auth/tokens")
@requires("viewer")
@validate_querystring(PageQuery)
async def list_tokens(query_args: PageQuery) -> dict[str, Any]:
    user_id, _, token_id = _user_principal()
    db = state().db
    live = "FROM auth_tokens WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()"
    rows = await db.fetch(
        f"SELECT id::text AS id, issued_at, expires_at, coalesce(id::text = $2, false) AS current {live}"
        " ORDER BY issued_at DESC, id LIMIT $3 OFFSET $4",
        user_id,
        token_id,
        query_args.limit,
        query_args.offset,
    )
    total = await db.fetchval(f"SELECT count(*) {live}", user_id)
    return page_body("tokens", [dict(r.items()) for r in rows], total, query_args)


@bp.delete("/auth/tokens/<token_id>")
@requires("viewer")
async def revoke_token(token_id: str) -> dict[str, Any]:
    user_id, subject, _ = _user_principal()
    await users.revoke_own_token(
        state().db, user_id=user_id, token_id=token_id, actor=subject, client_ip=client_ip()
    )
    return {"message": "token revoked", "id": token_id}
