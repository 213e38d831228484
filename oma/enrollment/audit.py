"""The enrollment audit log (``vma_audit_log``): every step of every enrollment."""

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
    enrollment_id: str | None,
    *,
    client_ip: str | None,
    **details: Any,
) -> None:
    await db.execute(
        "INSERT INTO vma_audit_log (enrollment_id, event_type, actor, details, client_ip)"
        " VALUES ($1, $2, $3, $4::jsonb, $5)",
        enrollment_id,
        event,
        actor,
        json.dumps(details),
        client_ip,
    )


async def audit_page(db: Database, enrollment_id: str | None, page: Page) -> dict[str, Any]:
    """A page of the log, newest first, optionally of one enrollment."""
    rows = await db.fetch(
        "SELECT id, enrollment_id, event_type, actor, details, client_ip, created_at FROM vma_audit_log"
        " WHERE ($1::text IS NULL OR enrollment_id = $1) ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET "
        "$3",
        enrollment_id,
        page.limit,
        page.offset,
    )
    total = await db.fetchval(
        "SELECT count(*) FROM vma_audit_log WHERE ($1::text IS NULL OR enrollment_id = $1)",
        enrollment_id,
    )
    return page_body("events", [row_dict(r) for r in rows], total, page)
