"""Backup policies (``backup_policies``) and their copy rules (``backup_copy_rules``).

A policy names the repository its backups go to (``primary_repository_id``), how long points
are kept (``retention_days``, applied by :mod:`oma.backups.retention`) and copy rules: each sends
every completed backup of the policy to another repository (:mod:`oma.backups.copies`). A policy
and its rules are written in one transaction; deleting a policy deletes its rules (cascade) and
leaves its backups in place, with ``policy_id`` set to null.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from oma.store.rows import new_id
from pyapp.api import ApiError
from pyapp.db import Connection, Database, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)

MAX_COPY_RULES = 16
POLICY_COLUMNS = "id, name, enabled, primary_repository_id, retention_days, created_at, updated_at"
RULE_COLUMNS = "id, destination_repository_id, copy_mode, verify_after_copy, enabled, created_at"


@dataclass(frozen=True)
class CopyRule:
    destination_repository_id: str
    copy_mode: Literal["immediate", "scheduled"]
    verify_after_copy: bool
    enabled: bool


@dataclass(frozen=True)
class NewPolicy:
    name: str
    enabled: bool
    primary_repository_id: str
    retention_days: int
    copy_rules: Sequence[CopyRule]


async def _policy(conn: Database | Connection, policy_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {POLICY_COLUMNS} FROM backup_policies WHERE id = $1", policy_id)
    if row is None:
        raise ApiError.not_found(f"policy {policy_id} not found")
    rules = await conn.fetch(
        f"SELECT {RULE_COLUMNS} FROM backup_copy_rules WHERE policy_id = $1 ORDER BY created_at, id",
        policy_id,
    )
    return {**dict(row.items()), "copy_rules": [dict(r.items()) for r in rules]}


def _check_rules(policy: NewPolicy) -> None:
    errors = []
    seen: set[str] = set()
    for i, rule in enumerate(policy.copy_rules):
        dest = rule.destination_repository_id
        if dest == policy.primary_repository_id:
            errors.append(f"copy_rules[{i}]: the destination is the primary repository")
        if dest in seen:
            errors.append(f"copy_rules[{i}]: repository {dest} is named by another rule")
        seen.add(dest)
    if errors:
        raise ApiError.unprocessable("invalid copy rules", details=errors)


async def create_policy(db: Database, policy: NewPolicy) -> dict[str, Any]:
    """Write the policy and its rules (in the given order); every repository they name must exist."""
    _check_rules(policy)
    policy_id = new_id("pol")
    wanted = {policy.primary_repository_id, *(r.destination_repository_id for r in policy.copy_rules)}
    try:
        async with db.transaction() as conn:
            # FOR KEY SHARE: a repository cannot be deleted while the policy naming it is written.
            found = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM backup_repositories WHERE id = ANY($1::text[]) FOR KEY SHARE",
                    sorted(wanted),
                )
            }
            if wanted - found:
                raise ApiError.unprocessable(f"unknown repositories: {', '.join(sorted(wanted - found))}")
            await conn.execute(
                "INSERT INTO backup_policies (id, name, enabled, primary_repository_id, retention_days)"
                " VALUES ($1, $2, $3, $4, $5)",
                policy_id,
                policy.name,
                policy.enabled,
                policy.primary_repository_id,
                policy.retention_days,
            )
            await conn.executemany(
                # clock_timestamp(): the rules keep the request's order (now() is one instant).
                "INSERT INTO backup_copy_rules (id, policy_id, destination_repository_id, copy_mode,"
                " verify_after_copy, enabled, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())",
                [
                    (
                        new_id("rule"),
                        policy_id,
                        r.destination_repository_id,
                        r.copy_mode,
                        r.verify_after_copy,
                        r.enabled,
                    )
                    for r in policy.copy_rules
                ],
            )
            created = await _policy(conn, policy_id)
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a policy named {policy.name!r} already exists") from exc
    with log_context(action="policy_create"):
        log.info(
            "backup policy created", extra={"policy_id": policy_id, "copy_rules": len(policy.copy_rules)}
        )
    return created


async def list_policies(db: Database) -> dict[str, Any]:
    rows = await db.fetch(f"SELECT {POLICY_COLUMNS} FROM backup_policies ORDER BY name")
    rules = await db.fetch(f"SELECT policy_id, {RULE_COLUMNS} FROM backup_copy_rules ORDER BY created_at, id")
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in rules:
        rule = dict(r.items())
        by_policy.setdefault(rule.pop("policy_id"), []).append(rule)
    policies = [{**dict(p.items()), "copy_rules": by_policy.get(p["id"], [])} for p in rows]
    return {"policies": policies, "count": len(policies)}


async def get_policy(db: Database, policy_id: str) -> dict[str, Any]:
    return await _policy(db, policy_id)


async def delete_policy(db: Database, policy_id: str) -> dict[str, Any]:
    deleted = await db.fetchval("DELETE FROM backup_policies WHERE id = $1 RETURNING id", policy_id)
    if deleted is None:
        raise ApiError.not_found(f"policy {policy_id} not found")
    with log_context(action="policy_delete"):
        log.info("backup policy deleted", extra={"policy_id": policy_id})
    return {"message": "policy deleted", "id": policy_id}
