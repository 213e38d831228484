"""Backup policies with copy rules, backup copies, retention status (the seed's "Backup Policy
Management"): the HTTP side of :mod:`oma.backups.policies`, :mod:`oma.backups.copies` and
:mod:`oma.backups.retention`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from quart import Blueprint, current_app
from quart_schema import validate_request

from oma.api.access import requires
from oma.api.requests import MAX_NAME, RequestModel, not_cut_short
from oma.backups import copies, policies
from oma.backups.copies import COPY_WORKER_KEY, CopyWorker
from oma.backups.policies import MAX_COPY_RULES, CopyRule, NewPolicy
from oma.backups.retention import RETENTION_KEY, RetentionService, retention_status
from oma.state import state

bp = Blueprint("policies", __name__)


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


@bp.post("/policies")
@requires("operator")
@validate_request(PolicyRequest)
async def create_policy(data: PolicyRequest) -> tuple[dict[str, Any], int]:
    policy = NewPolicy(
        name=data.name,
        enabled=data.enabled,
        primary_repository_id=data.primary_repository_id,
        retention_days=data.retention_days,
        copy_rules=[
            CopyRule(r.destination_repository_id, r.copy_mode, r.verify_after_copy, r.enabled)
            for r in data.copy_rules
        ],
    )
    with not_cut_short():
        return await policies.create_policy(state().db, policy), 201


@bp.get("/policies")
@requires("viewer")
async def list_policies() -> dict[str, Any]:
    return await policies.list_policies(state().db)


@bp.get("/policies/retention-status")
@requires("viewer")
async def get_retention_status() -> dict[str, Any]:
    """This process's retention service and the last run any OMA process made (docs/backup.md)."""
    service: RetentionService | None = current_app.extensions.get(RETENTION_KEY)
    return await retention_status(state().db, service)


@bp.get("/policies/<policy_id>")
@requires("viewer")
async def get_policy(policy_id: str) -> dict[str, Any]:
    return await policies.get_policy(state().db, policy_id)


@bp.delete("/policies/<policy_id>")
@requires("operator")
async def delete_policy(policy_id: str) -> dict[str, Any]:
    return await policies.delete_policy(state().db, policy_id)


@bp.get("/backups/<backup_id>/copies")
@requires("viewer")
async def list_backup_copies(backup_id: str) -> list[dict[str, Any]]:
    return await copies.copies_of(state().db, backup_id)


@bp.post("/backups/<backup_id>/copy")
@requires("operator")
@validate_request(TriggerCopyRequest)
async def trigger_backup_copy(backup_id: str, data: TriggerCopyRequest) -> tuple[dict[str, Any], int]:
    with not_cut_short():
        copy_id = await copies.queue_copy(state().db, backup_id, data.repository_id)
    worker: CopyWorker | None = current_app.extensions.get(COPY_WORKER_KEY)
    if worker is not None:
        worker.wake()
    return {"copy_id": copy_id, "status": "pending"}, 202
