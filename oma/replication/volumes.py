"""Replica volumes: the files replication writes into, their rows, and their exports.

One persistent sparse raw file per VM disk, keyed by the VM's identity (vCenter, managed object
id, disk id; :func:`volume_path`), recorded in ``replica_volumes``. A new volume, or a volume made
anew, gets a new *generation*, recorded (state ``creating``, with its path and node) *before* its
file is made (:func:`prepare_volume`: temporary name, fsync, rename), so a crash leaves a record.
A disk whose job carries a base (``base_change_id``) writes into the volume that received that
base, if it is still that generation on this node; when its file is gone (or larger than the
disk) the job fails and says to run an initial replication. Any other disk (an ``initial`` job, a
base of no volume, a volume of another generation or a failed one) gets a new generation and a
full pass: a base is never applied to a volume that did not receive it
(:func:`allocate_volumes`). States: ``creating`` (recorded; its first pass running), ``ready``
(holds a complete pass: it received a change ID of its generation,
:mod:`oma.replication.change_ids`), ``failed`` (:func:`mark_unfinished`).

A volume lives on one node (:func:`node_id`: the id stored in the volumes directory, so every OMA
process that sees the same volumes directory is the same node). Each volume is served to the VMA
by ``qemu-nbd --shared=8`` on a free loopback port (:func:`start_export`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from oma.config import OmaConfig
from oma.replication.jobs import TERMINAL, JobError, lock_job
from pyapp.db import Database
from pyapp.nbd_export import ExportError, NbdExport, free_tcp_port

log = logging.getLogger(__name__)

#: Ports tried for one export (another process may take the free port picked meanwhile).
EXPORT_ATTEMPTS = 3
#: The node id file in the volumes directory (see :func:`node_id`).
NODE_ID_FILE = ".oma-node-id"


@dataclass
class DiskTarget:
    disk_id: str
    capacity: int
    volume: Path
    volume_id: str = ""
    generation: int = 0
    #: A new volume generation (a new zeroed file, a full pass); else the volume of the base.
    fresh: bool = False
    #: The change ID the pass builds on; None: a full pass.
    base: str | None = None
    export: NbdExport | None = None
    uri: str = ""


def safe_name(name: str) -> str:
    """A file name for a VM or disk name: anything but ``[A-Za-z0-9._-]`` becomes ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "_"


def volume_path(config: OmaConfig, vcenter: str, vm_id: str, disk_id: str, volume_id: str) -> Path:
    """``<volumes>/<vcenter>/<vm id>/<disk>-<volume id>.raw``: from the VM's identity, never its
    name; the volume id makes it unique whatever :func:`safe_name` folds together."""
    return (
        config.volumes_dir
        / safe_name(vcenter or "vcenter")
        / safe_name(vm_id)
        / f"{safe_name(disk_id)}-{volume_id}.raw"
    )


def node_id(volumes_dir: Path) -> str:
    """This node's id: the one stored in ``volumes_dir`` (made once, atomically). Every OMA
    process that sees the same volumes directory is the same node. Blocking: run it in a thread."""
    volumes_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    path = volumes_dir / NODE_ID_FILE
    if not path.exists():
        tmp = path.with_name(f"{NODE_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex}")
        tmp.write_text(f"node-{uuid.uuid4().hex}\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: then keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text().strip()
    if not value:
        raise JobError(f"{path} is empty: remove it so that the OMA makes a new node id")
    return value


def volume_usable(path: Path, capacity: int) -> str | None:
    """Why the existing volume file at ``path`` cannot take an incremental pass of a disk of
    ``capacity`` bytes (None: it can). Blocking: run it in a thread."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"volume file {path} is missing"
    if size > capacity:
        return f"volume file {path} ({size} bytes) is larger than the disk ({capacity} bytes)"
    return None


def prepare_volume(path: Path, capacity: int, *, fresh: bool) -> None:
    """A zeroed sparse volume of ``capacity`` bytes (``fresh``), else the existing one, grown to
    ``capacity`` if the disk grew. Blocking: run it in a thread."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if fresh:
        tmp = path.with_name(f"{path.name}.new")
        with tmp.open("wb") as f:
            f.truncate(capacity)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise JobError(f"target volume {path} is missing") from None
    if size > capacity:
        raise JobError(f"target volume {path} ({size} bytes) is larger than the disk ({capacity} bytes)")
    if size < capacity:
        with path.open("r+b") as f:
            f.truncate(capacity)
            os.fsync(f.fileno())


def start_export(
    target: DiskTarget, export_name: str, record_dir: Path | None = None, ports: tuple[int, ...] = ()
) -> NbdExport:
    """``qemu-nbd`` on a free loopback port (one of ``ports`` when given: the tunnel forwards
    those); another port if the one picked was taken meanwhile. ``record_dir``: where the export is
    recorded before it starts (see :mod:`pyapp.nbd_export`)."""
    error: ExportError | None = None
    for _ in range(EXPORT_ATTEMPTS):
        export = NbdExport(
            target.volume, name=export_name, port=_pick_port(ports), shared=8, record_dir=record_dir
        )
        try:
            return export.start()
        except ExportError as e:
            error = e
    raise JobError(f"cannot export {target.volume}: {error}")


def _pick_port(ports: tuple[int, ...]) -> int:
    if not ports:
        return free_tcp_port()
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise JobError(f"every NBD export port ({ports[0]}-{ports[-1]}, OMA_NBD_PORTS) is in use")


@dataclass(frozen=True)
class Writer:
    """The job about to write into volumes, as their rows show it, and the node it runs on."""

    job_id: str
    vm_name: str
    vm_path: str
    node: str


async def allocate_volumes(
    db: Database, config: OmaConfig, writer: Writer, disks: list[dict[str, Any]]
) -> list[DiskTarget] | None:
    """Decide and record each disk's volume (one transaction, before any file is touched): the
    job's targets, or None when the job ended meanwhile."""
    current = {
        r["disk_id"]: dict(r)
        for r in await db.fetch(
            "SELECT id, disk_id, path FROM replica_volumes WHERE vcenter_host = $1 AND vm_id = $2"
            " AND disk_id = ANY($3::text[])",
            disks[0]["vcenter_host"] if disks else "",
            disks[0]["vm_id"] if disks else "",
            [d["disk_id"] for d in disks],
        )
    }
    # Whether each existing file can take an incremental pass, looked at before the transaction.
    unusable = {
        d["disk_id"]: await trio.to_thread.run_sync(
            volume_usable, Path(current[d["disk_id"]]["path"]), d["capacity_bytes"]
        )
        for d in disks
        if d["disk_id"] in current
    }
    superseded: list[Path] = []
    targets: list[DiskTarget] = []  # the job's only once the transaction committed
    with trio.CancelScope(shield=True):  # a transaction cut in the middle would keep rows locked
        async with db.transaction() as conn:
            state = (await lock_job(conn, writer.job_id))["status"]
            if state in TERMINAL:
                return None
            for d in disks:
                target, old_path = await _volume_for(conn, config, writer, d, unusable)
                targets.append(target)
                if old_path is not None:
                    superseded.append(old_path)
                await conn.execute(
                    "UPDATE replication_job_disks SET volume_id = $3, volume_generation = $4,"
                    " base_change_id = $5, volume_path = $6 WHERE job_id = $1 AND disk_id = $2",
                    writer.job_id,
                    target.disk_id,
                    target.volume_id,
                    target.generation,
                    target.base,
                    str(target.volume),
                )
    for old in superseded:  # a pre-006 file that no volume row names any more
        await trio.to_thread.run_sync(partial(old.unlink, missing_ok=True))
    return targets


async def _volume_for(
    conn: Any,
    config: OmaConfig,
    writer: Writer,
    disk: dict[str, Any],
    unusable: dict[str, str | None],
) -> tuple[DiskTarget, Path | None]:
    """The volume of one disk: the base's volume when it is still usable, else a new volume
    generation (recorded ``creating``). Returns the target and a superseded file to remove."""
    disk_id, capacity, base = disk["disk_id"], disk["capacity_bytes"], disk["base_change_id"]
    vol = await conn.fetchrow(
        "SELECT id, path, generation, state, node_id FROM replica_volumes"
        " WHERE vcenter_host = $1 AND vm_id = $2 AND disk_id = $3 FOR UPDATE",
        disk["vcenter_host"],
        disk["vm_id"],
        disk_id,
    )
    node = writer.node
    if vol is not None and vol["node_id"] is not None and vol["node_id"] != node:
        raise JobError(
            f"the volume of {disk_id} ({vol['path']}) is on OMA node {vol['node_id']}, not on this one"
            f" ({node}): the job must run there"
        )
    display = (writer.vm_name, writer.vm_path, capacity, writer.job_id, node)
    why_new: str | None = None
    if base is None:
        why_new = "a full pass (initial replication, or no complete earlier pass)"
    elif vol is None:
        why_new = "the volume of the base is gone"
    elif vol["id"] != disk["volume_id"] or vol["generation"] != disk["volume_generation"]:
        why_new = "the volume was made anew since the job was created"
    elif vol["state"] != "ready":
        why_new = f"the volume is {vol['state']}"
    elif unusable.get(disk_id):
        # A volume that vanished (or no longer fits) is an incident for an operator to look at
        # (a volumes directory not mounted, a file removed), not something to paper over with
        # a silent full copy: the job fails and says what to do.
        raise JobError(
            f"{unusable[disk_id]}: an incremental pass needs the volume that holds its base"
            f' ({base}); run an initial replication (replication_type "initial") to make a new'
            " volume with a full pass"
        )
    if why_new is None:
        assert vol is not None
        await conn.execute(
            "UPDATE replica_volumes SET vm_name = $2, vm_path = $3, size_bytes ="
            " greatest(size_bytes, $4),"
            " job_id = $5, node_id = $6, updated_at = now() WHERE id = $1",
            vol["id"],
            *display,
        )
        target = DiskTarget(disk_id, capacity, Path(vol["path"]), vol["id"], vol["generation"], False, base)
        return target, None
    if base is not None:
        log.warning(
            "%s: full pass into a new volume generation instead of an incremental pass: %s",
            disk_id,
            why_new,
        )
    if vol is None:
        volume_id = f"vol-{uuid.uuid4().hex}"
        path = volume_path(config, disk["vcenter_host"], disk["vm_id"], disk_id, volume_id)
        await conn.execute(
            "INSERT INTO replica_volumes (id, vcenter_host, vm_id, disk_id, vm_name, vm_path, size_bytes,"
            " job_id, node_id, path, generation, state)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, 'creating')",
            volume_id,
            disk["vcenter_host"],
            disk["vm_id"],
            disk_id,
            *display,
            str(path),
        )
        return DiskTarget(disk_id, capacity, path, volume_id, 1, True, None), None
    path = volume_path(config, disk["vcenter_host"], disk["vm_id"], disk_id, vol["id"])
    generation = await conn.fetchval(
        "UPDATE replica_volumes SET vm_name = $2, vm_path = $3, size_bytes = $4, job_id"
        " = $5, node_id = $6,"
        " path = $7, generation = generation + 1, state = 'creating', error_message = NULL,"
        " updated_at = now() WHERE id = $1 RETURNING generation",
        vol["id"],
        *display,
        str(path),
    )
    old: Path | None = None
    if vol["path"] != str(path) and not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM replica_volumes WHERE path = $1)", vol["path"]
    ):
        old = Path(vol["path"])
    return DiskTarget(disk_id, capacity, path, vol["id"], generation, True, None), old


async def mark_unfinished(db: Database, job_id: str, targets: list[DiskTarget], reason: str) -> None:
    """The volume generations among ``targets`` that job ``job_id`` made and did not complete (no
    change ID stored: still ``creating``) are marked ``failed`` with the reason; their files stay
    where the rows say, and the next pass makes a new generation."""
    fresh = [t for t in targets if t.fresh]
    if not fresh:
        return
    with trio.CancelScope(shield=True):
        marked = await db.fetch(
            "UPDATE replica_volumes v SET state = 'failed', error_message = $3, updated_at ="
            " now()"
            " FROM unnest($1::text[], $2::int[]) AS u(id, generation)"
            " WHERE v.id = u.id AND v.generation = u.generation AND v.state = 'creating'"
            " RETURNING v.path",
            [t.volume_id for t in fresh],
            [t.generation for t in fresh],
            f"job {job_id}: {reason}"[:4000],
        )
    if marked:
        log.warning("volumes left incomplete, marked failed", extra={"volumes": [r["path"] for r in marked]})
