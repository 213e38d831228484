"""Failover jobs and their steps as rows (migration 014).

A job's row holds what it changed in CloudStack (the target VM, the template ROOT, each replica
volume's snapshot and where the volume is), written before each change, so that an undo — after
a failed step, at the end of a test, or after a restart — works from the row alone. Steps are
rows of ``failover_job_steps``, appended in order.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pyapp.api import ApiError
from pyapp.db import Database, UniqueViolation

TEST, LIVE = "test", "live"
RUNNING, FAILED_OVER, ENDING, ENDED = "running", "failed_over", "ending", "ended"
ROLLING_BACK, FAILED, CLEANUP_REQUIRED = "rolling_back", "failed", "cleanup_required"
#: A job in these holds its VM (one at a time: ``failover_jobs_one_active``).
ACTIVE = (RUNNING, FAILED_OVER, ENDING, ROLLING_BACK, CLEANUP_REQUIRED)
#: The VM context's states a failover moves it through.
READY_FOR_FAILOVER = "ready_for_failover"
FAILING_OVER_TEST = "failing_over_test"
FAILED_OVER_TEST = "failed_over_test"
ENDING_TEST = "ending_test"
CONTEXT_CLEANUP_REQUIRED = "cleanup_required"

_COLUMNS = (
    "id, vm_context_id, failover_type, status, error_message, vm_name, vcenter_host, vm_id, created_by,"
    " created_at, updated_at, started_at, completed_at, ended_at, target_vm_name, target_vm_id,"
    " template_root_id, template_root_deleted, volumes, previous_vm_status"
)


@dataclass
class JobVolume:
    """One replica disk of a job, in disk order (disk 0 becomes the ROOT volume)."""

    disk_id: str
    replica_volume_id: str
    cloudstack_volume_id: str
    snapshot_name: str
    snapshot_id: str | None = None
    detached_from_oma: bool = False
    attached_to_target: bool = False


def job_volumes(job: dict[str, Any]) -> list[JobVolume]:
    raw = job["volumes"]
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [JobVolume(**item) for item in items]


def _row(row: Any) -> dict[str, Any]:
    job = dict(row.items())
    if isinstance(job["volumes"], str):
        job["volumes"] = json.loads(job["volumes"])
    return job


async def create_job(
    db: Database, context: dict[str, Any], kind: str, created_by: str, volumes: list[JobVolume]
) -> dict[str, Any]:
    """A new job holding the VM (409 when another failover holds it); the context moves on."""
    job_id = f"fo-{uuid.uuid4().hex[:16]}"
    try:
        async with db.transaction() as conn:
            row = await conn.fetchrow(
                "INSERT INTO failover_jobs (id, vm_context_id, failover_type, status, vm_name, vcenter_host,"
                " vm_id, created_by, started_at, volumes, previous_vm_status, target_vm_name)"
                " VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, now(), $8::jsonb, $9, $10)"
                f" RETURNING {_COLUMNS}",
                job_id,
                context["context_id"],
                kind,
                context["vm_name"],
                context["vcenter_host"],
                context["vmware_vm_id"],
                created_by,
                json.dumps([asdict(v) for v in volumes]),
                context["current_status"],
                target_vm_name(job_id),
            )
            await set_context_status(conn, context["context_id"], FAILING_OVER_TEST)
    except UniqueViolation as exc:
        raise ApiError.conflict(f"another failover job holds VM {context['vm_name']!r}") from exc
    return _row(row)


def target_vm_name(job_id: str) -> str:
    """The name the job deploys its VM with (a valid host name, found again by it)."""
    return job_id


async def set_context_status(conn: Any, context_id: str, status: str) -> None:
    await conn.execute(
        "UPDATE vm_contexts SET current_status = $2, updated_at = now() WHERE context_id = $1",
        context_id,
        status,
    )


async def load_job(db: Database, job_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM failover_jobs WHERE id = $1", job_id)
    if row is None:
        raise ApiError.not_found(f"failover job {job_id} not found")
    return _row(row)


async def update_job(db: Database, job_id: str, **changes: Any) -> None:
    """Set columns of the job (``volumes`` as a list of :class:`JobVolume`)."""
    if "volumes" in changes:
        changes["volumes"] = json.dumps([asdict(v) for v in changes["volumes"]])
    names = list(changes)
    sets = ", ".join(f"{n} = ${i + 2}{'::jsonb' if n == 'volumes' else ''}" for i, n in enumerate(names))
    await db.execute(
        f"UPDATE failover_jobs SET {sets}, updated_at = now() WHERE id = $1",
        job_id,
        *(changes[n] for n in names),
    )


async def finish_job(
    db: Database, job: dict[str, Any], status: str, context_status: str, error: str | None = None
) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE failover_jobs SET status = $2, error_message = COALESCE($3, error_message),"
            " updated_at = now(),"
            " completed_at = CASE WHEN $2 IN ('failed_over', 'failed') THEN now() ELSE completed_at END,"
            " ended_at = CASE WHEN $2 = 'ended' THEN now() ELSE ended_at END"
            " WHERE id = $1",
            job["id"],
            status,
            error,
        )
        await set_context_status(conn, job["vm_context_id"], context_status)


async def begin_step(db: Database, job_id: str, name: str) -> int:
    """A new step of the job, running; its sequence number."""
    seq: int = await db.fetchval(
        "INSERT INTO failover_job_steps (job_id, seq, name, status)"
        " SELECT $1, COALESCE(max(seq), 0) + 1, $2, 'running' FROM failover_job_steps WHERE job_id = $1"
        " RETURNING seq",
        job_id,
        name,
    )
    return seq


async def end_step(
    db: Database, job_id: str, seq: int, status: str, result: dict[str, Any], error: str | None = None
) -> None:
    await db.execute(
        "UPDATE failover_job_steps SET status = $3, ended_at = now(), result = $4::jsonb,"
        " error_message = $5 WHERE job_id = $1 AND seq = $2",
        job_id,
        seq,
        status,
        json.dumps(result),
        error,
    )


async def steps(db: Database, job_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT seq, name, status, started_at, ended_at, error_message, result,"
        " extract(epoch FROM (COALESCE(ended_at, now()) - started_at)) AS seconds"
        " FROM failover_job_steps WHERE job_id = $1 ORDER BY seq",
        job_id,
    )
    out = []
    for r in rows:
        step = dict(r.items())
        if isinstance(step["result"], str):
            step["result"] = json.loads(step["result"])
        step["seconds"] = round(float(step["seconds"]), 3)
        out.append(step)
    return out


async def job_status(db: Database, job_id: str) -> dict[str, Any]:
    """The job with its steps, as ``GET /failover/{job_id}/status`` shows it."""
    job = await load_job(db, job_id)
    job["steps"] = await steps(db, job_id)
    running = [s["name"] for s in job["steps"] if s["status"] == "running"]
    job["current_step"] = running[-1] if running else None
    return job


async def list_jobs(
    db: Database, *, status: str | None, vm_name: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM failover_jobs WHERE ($1::text IS NULL OR status = $1)"
        " AND ($2::text IS NULL OR vm_name = $2) ORDER BY created_at DESC, id DESC LIMIT $3",
        status,
        vm_name,
        limit,
    )
    return [_row(r) for r in rows]


async def unfinished(db: Database) -> list[str]:
    """Jobs a stopped OMA left in a transition (running, ending, rolling back)."""
    rows = await db.fetch(
        "SELECT id FROM failover_jobs WHERE status IN ('running', 'ending', 'rolling_back')"
        " ORDER BY created_at"
    )
    return [r["id"] for r in rows]
