"""Bearer tokens: random (256 bits), stored as sha256 digests with their expiry.

A lookup is one indexed query that also checks that a user's account is enabled (and takes the
user's *current* role, so a demotion applies to tokens already issued) and, for a VMA token, that
the VMA is still approved — so revoking a VMA or disabling a user cuts its tokens off at once, in
every OMA process sharing the database.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from oma.access.roles import Principal
from oma.crypto import new_token, token_digest
from oma.store.pages import Page, page_body
from pyapp.db import Connection, Database


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


async def live_tokens(db: Database, user_id: int, current_token_id: str | None, page: Page) -> dict[str, Any]:
    """A page of the user's live tokens, newest first; ``current`` marks ``current_token_id``."""
    live = "FROM auth_tokens WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()"
    rows = await db.fetch(
        f"SELECT id::text AS id, issued_at, expires_at, coalesce(id::text = $2, false) AS current {live}"
        " ORDER BY issued_at DESC, id LIMIT $3 OFFSET $4",
        user_id,
        current_token_id,
        page.limit,
        page.offset,
    )
    total = await db.fetchval(f"SELECT count(*) {live}", user_id)
    return page_body("tokens", [dict(r.items()) for r in rows], total, page)


async def prune_expired_tokens(db: Database) -> None:
    """Forget tokens a day after they expired (a day of grace so a refused token is still named in
    its audit rows while someone looks)."""
    await db.execute("DELETE FROM auth_tokens WHERE expires_at < now() - interval '1 day'")
