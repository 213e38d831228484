"""A job's progress: the database's figures, with the VMA's live ones while the job runs."""

from __future__ import annotations

from typing import Any

from oma.replication.jobs import ACTIVE, job_disks, load_job
from oma.vma_client import VmaClient, VmaError
from pyapp.db import Database

LIVE_FIELDS = (
    "progress_percent",
    "bytes_transferred",
    "total_bytes",
    "current_operation",
    "throughput_bps",
    "phase",
    "current_disk",
    "eta_seconds",
)  # the VMA's per-disk figures stay under "vma" ("disks" is the job's disks, from the database)


async def job_progress(db: Database, vma: VmaClient, job_id: str) -> dict[str, Any]:
    """``job_id``'s figures from the database; while it is active, the VMA's live figures over
    them (``source: "vma"``), or why the VMA gave none (``vma_error``)."""
    job = await load_job(db, job_id)
    merged: dict[str, Any] = {
        "job_id": job_id,
        "status": job["status"],
        "replication_type": job["replication_type"],
        "vm_name": job["vm_name"],
        "progress_percent": job["progress_percent"],
        "bytes_transferred": job["bytes_transferred"],
        "total_bytes": job["total_bytes"],
        "current_operation": job["current_operation"],
        "throughput_bps": None,
        "phase": None,
        "current_disk": None,
        "eta_seconds": None,
        "disks": await job_disks(db, job_id),
        "started_at": job["started_at"],
        "updated_at": job["updated_at"],
        "completed_at": job["completed_at"],
        "error_message": job["error_message"],
        "source": "database",
        "vma": None,
        "vma_error": None,
    }
    if job["status"] in ACTIVE:
        try:
            live = await vma.progress(job_id)
        except VmaError as exc:
            merged["vma_error"] = exc.message
        else:
            merged["vma"] = live
            merged["source"] = "vma"
            for key in LIVE_FIELDS:
                if live.get(key) is not None:
                    merged[key] = live[key]
    return merged
