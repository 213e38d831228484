"""User accounts: creation, role and enabled changes, deletion, passwords, the user's own tokens.

Every change that removes someone's access — disabling, deleting, resetting or changing a password
— revokes the tokens it must in the same transaction, so a token never outlives the access it
stood for. Passwords are argon2id hashes (:mod:`oma.crypto`); no function here returns one.

**The last enabled administrator.** Disabling, deleting or demoting a user first locks every
enabled administrator's row (``FOR UPDATE``, in id order), then checks that another one stays:
two administrators demoting each other at once, even in two OMA processes, leave one of them.
"""

from __future__ import annotations

import uuid
from typing import Any

from oma.access.audit import audit
from oma.access.roles import Role
from oma.crypto import hash_password, verify_password
from oma.store.pages import Page, page_body
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record

MIN_PASSWORD = 8
RESERVED_PREFIX = "vma-"  # user names of enrolled VMAs (their appliance ids)
MAX_USER_ID = 2**31 - 1  # users.id is a PostgreSQL integer

USER_COLUMNS = (
    "id, username, role, disabled_at IS NULL AS enabled, created_at, created_by, last_login_at,"
    " password_changed_at, disabled_at, disabled_by"
)


def user_body(row: Record) -> dict[str, Any]:
    return dict(row.items())


async def _user(conn: Connection | Database, user_id: int, *, lock: bool = False) -> Record:
    if not 0 < user_id <= MAX_USER_ID:
        raise ApiError.not_found(f"user {user_id} not found")
    row = await conn.fetchrow(
        f"SELECT {USER_COLUMNS} FROM users WHERE id = $1{' FOR UPDATE' if lock else ''}", user_id
    )
    if row is None:
        raise ApiError.not_found(f"user {user_id} not found")
    return row


async def get_user(db: Database, user_id: int) -> dict[str, Any]:
    return user_body(await _user(db, user_id))


async def user_page(db: Database, page: Page) -> dict[str, Any]:
    rows = await db.fetch(
        f"SELECT {USER_COLUMNS} FROM users ORDER BY id LIMIT $1 OFFSET $2", page.limit, page.offset
    )
    total = await db.fetchval("SELECT count(*) FROM users")
    return page_body("users", [user_body(r) for r in rows], total, page)


async def create_user(
    db: Database, *, username: str, password: str, role: Role, actor: str, client_ip: str | None
) -> dict[str, Any]:
    password_hash = await hash_password(password)
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            "INSERT INTO users (username, password_hash, role, created_by, password_changed_at)"
            f" VALUES ($1, $2, $3, $4, now()) ON CONFLICT (username) DO NOTHING RETURNING {USER_COLUMNS}",
            username,
            password_hash,
            role,
            actor,
        )
        if row is None:
            raise ApiError.conflict(f"user {username!r} already exists")
        await audit(conn, "user_created", actor, subject=username, client_ip=client_ip, role=role)
    return user_body(row)


async def _keep_an_admin(conn: Connection, target: Record) -> None:
    """Refuse (409) when ``target`` is the last enabled administrator; call before it loses that."""
    admins = await conn.fetch(
        "SELECT id FROM users WHERE role = 'admin' AND disabled_at IS NULL ORDER BY id FOR UPDATE"
    )
    ids = {r["id"] for r in admins}
    if target["id"] in ids and len(ids) == 1:
        raise ApiError.conflict(
            f"{target['username']!r} is the last enabled administrator: make another user an"
            " enabled administrator first"
        )


async def _revoke_user_tokens(conn: Connection, user_id: int, *, keep: str | None = None) -> int:
    status = await conn.execute(
        "UPDATE auth_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL"
        " AND expires_at > now() AND ($2::uuid IS NULL OR id <> $2::uuid)",
        user_id,
        keep,
    )
    return int(status.split()[-1])


async def update_user(
    db: Database,
    user_id: int,
    *,
    role: Role | None,
    enabled: bool | None,
    actor: str,
    client_ip: str | None,
) -> dict[str, Any]:
    async with db.transaction() as conn:
        await conn.execute(
            "SELECT 1 FROM users WHERE role = 'admin' AND disabled_at IS NULL ORDER BY id FOR UPDATE"
        )
        current = await _user(conn, user_id, lock=True)
        name = current["username"]
        loses_admin = (
            current["role"] == "admin"
            and current["enabled"]
            and ((role is not None and role != "admin") or enabled is False)
        )
        if loses_admin:
            await _keep_an_admin(conn, current)
        if role is not None and role != current["role"]:
            await conn.execute("UPDATE users SET role = $2 WHERE id = $1", user_id, role)
            await audit(
                conn, "role_changed", actor, subject=name, client_ip=client_ip, old=current["role"], new=role
            )
        if enabled is False and current["enabled"]:
            await conn.execute(
                "UPDATE users SET disabled_at = now(), disabled_by = $2 WHERE id = $1", user_id, actor
            )
            revoked = await _revoke_user_tokens(conn, user_id)
            await audit(
                conn, "user_disabled", actor, subject=name, client_ip=client_ip, tokens_revoked=revoked
            )
        if enabled is True and not current["enabled"]:
            await conn.execute(
                "UPDATE users SET disabled_at = NULL, disabled_by = NULL WHERE id = $1", user_id
            )
            await audit(conn, "user_enabled", actor, subject=name, client_ip=client_ip)
        return user_body(await _user(conn, user_id))


async def delete_user(db: Database, user_id: int, *, actor: str, client_ip: str | None) -> int:
    """Delete the user; its tokens go with it (``ON DELETE CASCADE``). Returns how many were live."""
    async with db.transaction() as conn:
        await conn.execute(
            "SELECT 1 FROM users WHERE role = 'admin' AND disabled_at IS NULL ORDER BY id FOR UPDATE"
        )
        current = await _user(conn, user_id, lock=True)
        if current["role"] == "admin" and current["enabled"]:
            await _keep_an_admin(conn, current)
        revoked = await _revoke_user_tokens(conn, user_id)
        await conn.execute("DELETE FROM users WHERE id = $1", user_id)
        await audit(
            conn,
            "user_deleted",
            actor,
            subject=current["username"],
            client_ip=client_ip,
            tokens_revoked=revoked,
        )
    return revoked


async def set_password(
    db: Database,
    user_id: int,
    password: str,
    *,
    actor: str,
    client_ip: str | None,
    keep_token: str | None = None,
    event: str = "password_reset",
) -> int:
    """Store a new password and revoke the user's tokens (all but ``keep_token``). Returns how
    many were revoked."""
    password_hash = await hash_password(password)
    async with db.transaction() as conn:
        current = await _user(conn, user_id, lock=True)
        await conn.execute(
            "UPDATE users SET password_hash = $2, password_changed_at = now() WHERE id = $1",
            user_id,
            password_hash,
        )
        revoked = await _revoke_user_tokens(conn, user_id, keep=keep_token)
        subject = None if current["username"] == actor else current["username"]
        await audit(conn, event, actor, subject=subject, client_ip=client_ip, tokens_revoked=revoked)
    return revoked


async def change_own_password(
    db: Database,
    user_id: int,
    current_password: str,
    new_password: str,
    *,
    actor: str,
    token_id: str | None,
    client_ip: str | None,
) -> int:
    """The user's own change: the current password first (403 when wrong); every other session
    of the user ends, the one that made the change stays."""
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
    if not await verify_password(stored, current_password) or stored is None:
        await audit(db, "password_change_refused", actor, client_ip=client_ip)
        raise ApiError.forbidden("the current password is wrong")
    return await set_password(
        db,
        user_id,
        new_password,
        actor=actor,
        client_ip=client_ip,
        keep_token=token_id,
        event="password_changed",
    )


async def revoke_own_token(
    db: Database,
    *,
    user_id: int,
    token_id: str,
    actor: str,
    client_ip: str | None,
    event: str = "token_revoked",
) -> None:
    """Revoke one of the user's live tokens; another user's token, or none, is a 404."""
    try:
        token_id = str(uuid.UUID(token_id))
    except ValueError:
        raise ApiError.not_found(f"token {token_id!r} not found") from None
    async with db.transaction() as conn:
        revoked = await conn.fetchval(
            "UPDATE auth_tokens SET revoked_at = now() WHERE id = $1::uuid AND user_id = $2"
            " AND revoked_at IS NULL AND expires_at > now() RETURNING id::text",
            token_id,
            user_id,
        )
        if revoked is None:
            raise ApiError.not_found(f"token {token_id} not found")
        await audit(conn, event, actor, client_ip=client_ip, token_id=token_id)


async def ensure_first_admin(db: Database, username: str, password: str) -> bool:
    """Create ``username`` as administrator when the users table is empty. True if created."""
    if await db.fetchval("SELECT EXISTS (SELECT 1 FROM users)"):
        return False
    password_hash = await hash_password(password)
    created = await db.fetchval(
        "INSERT INTO users (username, password_hash, role)"
        " SELECT $1, $2, 'admin' WHERE NOT EXISTS (SELECT 1 FROM users)"
        " ON CONFLICT (username) DO NOTHING RETURNING id",  # several workers may start at once
        username,
        password_hash,
    )
    return created is not None
