"""User administration (administrators), under ``/api/v1/users`` — an addition to the seed.

Create, list, read, change role or enabled state, delete, reset a password, and read the
authentication audit log. The rules (tokens revoked with the access they stood for, the last
enabled administrator kept) are :mod:`oma.access.users`; docs/oma.md "Users and roles" is the contract.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.access import users
from oma.access.audit import audit_page
from oma.access.roles import Role
from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, PageQuery, RequestModel, client_ip
from oma.state import state

bp = Blueprint("users", __name__)

Password = Field(min_length=users.MIN_PASSWORD, max_length=1024)


class CreateUserRequest(RequestModel):
    username: str = Field(min_length=1, max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f]+$")
    password: str = Password
    role: Role = "viewer"

    @field_validator("username")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith(users.RESERVED_PREFIX):
            raise ValueError(
                f"user names starting with {users.RESERVED_PREFIX!r} are reserved for enrolled VMAs"
            )
        return value


class UpdateUserRequest(RequestModel):
    role: Role | None = None
    enabled: bool | None = None


class ResetPasswordRequest(RequestModel):
    password: str = Password


class AuditQuery(PageQuery):
    model_config = ConfigDict(extra="forbid")

    event_type: str | None = Field(None, max_length=MAX_NAME)
    actor: str | None = Field(None, max_length=MAX_NAME)


@bp.get("/users")
@requires("admin")
@validate_querystring(PageQuery)
async def list_users(query_args: PageQuery) -> dict[str, Any]:
    return await users.user_page(state().db, query_args)


@bp.post("/users")
@requires("admin")
@validate_request(CreateUserRequest)
async def create_user(data: CreateUserRequest) -> tuple[dict[str, Any], int]:
    body = await users.create_user(
        state().db,
        username=data.username,
        password=data.password,
        role=data.role,
        actor=current_principal().subject,
        client_ip=client_ip(),
    )
    return body, 201


@bp.get("/users/audit")
@requires("admin")
@validate_querystring(AuditQuery)
async def audit_log(query_args: AuditQuery) -> dict[str, Any]:
    return await audit_page(state().db, query_args.event_type, query_args.actor, query_args)


@bp.get("/users/<int:user_id>")
@requires("admin")
async def get_user(user_id: int) -> dict[str, Any]:
    return await users.get_user(state().db, user_id)


@bp.put("/users/<int:user_id>")
@requires("admin")
@validate_request(UpdateUserRequest)
async def update_user(user_id: int, data: UpdateUserRequest) -> dict[str, Any]:
    return await users.update_user(
        state().db,
        user_id,
        role=data.role,
        enabled=data.enabled,
        actor=current_principal().subject,
        client_ip=client_ip(),
    )


@bp.delete("/users/<int:user_id>")
@requires("admin")
async def delete_user(user_id: int) -> dict[str, Any]:
    revoked = await users.delete_user(
        state().db, user_id, actor=current_principal().subject, client_ip=client_ip()
    )
    return {"message": "user deleted", "id": user_id, "tokens_revoked": revoked}


@bp.post("/users/<int:user_id>/password")
@requires("admin")
@validate_request(ResetPasswordRequest)
async def reset_password(user_id: int, data: ResetPasswordRequest) -> dict[str, Any]:
    revoked = await users.set_password(
        state().db, user_id, data.password, actor=current_principal().subject, client_ip=client_ip()
    )
    return {
        "message": "password reset; the user's tokens are revoked",
        "id": user_id,
        "tokens_revoked": revoked,
    }
