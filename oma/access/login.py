"""Logging in: a user's credentials (user name, password) or an enrolled VMA's (appliance id,
secret) checked, and a bearer token issued.

Wrong user, wrong password, a disabled user and a VMA that is not (or no longer) approved are all
refused alike, each at the cost of one password verification. Every attempt is counted before
its password is checked (:mod:`oma.access.throttle`): one against a locked key is refused without
a check. Successes, failures and refusals go to ``auth_audit_log`` (a refusal once per lock, so a
flood of refused attempts does not flood the table).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from oma.access.audit import audit
from oma.access.throttle import Counted, Refusal, clear_attempts, count_attempt, prune_attempts
from oma.access.tokens import issue_token
from oma.access.users import RESERVED_PREFIX
from oma.crypto import verify_password
from pyapp.api import ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """A successful login: the new bearer token and what it stands for."""

    token: str = field(repr=False)
    expires_at: dt.datetime
    role: str


async def log_in(
    db: Database, username: str, password: str, *, client_ip: str | None, ttl_seconds: int
) -> Grant | Refusal:
    """A token for ``username`` (valid ``ttl_seconds``), or the :class:`Refusal` of a locked key.
    401 when the credentials are wrong."""
    attempt = await count_attempt(db, username, client_ip)
    if isinstance(attempt, Refusal):
        log.warning(
            "login throttled", extra={"action": "auth_login", "subject": username, "scope": attempt.scope}
        )
        if attempt.first:
            await audit(
                db,
                "login_throttled",
                username,
                client_ip=client_ip,
                scope=attempt.scope,
                retry_after=attempt.retry_after,
                failures=attempt.failures,
            )
        return attempt
    found = await _check(db, username, password)
    if found is None:
        await _failed(db, attempt, username, client_ip)
        raise ApiError.unauthorized("invalid credentials")
    role, subject, user_id, vma_id = found
    await clear_attempts(db, attempt)
    token, expires_at = await issue_token(
        db, role=role, subject=subject, ttl_seconds=ttl_seconds, user_id=user_id, vma_id=vma_id
    )
    if user_id is not None:
        await db.execute("UPDATE users SET last_login_at = now() WHERE id = $1", user_id)
    await audit(db, "login_succeeded", subject, client_ip=client_ip, role=role)
    log.info("token issued", extra={"action": "auth_login", "subject": subject, "role": role})
    return Grant(token, expires_at, role)


async def _check(
    db: Database, username: str, password: str
) -> tuple[str, str, int | None, str | None] | None:
    """``(role, subject, user_id, vma_id)`` when the credentials are right, else None (every
    wrong case costs one password verification)."""
    if username.startswith(RESERVED_PREFIX):
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


async def _failed(db: Database, attempt: Counted, username: str, client_ip: str | None) -> None:
    log.warning("login refused", extra={"action": "auth_login", "subject": username})
    details: dict[str, Any] = {"failures": attempt.failures}
    if attempt.locked_for:
        details["locked_for"] = attempt.locked_for
    await audit(db, "login_failed", username, client_ip=client_ip, **details)
    await prune_attempts(db)
