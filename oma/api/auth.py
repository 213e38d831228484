"""Authentication: ``POST /auth/login`` issues a bearer token (24 h by default); a user's own
session and password under ``/auth/...`` (additions to the seed).

Users log in with their user name and password; an enrolled VMA logs in with the appliance id
and secret issued when an administrator approved it (:mod:`oma.access.login`). Wrong
credentials answer 401; a user name or client address locked by the throttle
(:mod:`oma.access.throttle`) is refused with 429 and ``Retry-After``.

Any user (not a VMA) may read who they are, log out (revoke the token of the request), list and
revoke their own tokens, and change their own password (every other session of theirs ends).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.access import tokens, users
from oma.access.login import log_in
from oma.access.throttle import Refusal
from oma.api.access import current_principal, public, requires
from oma.api.requests import MAX_NAME, PageQuery, RequestModel, client_ip
from oma.state import state
from oma.store.rows import iso
from pyapp.api import ApiError, error_response

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


@bp.post("/auth/login")
@public
@validate_request(LoginRequest)
async def login(data: LoginRequest) -> tuple[dict[str, Any], int] | Response:
    st = state()
    ttl = st.config.token_ttl_seconds
    grant = await log_in(st.db, data.username, data.password, client_ip=client_ip(), ttl_seconds=ttl)
    if isinstance(grant, Refusal):
        return _throttled(grant)
    return {
        "token": grant.token,
        "token_type": "Bearer",
        "expires_at": iso(grant.expires_at),
        "expires_in": ttl,
        "role": grant.role,
    }, 200


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
    return await tokens.live_tokens(state().db, user_id, token_id, query_args)


@bp.delete("/auth/tokens/<token_id>")
@requires("viewer")
async def revoke_token(token_id: str) -> dict[str, Any]:
    user_id, subject, _ = _user_principal()
    await users.revoke_own_token(
        state().db, user_id=user_id, token_id=token_id, actor=subject, client_ip=client_ip()
    )
    return {"message": "token revoked", "id": token_id}
