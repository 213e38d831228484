"""``POST /api/v1/cleanup``: remove a job's VMware snapshot (``delete_snapshot``) or everything
the job left (``cleanup_all``: its snapshots, its nbdkit sources, its work directory).

A running job is stopped first (it cannot go on without its snapshot); its own failure path
removes the snapshot, and whatever is still recorded afterwards — or still named
``vma-<job_id>`` on the job's VMs — is removed here. Snapshots the VMA did not make are never
touched. Success answers the seed's ``{"job_id", "action", "status": "success"}`` plus what was
removed; a vCenter failure answers 502 ``OPERATION_FAILED`` with the seed's
``"status": "error", "message"`` fields besides the error envelope."""

from __future__ import annotations

import logging
from typing import Any

import trio
from quart import Blueprint, Response, jsonify
from quart_schema import document_request

from pyapp.logs import log_context
from vma.api.errors import OPERATION_FAILED, ApiError, json_object, utc_now_iso
from vma.api.schemas import CleanupRequest, refuse_unknown_fields
from vma.api.validation import job_id as parse_job_id
from vma.api.validation import text
from vma.replication.jobs import Job
from vma.replication.workflow import remove_artifacts
from vma.state import state
from vma.vsphere.client import SnapshotRef, VSphere, VSphereError, run

bp = Blueprint("cleanup", __name__)
log = logging.getLogger(__name__)

ACTIONS = ("delete_snapshot", "cleanup_all")
STOP_TIMEOUT = 300.0


async def _stop(job: Job, action: str) -> bool:
    if job.finished:
        return False
    job.cancel_reason = f"stopped by cleanup ({action})"
    if job.cancel_scope is not None:
        job.cancel_scope.cancel()
    with trio.move_on_after(STOP_TIMEOUT):
        await job.done.wait()
    if not job.done.is_set():
        raise ApiError.failed(f"job {job.job_id} did not stop within {STOP_TIMEOUT:.0f} s", status=503)
    return True


def _remove_snapshots(vs: VSphere, job: Job, before: list[SnapshotRef]) -> list[str]:
    """Remove what the job still holds; returns every snapshot of the job now gone, including
    those its own failure path removed while it stopped (``before``: held before the stop)."""
    removed = [s.moref for s in before if s not in job.snapshots and not vs.snapshot_exists(s)]
    for snap in list(job.snapshots):
        if vs.remove_snapshot(snap):
            removed.append(snap.moref)
        job.snapshots.remove(snap)
    # A snapshot whose create task ended after the job stopped is not recorded: find it by name.
    for path in job.vm_paths:
        try:
            vm = vs.find_vm(path)
        except VSphereError:
            continue
        for snap in vs.snapshots_named(vm, f"vma-{job.job_id}"):
            if vs.remove_snapshot(snap):
                removed.append(snap.moref)
    return removed


@bp.post("/cleanup")
@document_request(CleanupRequest)
async def cleanup() -> Any:
    body = refuse_unknown_fields(await json_object(), CleanupRequest)
    job_id = parse_job_id(body)
    action = text(body, "action", max_len=64)
    if action not in ACTIONS:
        raise ApiError.invalid(f"action must be one of {', '.join(ACTIONS)}")
    st = state()
    job = st.tracker.get(job_id)
    with log_context(job_id=job_id, action=f"cleanup_{action}"):
        before = list(job.snapshots)
        stopped = await _stop(job, action)
        try:
            vs = await run(VSphere.connect, job.login, insecure=st.config.vcenter_insecure)
            try:
                removed = await run(_remove_snapshots, vs, job, before)
            finally:
                await run(vs.disconnect)
        except VSphereError as e:
            log.error("cleanup failed: %s", e)
            response: Response = jsonify(
                {
                    "error": str(e),
                    "code": OPERATION_FAILED,
                    "timestamp": utc_now_iso(),
                    "job_id": job_id,
                    "action": action,
                    "status": "error",
                    "message": str(e),
                }
            )
            response.status_code = 502
            return response
        artifacts = (
            await trio.to_thread.run_sync(remove_artifacts, st.config, job)
            if action == "cleanup_all"
            else False
        )
        log.info("cleanup done", extra={"snapshots_removed": removed, "job_stopped": stopped})
    return {
        "job_id": job_id,
        "action": action,
        "status": "success",
        "job_stopped": stopped,
        "snapshots_removed": removed,
        "artifacts_removed": artifacts,
    }
