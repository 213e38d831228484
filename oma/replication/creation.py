"""A new replication job: its VM, its disks and their bases, recorded in one statement.

Each disk of a job is a row of ``replication_job_disks``; a partial unique index allows one
*active* row per VM disk (vCenter, VM id, disk id), so two concurrent creations for the same disk
yield one job and one 409, decided by PostgreSQL rather than by a check-then-insert race. The
job is only recorded (``pending``): the engine of some OMA process claims and runs it.
"""

from __future__ import annotations

import logging
from typing import Any

from oma.replication.change_ids import disk_bases
from oma.replication.events import JobChange, JobEvents
from oma.replication.identity import SourceVm, disks_for, resolve_identity
from oma.replication.jobs import JOB_COLUMNS
from oma.store.rows import new_id, row_dict
from pyapp.api import ApiError
from pyapp.db import Database, ForeignKeyViolation, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)

#: The partial unique index allowing one active job per VM disk.
ACTIVE_DISK_INDEX = "replication_job_disks_one_active"


async def create_job(
    db: Database,
    events: JobEvents,
    vm: SourceVm,
    *,
    vcenter_host: str,
    replication_type: str | None,
    credential_id: int | None,
    created_by: str,
) -> dict[str, Any]:
    """Record a ``pending`` job copying ``vm``'s disks; returns it with its disks.

    ``replication_type`` None: incremental when every disk's current volume holds a complete
    pass, else initial. 409 when a disk already has an active job, or an incremental is asked
    for a disk without a base; 422 for an unknown credential or a VM without known disks."""
    job_id = new_id("repl")
    disks = sorted(await disks_for(db, vm), key=lambda d: d.id)
    who = await resolve_identity(db, vm, vcenter_host)
    bases = await disk_bases(db, who, [d.id for d in disks])
    all_have_base = all(d.id in bases for d in disks)
    kind = replication_type or ("incremental" if all_have_base else "initial")
    if kind == "incremental" and not all_have_base:
        missing = sorted(d.id for d in disks if d.id not in bases)
        raise ApiError.conflict(
            f"incremental replication needs a complete earlier pass into the current volume of disks"
            f" {missing}: run an initial replication (or omit replication_type)"
        )
    # initial: every disk gets a full pass into a new volume generation; incremental: each disk
    # builds on its volume's latest change ID (the engine checks the volume is still that one).
    used = [bases[d.id] if kind == "incremental" else None for d in disks]
    try:
        # One statement, so one atomic step: upsert the VM context (pointing at the new job), insert
        # the job and its disks. The partial unique index on active disks makes a concurrent
        # creation for the same disk fail here as a whole (nothing of it is kept). The context is
        # locked first, as every other writer of a job does (lock_job).
        row = await db.fetchrow(
            "WITH ctx AS ("
            "  INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter,"
            "   current_job_id, current_status, total_jobs, last_job_at)"
            "  VALUES ($2, $3, $4, $5, $6, $7, $1, 'replication_pending', 1, now())"
            "  ON CONFLICT (vcenter_host, vmware_vm_id) DO UPDATE SET vm_path = EXCLUDED.vm_path,"
            "   vm_name = EXCLUDED.vm_name,"
            "   current_job_id = EXCLUDED.current_job_id, current_status = 'replication_pending',"
            "   total_jobs = vm_contexts.total_jobs + 1, last_job_at = now(), updated_at = now()"
            "  RETURNING context_id),"
            " job AS ("
            "  INSERT INTO replication_jobs (id, vm_context_id, vm_id, vm_name, vm_path, vcenter_host,"
            "   datacenter, replication_type, status, total_bytes, current_operation, created_by,"
            "   credential_id)"
            "  SELECT $1, ctx.context_id, $4, $3, $5, $6, $7, $8, 'pending', $9, 'queued', $10, $14 FROM ctx"
            f"  RETURNING"
            f" {JOB_COLUMNS}),"
            " disks AS"
            " ("
            "  INSERT INTO replication_job_disks (job_id, disk_id, vm_path, vcenter_host,"
            " vm_id, capacity_bytes,"
            "   base_change_id, volume_id, volume_generation)"
            "  SELECT job.id, u.disk_id, $5, $6, $4, u.capacity_bytes, u.base_change_id,"
            " u.volume_id, u.generation"
            "  FROM job, unnest($11::text[], $12::bigint[], $13::text[], $15::text[], $16::int[])"
            "   AS u(disk_id, capacity_bytes, base_change_id, volume_id, generation)"
            "  RETURNING 1)"
            " SELECT job.*, (SELECT count(*) FROM disks) AS disk_count FROM job",
            job_id,
            new_id("ctx"),
            vm.name,
            who.vm_id,
            vm.path,
            who.vcenter,
            vm.datacenter,
            kind,
            sum(d.capacity_bytes or 0 for d in disks),
            created_by,
            [d.id for d in disks],
            [d.capacity_bytes for d in disks],
            [b.change_id if b else None for b in used],
            credential_id,
            [b.volume_id if b else None for b in used],
            [b.generation if b else None for b in used],
        )
    except UniqueViolation as exc:
        if exc.constraint_name != ACTIVE_DISK_INDEX:
            raise
        existing = await db.fetchval(
            "SELECT job_id FROM replication_job_disks WHERE vcenter_host = $1 AND vm_id = $2"
            " AND disk_id = ANY($3::text[]) AND active LIMIT 1",
            who.vcenter,
            who.vm_id,
            [d.id for d in disks],
        )
        raise ApiError.conflict(
            f"VM {vm.name!r} already has an active replication job ({existing}) for one of these disks"
        ) from exc
    except ForeignKeyViolation as exc:  # the only reference the request names: its credential
        message = f"credential_id {credential_id}: no such VMware credential"
        raise ApiError.unprocessable(message) from exc
    assert row is not None
    job = row_dict(row, exclude=("disk_count",))
    job["disks"] = [
        {
            "disk_id": d.id,
            "capacity_bytes": d.capacity_bytes,
            "active": True,
            "base_change_id": base.change_id if base else None,
            "volume_id": base.volume_id if base else None,
            "volume_generation": base.generation if base else None,
            "volume_path": None,
            "nbd_uri": None,
            "copy_mode": None,
            "bytes_written": None,
            "bytes_zeroed": None,
            "change_id": None,
        }
        for d, base in zip(disks, used, strict=True)
    ]
    with log_context(job_id=job_id, action="replication_create"):
        log.info(
            "replication job created",
            extra={"vm_name": vm.name, "vm_id": who.vm_id, "vcenter": who.vcenter, "replication_type": kind},
        )
    events.publish(JobChange(job_id, None, "pending"))
    return job
