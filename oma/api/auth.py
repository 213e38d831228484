"""Authentication: ``POST /auth/login`` issues a bearer token (24 h by default).

Users log in with their user name and password; an enrolled VMA logs in with the appliance id
and secret issued when an administrator approved it. Wrong user, wrong password and a VMA that
is not (or no longer) approved all answer the same 401.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field
from quart import Blueprint
from quart_schema import validate_request

from oma.api.common import MAX_NAME, RequestModel, iso
from oma.auth import issue_token, public
from oma.crypto import verify_password
from oma.state import state
from pyapp.api import ApiError

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)


class LoginRequest(RequestModel):
    username: str = Field(min_length=1, max_length=MAX_NAME)
    password: str = Field(min_length=1, max_length=1024)


@bp.post("/auth/login")
@public
@validate_request(LoginRequest)
async def login(data: LoginRequest) -> tuple[dict[str, Any], int]:
    st = state()
    db = st.db
    ttl = st.config.token_ttl_seconds
    if data.username.startswith("vma-"):
        row = await db.fetchrow(
            "SELECT id, appliance_id, secret_hash FROM vma_enrollments"
            " WHERE appliance_id = $1 AND status = 'approved'",
            data.username,
        )
        if not await verify_password(row["secret_hash"] if row else None, data.password) or row is None:
            log.warning("VMA login refused", extra={"action": "auth_login", "subject": data.username})
            raise ApiError.unauthorized("invalid credentials")
        token, expires_at = await issue_token(
            db, role="vma", subject=data.username, ttl_seconds=ttl, vma_id=row["id"]
        )
        role = "vma"
    else:
        row = await db.fetchrow(
            "SELECT id, password_hash, role FROM users WHERE username = $1", data.username
        )
        if not await verify_password(row["password_hash"] if row else None, data.password) or row is None:
            log.warning("login refused", extra={"action": "auth_login", "subject": data.username})
            raise ApiError.unauthorized("invalid credentials")
        role = row["role"]
        token, expires_at = await issue_token(
            db, role=role, subject=data.username, ttl_seconds=ttl, user_id=row["id"]
        )
        await db.execute("UPDATE users SET last_login_at = now() WHERE id = $1", row["id"])
    log.info("token issued", extra={"action": "auth_login", "subject": data.username, "role": role})
    return {
        "token": token,
        "token_type": "Bearer",
        "expires_at": iso(expires_at),
        "expires_in": ttl,
        "role": role,
    }, 200
