"""Pairing codes (``vma_pairing_codes``): 12 characters from an alphabet without 0/O and 1/I,
shown once as ``XXXX-XXXX-XXXX``, stored as the sha256 digest of the normalised code."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

from oma.enrollment.audit import audit
from oma.store.rows import iso
from pyapp.db import Database

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
CODE_LENGTH = 12


def normalize_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def code_digest(code: str) -> bytes:
    return hashlib.sha256(normalize_code(code).encode("ascii", "replace")).digest()


def _format_code(raw: str) -> str:
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


async def create_pairing_code(
    db: Database, *, actor: str, ttl_seconds: int, client_ip: str | None
) -> dict[str, Any]:
    """A new single-use code valid ``ttl_seconds``; the answer is the only place it is shown."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_seconds)
    async with db.transaction() as conn:
        code_id = await conn.fetchval(
            "INSERT INTO vma_pairing_codes (code_hash, created_by, expires_at) VALUES ($1, $2, $3) "
            "RETURNING id",
            code_digest(raw),
            actor,
            expires_at,
        )
        await audit(
            conn,
            "pairing_code_created",
            actor,
            None,
            client_ip=client_ip,
            pairing_code_id=code_id,
            ttl_seconds=ttl_seconds,
        )
    return {"pairing_code": _format_code(raw), "expires_at": iso(expires_at), "valid_for": ttl_seconds}


async def prune_expired_codes(db: Database) -> None:
    """Forget pairing codes a day after they expired, unless an enrollment used one."""
    await db.execute(
        "DELETE FROM vma_pairing_codes p WHERE p.expires_at < now() - interval '1 day'"
        " AND NOT EXISTS (SELECT 1 FROM vma_enrollments e WHERE e.pairing_code_id = p.id)"
    )
