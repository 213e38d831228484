"""``POST /api/v1/replicate``: start a replication or an export job in the background.

Body: the seed's ``job_id, vcenter, username, password, vm_paths`` plus ``mode`` (the seed's
``oma_url`` is refused with 422: the VMA reports to the OMA of its configuration):

- ``"replicate"`` (default): optionally ``targets``:
  ``{"<vm_path>": {"<disk-2000 | 2000 | index>": "nbd://host:port/export"}}``, where each disk is
  written (see docs/vma.md), or per disk ``{"uri": "nbd://...", "base_change_id": "<id>" | null}``:
  the change ID the target holds (null: none, a full pass); with a plain URI the VMA asks the OMA
  (``GET /replications/changeid``). Optionally ``vm_ids`` ``{vm_path: "vm-143"}``: the VM the job
  is for (another VM found at the path fails the job). Without ``targets`` a single-disk VM goes
  to the export set by ``PUT /api/v1/config``;
- ``"export"`` (backups, docs/backup.md): the snapshot's disks are served for the OMA to read;
  optionally ``disks`` ``{vm_path: ["disk-2000", ...]}`` (default: all),
  ``previous_change_ids`` ``{vm_path: {disk_id: change ID or null}}`` (null or absent: a full
  pass) and ``export_timeout`` (seconds; default ``export_timeout`` of the configuration).

The fields of one mode are refused in the other, so a request that mixes them up fails here
rather than doing something else than its sender meant. The answer comes at once; ``/status``
and ``/progress`` follow the job."""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint, current_app
from quart_schema import document_request

from vma.api.errors import INVALID_REQUEST, ApiError, json_object
from vma.api.schemas import ReplicateRequest, refuse_unknown_fields
from vma.api.validation import job_id as parse_job_id
from vma.api.validation import vcenter_login
from vma.replication.export import ExportRequest
from vma.replication.jobs import Job, JobMode, iso
from vma.replication.replicate import Target
from vma.state import state

bp = Blueprint("replicate", __name__)

MAX_VMS = 256
MODES: tuple[JobMode, ...] = ("replicate", "export")
EXPORT_FIELDS = ("disks", "previous_change_ids", "export_timeout")
REPLICATE_FIELDS = ("targets", "vm_ids")
#: The OMA's (and discovery's) name of a disk: ``disk-<device key>``.
DISK_ID = re.compile(r"^disk-[0-9]{1,9}$")
MAX_CHANGE_ID = 256
MAX_EXPORT_TIMEOUT = 7 * 24 * 3600.0
#: The only targets a replication writes: NBD exports (never a path on the VMA).
NBD_SCHEMES = ("nbd://", "nbd+unix://")


def _change_id(where: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or "/" not in value or len(value) > MAX_CHANGE_ID):
        raise ApiError.invalid(
            f"{where} must be a change ID ('<CBT UUID>/<sequence>', as the snapshot's disk"
            f" reported it) or null"
        )
    return value


def _target(where: str, raw: Any) -> Target:
    if isinstance(raw, dict):
        unknown = set(raw) - {"uri", "base_change_id"}
        if unknown:
            raise ApiError.invalid(f"{where} has unknown fields {sorted(unknown)} (uri, base_change_id)")
        if "base_change_id" not in raw:
            raise ApiError.invalid(f"{where}.base_change_id is required (null: the target holds no pass)")
        uri = raw.get("uri")
        base = _change_id(f"{where}.base_change_id", raw["base_change_id"])
        given = True
    else:
        uri, base, given = raw, None, False
    if not isinstance(uri, str) or len(uri) > 2048:
        raise ApiError.invalid(f"{where} must be an NBD URI, or an object with uri and base_change_id")
    if not uri.startswith(NBD_SCHEMES):
        # A local path or another scheme would let a caller write anywhere the VMA can.
        raise ApiError(
            422, INVALID_REQUEST, f"{where} must be an NBD export (nbd:// or nbd+unix:// URI)"
        )
    return Target(uri, given, base)


def _targets(body: dict[str, Any], vm_paths: list[str]) -> dict[str, dict[str, Target]]:
    raw = body.get("targets")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.invalid("targets must be an object: vm_path -> disk -> NBD URI")
    out: dict[str, dict[str, Target]] = {}
    for vm_path, disks in raw.items():
        if vm_path not in vm_paths:
            raise ApiError.invalid(f"targets names {vm_path!r}, which is not in vm_paths")
        if not isinstance(disks, dict) or not disks:
            raise ApiError.invalid(f"targets[{vm_path!r}] must be an object: disk -> NBD URI")
        out[vm_path] = {str(k): _target(f"targets[{vm_path!r}][{k!r}]", v) for k, v in disks.items()}
    return out


def _vm_ids(body: dict[str, Any], vm_paths: list[str]) -> dict[str, str]:
    raw = body.get("vm_ids")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.invalid("vm_ids must be an object: vm_path -> managed object id (vm-143)")
    for vm_path, vm_id in raw.items():
        if vm_path not in vm_paths:
            raise ApiError.invalid(f"vm_ids names {vm_path!r}, which is not in vm_paths")
        if not isinstance(vm_id, str) or not vm_id or len(vm_id) > 256:
            raise ApiError.invalid(f"vm_ids[{vm_path!r}] must be a managed object id such as vm-143")
    return {str(k): str(v) for k, v in raw.items()}


def _mode(body: dict[str, Any]) -> JobMode:
    mode = body.get("mode")
    if mode is None:
        return "replicate"
    for known in MODES:
        if mode == known:
            return known
    raise ApiError.invalid("mode must be 'replicate' or 'export'")


def _disk_id(where: str, value: Any) -> str:
    if not isinstance(value, str) or not DISK_ID.match(value):
        raise ApiError.invalid(f"{where} must be a disk id such as 'disk-2000', not {value!r:.64}")
    return value


def _export_disks(body: dict[str, Any], vm_paths: list[str]) -> dict[str, list[str]]:
    raw = body.get("disks")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.invalid("disks must be an object: vm_path -> list of disk ids (disk-2000)")
    out: dict[str, list[str]] = {}
    for vm_path, ids in raw.items():
        if vm_path not in vm_paths:
            raise ApiError.invalid(f"disks names {vm_path!r}, which is not in vm_paths")
        if not isinstance(ids, list) or not ids:
            raise ApiError.invalid(f"disks[{vm_path!r}] must be a non-empty list of disk ids (disk-2000)")
        parsed = [_disk_id(f"disks[{vm_path!r}][{i}]", x) for i, x in enumerate(ids)]
        if len(set(parsed)) != len(parsed):
            raise ApiError.invalid(f"disks[{vm_path!r}] lists a disk twice")
        out[vm_path] = parsed
    return out


def _previous_change_ids(
    body: dict[str, Any], vm_paths: list[str], disks: dict[str, list[str]]
) -> dict[str, dict[str, str | None]]:
    raw = body.get("previous_change_ids")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.invalid(
            "previous_change_ids must be an object: vm_path -> disk id -> change ID or null"
        )
    out: dict[str, dict[str, str | None]] = {}
    for vm_path, per_disk in raw.items():
        if vm_path not in vm_paths:
            raise ApiError.invalid(f"previous_change_ids names {vm_path!r}, which is not in vm_paths")
        if not isinstance(per_disk, dict):
            raise ApiError.invalid(
                f"previous_change_ids[{vm_path!r}] must be an object: disk id -> change ID or null"
            )
        out[vm_path] = {}
        for disk_id, change_id in per_disk.items():
            _disk_id(f"a key of previous_change_ids[{vm_path!r}]", disk_id)
            if vm_path in disks and disk_id not in disks[vm_path]:
                raise ApiError.invalid(
                    f"previous_change_ids[{vm_path!r}] names {disk_id},"
                    f" which disks[{vm_path!r}] does not export"
                )
            out[vm_path][disk_id] = _change_id(f"previous_change_ids[{vm_path!r}][{disk_id!r}]", change_id)
    return out


def _export_timeout(body: dict[str, Any], default: float) -> float:
    raw = body.get("export_timeout")
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_EXPORT_TIMEOUT:
        raise ApiError.invalid(
            f"export_timeout must be a number of seconds, more than 0 and at most {MAX_EXPORT_TIMEOUT:.0f}"
        )
    return float(raw)


def _export_request(body: dict[str, Any], vm_paths: list[str], default_timeout: float) -> ExportRequest:
    for name in REPLICATE_FIELDS:
        if body.get(name) is not None:
            raise ApiError.invalid(
                f"{name} applies to mode 'replicate' only: an export job serves the disks for the OMA to read"
            )
    disks = _export_disks(body, vm_paths)
    return ExportRequest(
        disks=disks,
        previous_change_ids=_previous_change_ids(body, vm_paths, disks),
        timeout=_export_timeout(body, default_timeout),
    )


@bp.post("/replicate")
@document_request(ReplicateRequest)
async def replicate() -> tuple[dict[str, Any], int]:
    body = refuse_unknown_fields(await json_object(), ReplicateRequest)
    job_id = parse_job_id(body)
    login = vcenter_login(body)
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
    if "oma_url" in body:
        # The VMA reports to the OMA it is enrolled with (its configuration), never to a URL a
        # request names: that would hand its OMA credentials to whoever sent it.
        raise ApiError(
            422, INVALID_REQUEST, "oma_url is not a request field: the VMA reports to its configured OMA"
        )
    mode = _mode(body)
    st = state()
    c = st.config
    job = Job(
        job_id=job_id,
        vm_paths=list(vm_paths),
        login=login,
        oma_url=c.oma_url,
        work_dir=c.work_dir / job_id,
        mode=mode,
    )
    if mode == "export":
        export = _export_request(body, vm_paths, c.export_timeout)
        st.tracker.add(job)
        current_app.add_background_task(st.exporter.run_job, job, export)
    else:
        for name in EXPORT_FIELDS:
            if body.get(name) is not None:
                raise ApiError.invalid(f"{name} applies to mode 'export' only")
        targets = _targets(body, vm_paths)
        vm_ids = _vm_ids(body, vm_paths)
        if not targets and not (c.nbd_port and c.export_name and len(vm_paths) == 1):
            raise ApiError.invalid(
                "no target: give targets (vm_path -> disk -> NBD URI) or set nbd_port and export_name"
                " through PUT /api/v1/config for a single-disk VM"
            )
        st.tracker.add(job)
        current_app.add_background_task(st.replicator.run_job, job, targets, vm_ids)
    return {
        "job_id": job_id,
        "status": "started",
        "vm_count": len(vm_paths),
        "started_at": iso(job.created_at),
    }, 200
