"""Backup policies with copy rules, backup copies, retention status (the seed's "Backup Policy
Management").

A policy names the repository its backups go to (``primary_repository_id``), how long points
are kept (``retention_days``, applied by ``oma.backups.retention``) and copy rules: each sends
every completed backup of the policy to another repository (``oma.backups.copies``). A policy
and its rules are written in one transaction; deleting a policy deletes its rules (cascade) and
leaves its backups in place, with ``policy_id`` set to null.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field
from quart import Blueprint, current_app
from quart_schema import validate_request

from oma.api.access import requires
from oma.api.requests import MAX_NAME, RequestModel, not_cut_short
from oma.backups.copies import COPY_WORKER_KEY, CopyWorker, request_copy
from oma.backups.retention import RETENTION_KEY, RetentionService, retention_status
from oma.state import state
from oma.store.rows import new_id
from pyapp.api import ApiError
from pyapp.db import Connection, Database, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)
bp = Blueprint("policies", __name__)

MAX_COPY_RULES = 16
POLICY_COLUMNS = "id, name, enabled, primary_repository_id, retention_days, created_at, updated_at"
RULE_COLUMNS = "id, destination_repository_id, copy_mode, verify_after_copy, enabled, created_at"
COPY_COLUMNS = (
    "id AS copy_id, backup_id, repository_id, status, file_path, size_bytes, disk_digest, verified,"
    " error_message, created_at, started_at, completed_at"
)


class CopyRuleRequest(RequestModel):
    destination_repository_id: str = Field(min_length=1, max_length=MAX_NAME)
    copy_mode: Literal["immediate", "scheduled"] = "immediate"
    verify_after_copy: bool = True
    enabled: bool = True


class PolicyRequest(RequestModel):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    enabled: bool = True
    primary_repository_id: str = Field(min_length=1, max_length=MAX_NAME)
    retention_days: int = Field(ge=1, le=36500)
    copy_rules: list[CopyRuleRequest] = Field(default_factory=list, max_length=MAX_COPY_RULES)


class TriggerCopyRequest(RequestModel):
    repository_id: str = Field(min_length=1, max_length=MAX_NAME)


async def _policy(conn: Database | Connection, policy_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {POLICY_COLUMNS} FROM backup_policies WHERE id = $1", policy_id)
    if row is None:
        raise ApiError.not_found(f"policy {policy_id} not found")
    rules = await conn.fetch(
        f"SELECT {RULE_COLUMNS} FROM backup_copy_rules WHERE policy_id = $1 ORDER BY created_at, id",
        policy_id,
    )
    return {**dict(row.items()), "copy_rules": [dict(r.items()) for r in rules]}


def _check_rules(data: PolicyRequest) -> None:
    errors = []
    seen: set[str] = set()
    for i, rule in enumerate(data.copy_rules):
        dest = rule.destination_repository_id
        if dest == data.primary_repository_id:
            errors.append(f"copy_rules[{i}]: the destination is the primary repository")
        if dest in seen:
            errors.append(f"copy_rules[{i}]: repository {dest} is named by another rule")
        seen.add(dest)
    if errors:
        raise ApiError.unprocessable("invalid copy rules", details=errors)


@bp.post("/policies")
@requires("operator")
@validate_request(PolicyRequest)
async def create_policy(data: PolicyRequest) -> tuple[dict[str, Any], int]:
    _check_rules(data)
    policy_id = new_id("pol")
    wanted = {data.primary_repository_id, *(r.destination_repository_id for r in data.copy_rules)}
    try:
        with not_cut_short():
            async with state().db.transaction() as conn:
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
                    data.name,
                    data.enabled,
                    data.primary_repository_id,
                    data.retention_days,
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
                        for r in data.copy_rules
                    ],
                )
                policy = await _policy(conn, policy_id)
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a policy named {data.name!r} already exists") from exc
    with log_context(action="policy_create"):
        log.info("backup policy created", extra={"policy_id": policy_id, "copy_rules": len(data.copy_rules)})
    return policy, 201


@bp.get("/policies")
@requires("viewer")
async def list_policies() -> dict[str, Any]:
    db = state().db
    rows = await db.fetch(f"SELECT {POLICY_COLUMNS} FROM backup_policies ORDER BY name")
    rules = await db.fetch(f"SELECT policy_id, {RULE_COLUMNS} FROM backup_copy_rules ORDER BY created_at, id")
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in rules:
        rule = dict(r.items())
        by_policy.setdefault(rule.pop("policy_id"), []).append(rule)
    policies = [{**dict(p.items()), "copy_rules": by_policy.get(p["id"], [])} for p in rows]
    return {"policies": policies, "count": len(policies)}


@bp.get("/policies/retention-status")
@requires("viewer")
async def get_retention_status() -> dict[str, Any]:
    """This process's retention service and the last run any OMA process made (docs/backup.md)."""
    service: RetentionService | None = current_app.extensions.get(RETENTION_KEY)
    return await retention_status(state().db, service)


@bp.get("/policies/<policy_id>")
@requires("viewer")
async def get_policy(policy_id: str) -> dict[str, Any]:
    return await _policy(state().db, policy_id)


@bp.delete("/policies/<policy_id>")
@requires("operator")
async def delete_policy(policy_id: str) -> dict[str, Any]:
    deleted = await state().db.fetchval("DELETE FROM backup_policies WHERE id = $1 RETURNING id", policy_id)
    if deleted is None:
        raise ApiError.not_found(f"policy {policy_id} not found")
    with log_context(action="policy_delete"):
        log.info("backup policy deleted", extra={"policy_id": policy_id})
    return {"message": "policy deleted", "id": policy_id}


@bp.get("/backups/<backup_id>/copies")
@requires("viewer")
async def list_backup_copies(backup_id: str) -> list[dict[str, Any]]:
    db = state().db
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM backup_jobs WHERE id = $1)", backup_id):
        raise ApiError.not_found(f"backup {backup_id} not found")
    rows = await db.fetch(
        f"SELECT {COPY_COLUMNS} FROM backup_copies WHERE backup_id = $1 ORDER BY created_at, id", backup_id
    )
    return [dict(r.items()) for r in rows]


@bp.post("/backups/<backup_id>/copy")
@requires("operator")
@validate_request(TriggerCopyRequest)
async def trigger_backup_copy(backup_id: str, data: TriggerCopyRequest) -> tuple[dict[str, Any], int]:
    with not_cut_short():
        async with state().db.transaction() as conn:
            copy_id = await request_copy(conn, backup_id, data.repository_id)
    worker: CopyWorker | None = current_app.extensions.get(COPY_WORKER_KEY)
    if worker is not None:
        worker.wake()
    with log_context(action="backup_copy_request"):
        log.info(
            "backup copy requested",
            extra={"backup_id": backup_id, "repository_id": data.repository_id, "copy_id": copy_id},
        )
    return {"copy_id": copy_id, "status": "pending"}, 202
