"""Change IDs (CBT): what the next pass of a disk builds on.

After a pass the VMA stores the vCenter change ID of each disk (:func:`store_change_id`). A change
ID belongs to the target volume (and its generation, ``replica_volumes``) that received it: the
base of a disk's next pass is the latest change ID of the disk's current volume generation
(:func:`disk_bases`), fixed in the job at creation and sent to the VMA with the job
(``base_change_id`` per disk; null: a full pass). A volume made anew has a new generation, so no
earlier change ID can be a base for it. A failed or cancelled job cannot record a change ID: a
base that was never fully copied would silently lose changed blocks on the next incremental pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from oma.replication.identity import VmIdentity
from oma.replication.jobs import lock_job
from oma.store.rows import iso
from pyapp.api import ApiError
from pyapp.db import Connection, Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskBase:
    """The base a disk's next pass can build on: the latest change ID of its current volume
    generation, if that volume holds a complete pass (``ready``). A disk that never had a volume
    (its jobs were run outside this OMA's engine, as in the seed: the VMA given its own targets)
    has the latest change ID recorded without a volume (``volume_id`` None); the engine never
    applies such a base to a volume of its own."""

    volume_id: str | None
    generation: int | None
    change_id: str


async def disk_bases(
    conn: Database | Connection, who: VmIdentity, disk_ids: list[str]
) -> dict[str, DiskBase]:
    rows = await conn.fetch(
        "SELECT d.disk_id, v.id, v.generation, CASE"
        "  WHEN v.id IS NULL THEN (SELECT c.change_id FROM vm_disk_changeids c WHERE c.vcenter_host = $1"
        "   AND c.vm_id = $2 AND c.disk_id = d.disk_id AND c.volume_id IS NULL ORDER BY c.id DESC LIMIT 1)"
        "  WHEN v.state = 'ready' THEN (SELECT c.change_id FROM vm_disk_changeids c WHERE c.volume_id = v.id"
        "   AND c.generation = v.generation ORDER BY c.id DESC LIMIT 1)"
        " END AS change_id"
        " FROM unnest($3::text[]) AS d(disk_id) LEFT JOIN replica_volumes v"
        " ON v.vcenter_host = $1 AND v.vm_id = $2 AND v.disk_id = d.disk_id",
        who.vcenter,
        who.vm_id,
        disk_ids,
    )
    return {r["disk_id"]: DiskBase(r["id"], r["generation"], r["change_id"]) for r in rows if r["change_id"]}


async def latest_change_id(db: Database, vm_path: str, disk_id: str) -> dict[str, Any]:
    """The latest change ID of the current volume of the VM last replicated from ``vm_path``: none
    when that volume is being made anew (or failed), whatever older volumes or VMs stored. For a
    path whose jobs never had a volume (run outside the engine), the latest one recorded."""
    row = await db.fetchrow(
        "WITH v AS (SELECT id, generation, state FROM replica_volumes WHERE vm_path = $1 AND disk_id = $2"
        "  ORDER BY updated_at DESC LIMIT 1)"
        " SELECT c.change_id, c.job_id, c.created_at FROM vm_disk_changeids c WHERE CASE"
        "  WHEN EXISTS (SELECT 1 FROM v)"
        "   THEN (c.volume_id, c.generation) = (SELECT id, generation FROM v WHERE state = 'ready')"
        "  ELSE c.volume_id IS NULL AND c.vm_path = $1 AND c.disk_id = $2"
        " END ORDER BY c.id DESC LIMIT 1",
        vm_path,
        disk_id,
    )
    return {
        "vm_path": vm_path,
        "disk_id": disk_id,
        "change_id": row["change_id"] if row else None,
        "job_id": row["job_id"] if row else None,
        "recorded_at": iso(row["created_at"]) if row else None,
    }


async def store_change_id(
    db: Database, job_id: str, disk_id: str, change_id: str, *, vm_path: str | None
) -> dict[str, Any]:
    """Record ``change_id`` for ``disk_id`` of ``job_id`` (``vm_path``: the VM the reporter means,
    checked against the job's). The volume the job wrote becomes ``ready`` in the same step."""
    async with db.transaction() as conn:
        job = await lock_job(conn, job_id)
        if job["status"] in ("failed", "cancelled"):
            raise ApiError.conflict(f"job {job_id} is {job['status']}; its change IDs cannot become a base")
        if vm_path is not None and vm_path != job["vm_path"]:
            raise ApiError.unprocessable(f"job {job_id} replicates {job['vm_path']!r}, not {vm_path!r}")
        disk = await conn.fetchrow(
            "SELECT vm_path, vcenter_host, vm_id, volume_id, volume_generation FROM replication_job_disks"
            " WHERE job_id = $1 AND disk_id = $2",
            job_id,
            disk_id,
        )
        if disk is None:
            raise ApiError.not_found(f"job {job_id} has no disk {disk_id!r}")
        # The volume becomes 'ready' (it holds a complete pass) in the same step as its change ID,
        # and only if it is still the generation this job wrote. A job without a volume (not run
        # by the engine) records a change ID of no volume: never a base for a volume.
        if disk["volume_id"] is not None and not await conn.fetchval(
            "UPDATE replica_volumes SET state = 'ready', error_message = NULL, updated_at = now()"
            " WHERE id = $1 AND generation = $2 RETURNING true",
            disk["volume_id"],
            disk["volume_generation"],
        ):
            raise ApiError.conflict(
                f"the volume of {disk_id} was made anew since job {job_id} started: its change ID"
                " would describe another volume"
            )
        row = await conn.fetchrow(
            "INSERT INTO vm_disk_changeids (vm_path, disk_id, change_id, job_id,"
            " vcenter_host, vm_id, volume_id,"
            " generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at",
            disk["vm_path"],
            disk_id,
            change_id,
            job_id,
            disk["vcenter_host"],
            disk["vm_id"],
            disk["volume_id"],
            disk["volume_generation"],
        )
    with log_context(job_id=job_id, action="changeid_store"):
        log.info(
            "change ID stored",
            extra={
                "disk_id": disk_id,
                "volume_id": disk["volume_id"],
                "generation": disk["volume_generation"],
            },
        )
    assert row is not None
    return {
        "job_id": job_id,
        "vm_path": disk["vm_path"],
        "disk_id": disk_id,
        "change_id": change_id,
        "volume_id": disk["volume_id"],
        "volume_generation": disk["volume_generation"],
        "recorded_at": iso(row["created_at"]),
    }
