"""``POST /api/v1/replicate``: start a replication job in the background.

Body: the seed's ``job_id, vcenter, username, password, vm_paths, oma_url`` plus, optionally,
``targets``: ``{"<vm_path>": {"<disk-2000 | 2000 | index>": "nbd://host:port/export"}}``, where
each disk is written (see docs/vma.md). Without ``targets`` a single-disk VM goes to the export
set by ``PUT /api/v1/config``. The answer comes at once; ``/status`` and ``/progress`` follow it."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, current_app, request

from vma.api.validation import job_id as parse_job_id
from vma.api.validation import text
from vma.errors import ApiError, require_json_object
from vma.jobs import Job, iso
from vma.state import state
from vma.vsphere import VCenterLogin

bp = Blueprint("replicate", __name__)

MAX_VMS = 256


def _targets(body: dict[str, Any], vm_paths: list[str]) -> dict[str, dict[str, str]]:
    raw = body.get("targets")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.invalid("targets must be an object: vm_path -> disk -> NBD URI")
    out: dict[str, dict[str, str]] = {}
    for vm_path, disks in raw.items():
        if vm_path not in vm_paths:
            raise ApiError.invalid(f"targets names {vm_path!r}, which is not in vm_paths")
        if not isinstance(disks, dict) or not disks:
            raise ApiError.invalid(f"targets[{vm_path!r}] must be an object: disk -> NBD URI")
        for disk, uri in disks.items():
            if not isinstance(uri, str) or not uri.startswith(("nbd://", "nbd+unix://", "/")):
                raise ApiError.invalid(f"targets[{vm_path!r}][{disk!r}] must be an NBD URI")
        out[vm_path] = {str(k): str(v) for k, v in disks.items()}
    return out


@bp.post("/replicate")
async def replicate() -> tuple[dict[str, Any], int]:
    body = require_json_object(await request.get_json(silent=True))
    job_id = parse_job_id(body)
    login = VCenterLogin(text(body, "vcenter"), text(body, "username"), text(body, "password"))
    vm_paths = body.get("vm_paths")
    if (
        not isinstance(vm_paths, list)
        or not vm_paths
        or len(vm_paths) > MAX_VMS
        or not all(isinstance(p, str) and p.startswith("/") for p in vm_paths)
    ):
        raise ApiError.invalid("vm_paths must be a non-empty list of inventory paths (/DC/vm/NAME)")
    if len(set(vm_paths)) != len(vm_paths):
        raise ApiError.invalid("vm_paths lists a VM twice")
    oma_url = text(body, "oma_url", required=False, max_len=1024)
    if oma_url and not oma_url.startswith(("http://", "https://")):
        raise ApiError.invalid("oma_url must be an http(s) URL")
    targets = _targets(body, vm_paths)
    st = state()
    c = st.config
    if not targets and not (c.nbd_port and c.export_name and len(vm_paths) == 1):
        raise ApiError.invalid(
            "no target: give targets (vm_path -> disk -> NBD URI) or set nbd_port and export_name"
            " through PUT /api/v1/config for a single-disk VM"
        )
    job = Job(
        job_id=job_id,
        vm_paths=list(vm_paths),
        login=login,
        oma_url=oma_url or c.oma_url,
        work_dir=c.work_dir / job_id,
    )
    st.tracker.add(job)
    current_app.add_background_task(st.replicator.run_job, job, targets)
    return {
        "job_id": job_id,
        "status": "started",
        "vm_count": len(vm_paths),
        "started_at": iso(job.created_at),
    }, 200
