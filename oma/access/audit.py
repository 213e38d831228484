"""The authentication audit log (``auth_audit_log``): logins, refusals, account and token changes."""

from __future__ import annotations

import json
from typing import Any

from oma.store.pages import Page, page_body
from oma.store.rows import row_dict
from pyapp.db import Connection, Database


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


async def audit_page(db: Database, event_type: str | None, actor: str | None, page: Page) -> dict[str, Any]:
    """A page of the log, newest first, optionally of one event type and/or one actor."""
    where = "WHERE ($1::text IS NULL OR event_type = $1) AND ($2::text IS NULL OR actor = $2)"
    rows = await db.fetch(
        "SELECT id, event_type, actor, subject, client_ip, details, created_at FROM auth_audit_log"
        f" {where} ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
        event_type,
        actor,
        page.limit,
        page.offset,
    )
    total = await db.fetchval(f"SELECT count(*) FROM auth_audit_log {where}", event_type, actor)
    return page_body("events", [row_dict(r) for r in rows], total, page)
