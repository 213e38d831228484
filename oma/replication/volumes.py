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

**Backends.** Without a cloud (the embedded default) a volume generation is a file. When the app
hands the engine :class:`CloudVolumes` and the cloud is configured (CloudStack settings saved), a
new generation is a cloud data volume instead (``backend`` ``cloudstack``): its row is recorded
with the name it is created with (:func:`cloud_volume_name`) *before* it is created, then its
UUID, then its device on the OMA VM once attached (the path exported, and the row's ``path``). It
stays attached between passes; an incremental pass attaches it again only if it is not. A
generation of the other backend than the configured one is not written into: the next pass makes
a new generation (a full pass) where the configuration says, and the old one is removed. A cloud
generation a job made and did not complete is deleted in the cloud (:func:`undo_unfinished`).
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
from typing import Any, Protocol

import trio

from oma.config import OmaConfig
from oma.replication.jobs import ACTIVE, TERMINAL, JobError, load_job, lock_job
from pyapp.api import ApiError
from pyapp.db import Database
from pyapp.nbd_export import ExportError, NbdExport, free_tcp_port

log = logging.getLogger(__name__)

#: Ports tried for one export (another process may take the free port picked meanwhile).
EXPORT_ATTEMPTS = 3
#: The node id file in the volumes directory (see :func:`node_id`).
NODE_ID_FILE = ".oma-node-id"
FILE = "file"
CLOUDSTACK = "cloudstack"


class CloudVolumes(Protocol):
    """Replica volumes as a cloud's data volumes attached to the OMA's own VM: what the
    replication domain needs of the cloud, handed to it by the app (implemented over CloudStack by
    :class:`oma.cloudstack.volumes.ReplicaVolumes`). Every method but :meth:`configured` may raise
    :class:`~pyapp.api.ApiError` saying what went wrong."""

    async def configured(self) -> bool:
        """Whether new replica volumes are made in the cloud now (its settings are saved)."""
        ...

    async def create(self, name: str, size_bytes: int) -> str:
        """A new detached, zeroed volume named ``name`` of at least ``size_bytes``; its id."""
        ...

    async def find(self, name: str) -> str | None:
        """The id of the volume named ``name``, None when there is none."""
        ...

    async def size(self, volume_id: str) -> int | None:
        """The size of the volume in bytes, None when the cloud has no such volume."""
        ...

    async def attach(self, volume_id: str) -> Path:
        """The volume attached to the OMA VM (as it is if it already is) and its device there,
        once the device appeared."""
        ...

    async def delete(self, volume_id: str) -> bool:
        """Detach the volume from the OMA VM if it is attached there, then delete it; False when
        the cloud has no such volume."""
        ...


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
    #: Where the generation lives: a file (``volume``), or a cloud volume (``cloud_name``,
    #: ``cloud_id`` once created; ``volume`` is then its device once attached).
    backend: str = FILE
    cloud_name: str = ""
    cloud_id: str | None = None


def cloud_volume_name(volume_id: str, generation: int) -> str:
    """The name a cloud volume generation is created with (recorded before it is created)."""
    return f"oma-{volume_id}-g{generation}"


@dataclass(frozen=True)
class OldVolume:
    """A generation a new one replaced: its file or its cloud volume goes."""

    backend: str
    path: str
    cloud_id: str | None
    cloud_name: str | None


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
    db: Database,
    config: OmaConfig,
    writer: Writer,
    disks: list[dict[str, Any]],
    cloud: CloudVolumes | None = None,
) -> list[DiskTarget] | None:
    """Decide and record each disk's volume (one transaction, before any file or cloud volume is
    touched): the job's targets, or None when the job ended meanwhile. New generations are cloud
    volumes when ``cloud`` is given and configured, else files (module doc)."""
    backend = CLOUDSTACK if cloud is not None and await cloud.configured() else FILE
    current = {
        r["disk_id"]: dict(r)
        for r in await db.fetch(
            "SELECT id, disk_id, path, backend, cloudstack_volume_id FROM replica_volumes"
            " WHERE vcenter_host = $1 AND vm_id = $2 AND disk_id = ANY($3::text[])",
            disks[0]["vcenter_host"] if disks else "",
            disks[0]["vm_id"] if disks else "",
            [d["disk_id"] for d in disks],
        )
    }
    # Whether each existing volume can take an incremental pass, looked at before the transaction.
    unusable: dict[str, str | None] = {}
    for d in disks:
        vol = current.get(d["disk_id"])
        if vol is None or vol["backend"] != backend:
            continue
        if backend == FILE:
            unusable[d["disk_id"]] = await trio.to_thread.run_sync(
                volume_usable, Path(vol["path"]), d["capacity_bytes"]
            )
        elif cloud is not None and vol["cloudstack_volume_id"]:
            unusable[d["disk_id"]] = cloud_volume_usable(
                vol["cloudstack_volume_id"],
                await cloud.size(vol["cloudstack_volume_id"]),
                d["capacity_bytes"],
            )
    superseded: list[OldVolume] = []
    targets: list[DiskTarget] = []  # the job's only once the transaction committed
    with trio.CancelScope(shield=True):  # a transaction cut in the middle would keep rows locked
        async with db.transaction() as conn:
            state = (await lock_job(conn, writer.job_id))["status"]
            if state in TERMINAL:
                return None
            for d in disks:
                target, old = await _volume_for(conn, config, writer, d, unusable, backend)
                targets.append(target)
                if old is not None:
                    superseded.append(old)
                await conn.execute(
                    "UPDATE replication_job_disks SET volume_id = $3, volume_generation = $4,"
                    " base_change_id = $5, volume_path = $6, cloudstack_volume_id = $7"
                    " WHERE job_id = $1 AND disk_id = $2",
                    writer.job_id,
                    target.disk_id,
                    target.volume_id,
                    target.generation,
                    target.base,
                    str(target.volume) if target.backend == FILE else None,
                    target.cloud_id,
                )
    for old in superseded:
        await remove_old(old, cloud)
    return targets


def cloud_volume_usable(cloud_id: str, size: int | None, capacity: int) -> str | None:
    """Why cloud volume ``cloud_id`` of ``size`` bytes (None: gone) cannot take an incremental pass
    of a disk of ``capacity`` bytes (None: it can)."""
    if size is None:
        return f"CloudStack volume {cloud_id} is gone"
    if size < capacity:
        return f"CloudStack volume {cloud_id} ({size} bytes) is smaller than the disk ({capacity} bytes)"
    return None


async def remove_old(old: OldVolume, cloud: CloudVolumes | None) -> None:
    """Remove a replaced generation: its file, or its cloud volume (a failure is logged: the
    volume is named so that an operator can remove it)."""
    if old.backend == FILE:
        if old.path:
            await trio.to_thread.run_sync(partial(Path(old.path).unlink, missing_ok=True))
        return
    if cloud is None:
        log.error(
            "replaced CloudStack volume %s stays: CloudStack is not wired", old.cloud_id or old.cloud_name
        )
        return
    try:
        cloud_id = old.cloud_id or (await cloud.find(old.cloud_name) if old.cloud_name else None)
        if cloud_id is not None and await cloud.delete(cloud_id):
            log.info("replaced CloudStack volume deleted", extra={"cloudstack_volume_id": cloud_id})
    except ApiError as e:
        log.error(
            "replaced CloudStack volume %s could not be deleted: %s",
            old.cloud_id or old.cloud_name,
            e.message,
        )


async def _volume_for(
    conn: Any,
    config: OmaConfig,
    writer: Writer,
    disk: dict[str, Any],
    unusable: dict[str, str | None],
    backend: str,
) -> tuple[DiskTarget, OldVolume | None]:
    """The volume of one disk: the base's volume when it is still usable, else a new volume
    generation of ``backend`` (recorded ``creating``). Returns the target and the replaced
    generation to remove."""
    disk_id, capacity, base = disk["disk_id"], disk["capacity_bytes"], disk["base_change_id"]
    vol = await conn.fetchrow(
        "SELECT id, path, generation, state, node_id, backend, cloudstack_volume_id, cloudstack_volume_name"
        " FROM replica_volumes WHERE vcenter_host = $1 AND vm_id = $2 AND disk_id = $3 FOR UPDATE",
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
    elif vol["backend"] != backend:
        why_new = f"the volume is a {vol['backend']} volume and new volumes are {backend} volumes now"
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
        target.backend, target.cloud_id = vol["backend"], vol["cloudstack_volume_id"]
        target.cloud_name = vol["cloudstack_volume_name"] or ""
        return target, None
    if base is not None:
        log.warning(
            "%s: full pass into a new volume generation instead of an incremental pass: %s",
            disk_id,
            why_new,
        )
    volume_id = vol["id"] if vol is not None else f"vol-{uuid.uuid4().hex}"
    generation = vol["generation"] + 1 if vol is not None else 1
    path = (
        volume_path(config, disk["vcenter_host"], disk["vm_id"], disk_id, volume_id)
        if backend == FILE
        else None
    )
    cloud_name = cloud_volume_name(volume_id, generation) if backend == CLOUDSTACK else None
    if vol is None:
        await conn.execute(
            "INSERT INTO replica_volumes (id, vcenter_host, vm_id, disk_id, vm_name, vm_path, size_bytes,"
            " job_id, node_id, path, generation, state, backend, cloudstack_volume_name)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, 'creating', $11, $12)",
            volume_id,
            disk["vcenter_host"],
            disk["vm_id"],
            disk_id,
            *display,
            str(path or ""),
            backend,
            cloud_name,
        )
    else:
        await conn.execute(
            "UPDATE replica_volumes SET vm_name = $2, vm_path = $3, size_bytes = $4, job_id"
            " = $5, node_id = $6, path = $7, generation = $8, state = 'creating', error_message = NULL,"
            " backend = $9, cloudstack_volume_name = $10, cloudstack_volume_id = NULL, device_path = NULL,"
            " updated_at = now() WHERE id = $1",
            vol["id"],
            *display,
            str(path or ""),
            generation,
            backend,
            cloud_name,
        )
    target = DiskTarget(disk_id, capacity, path or Path(), volume_id, generation, True, None)
    target.backend, target.cloud_name = backend, cloud_name or ""
    old: OldVolume | None = None
    if vol is not None and vol["backend"] == CLOUDSTACK:
        if vol["cloudstack_volume_id"] or vol["cloudstack_volume_name"]:
            old = OldVolume(
                CLOUDSTACK, vol["path"], vol["cloudstack_volume_id"], vol["cloudstack_volume_name"]
            )
    elif (
        vol is not None
        and vol["path"]
        and vol["path"] != str(path)
        and not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM replica_volumes WHERE path = $1)", vol["path"]
        )
    ):
        old = OldVolume(FILE, vol["path"], None, None)  # a pre-006 file, or a file replaced by a cloud volume
    return target, old


async def record_cloud_volume(db: Database, job_id: str, target: DiskTarget, device: Path | None) -> None:
    """Record what a cloud target became: its id once created, its device once attached (the
    volume row and the job's disk, in one transaction)."""
    with trio.CancelScope(shield=True):
        async with db.transaction() as conn:
            await conn.execute(
                "UPDATE replica_volumes SET cloudstack_volume_id = $3, device_path = $4,"
                " path = COALESCE($4, path), updated_at = now() WHERE id = $1 AND generation = $2",
                target.volume_id,
                target.generation,
                target.cloud_id,
                str(device) if device is not None else None,
            )
            await conn.execute(
                "UPDATE replication_job_disks SET cloudstack_volume_id = $3, volume_path = $4"
                " WHERE job_id = $1 AND disk_id = $2",
                job_id,
                target.disk_id,
                target.cloud_id,
                str(device) if device is not None else None,
            )


async def make_cloud_volume(db: Database, cloud: CloudVolumes, job_id: str, target: DiskTarget) -> None:
    """Create (a fresh generation) and attach a cloud target; ``target.volume`` becomes its device.
    A create that failed is looked for by name and deleted (a failed job may leave the volume it
    allocated); what was made stays recorded for :func:`undo_unfinished`."""
    if target.fresh and target.cloud_id is None:
        try:
            target.cloud_id = await cloud.create(target.cloud_name, target.capacity)
        except ApiError:
            with trio.CancelScope(shield=True):
                await _delete_named(cloud, target.cloud_name)
            raise
        await record_cloud_volume(db, job_id, target, None)
    if target.cloud_id is None:
        raise JobError(
            f"the CloudStack volume of {target.disk_id} was never created: run an initial replication"
        )
    target.volume = await cloud.attach(target.cloud_id)
    await record_cloud_volume(db, job_id, target, target.volume)


async def _delete_named(cloud: CloudVolumes, name: str) -> None:
    try:
        found = await cloud.find(name)
        if found is not None and await cloud.delete(found):
            log.warning(
                "CloudStack volume %s of a failed create deleted",
                found,
                extra={"cloudstack_volume_id": found},
            )
    except ApiError as e:
        log.error("the CloudStack volume named %s may remain: %s", name, e.message)


async def undo_unfinished(db: Database, cloud: CloudVolumes | None, job_id: str, reason: str) -> None:
    """The cloud volume generations job ``job_id`` made and did not complete (still ``creating``)
    are deleted in the cloud (by id, else by the name they were created with) and their rows
    marked ``failed``: no half-made volume stays. A volume that cannot be deleted now keeps its
    id in the row; the next pass of the disk deletes it (:func:`remove_old`)."""
    rows = await db.fetch(
        "SELECT id, generation, cloudstack_volume_id, cloudstack_volume_name FROM replica_volumes"
        " WHERE job_id = $1 AND state = 'creating' AND backend = 'cloudstack'",
        job_id,
    )
    for row in rows:
        cloud_id, deleted = row["cloudstack_volume_id"], False
        if cloud is not None:
            try:
                cloud_id = cloud_id or await cloud.find(row["cloudstack_volume_name"] or "")
                if cloud_id is not None:
                    await cloud.delete(cloud_id)
                deleted = True
            except ApiError as e:
                log.error(
                    "unfinished CloudStack volume %s stays: %s",
                    cloud_id or row["cloudstack_volume_name"],
                    e.message,
                )
        note = f"; CloudStack volume {cloud_id} deleted" if deleted and cloud_id else ""
        await db.execute(
            "UPDATE replica_volumes SET state = 'failed', error_message = $3,"
            " cloudstack_volume_id = CASE WHEN $4 THEN NULL ELSE cloudstack_volume_id END,"
            " cloudstack_volume_name = CASE WHEN $4 THEN NULL ELSE cloudstack_volume_name END,"
            " device_path = CASE WHEN $4 THEN NULL ELSE device_path END,"
            " path = CASE WHEN $4 THEN '' ELSE path END, updated_at = now()"
            " WHERE id = $1 AND generation = $2 AND state = 'creating'",
            row["id"],
            row["generation"],
            f"job {job_id}: {reason}{note}"[:4000],
            deleted,
        )
        if deleted:
            log.warning(
                "unfinished CloudStack volume deleted",
                extra={"volume_id": row["id"], "cloudstack_volume_id": cloud_id},
            )


async def delete_job_volumes(db: Database, cloud: CloudVolumes | None, job_id: str) -> list[dict[str, Any]]:
    """Delete the volumes job ``job_id`` wrote into (its disks' volumes, any generation): a cloud
    volume is detached from the OMA VM and deleted in the cloud, a file removed, the row deleted
    (its change IDs stay, without a volume: the next pass of the disk is a full one). Refused
    (409) while the job or another active job uses one of them. Returns what was deleted."""
    job = await load_job(db, job_id)
    if job["status"] in ACTIVE:
        raise ApiError.conflict(f"job {job_id} is {job['status']}; cancel it first (PUT status=cancelled)")
    volumes = await db.fetch(
        "SELECT v.id, v.backend, v.path, v.cloudstack_volume_id, v.cloudstack_volume_name,"
        " (SELECT a.job_id FROM replication_job_disks a WHERE a.volume_id = v.id AND a.active LIMIT 1)"
        " AS busy FROM replica_volumes v"
        " WHERE v.id IN (SELECT volume_id FROM replication_job_disks WHERE job_id = $1)"
        " ORDER BY v.disk_id",
        job_id,
    )
    busy = [(v["id"], v["busy"]) for v in volumes if v["busy"]]
    if busy:
        raise ApiError.conflict(f"volumes in use by active jobs: {busy}")
    deleted: list[dict[str, Any]] = []
    for v in volumes:
        if v["backend"] == CLOUDSTACK:
            cloud_id = v["cloudstack_volume_id"]
            if cloud_id or v["cloudstack_volume_name"]:
                if cloud is None or not await cloud.configured():
                    raise ApiError.conflict(
                        f"volume {v['id']} is CloudStack volume {cloud_id}: configure CloudStack to delete it"
                    )
                cloud_id = cloud_id or await cloud.find(v["cloudstack_volume_name"])
                if cloud_id is not None:
                    await cloud.delete(cloud_id)
        elif v["path"]:
            await trio.to_thread.run_sync(partial(Path(v["path"]).unlink, missing_ok=True))
        await db.execute("DELETE FROM replica_volumes WHERE id = $1", v["id"])
        deleted.append(
            {"volume_id": v["id"], "backend": v["backend"], "cloudstack_volume_id": v["cloudstack_volume_id"]}
        )
        log.info("replica volume deleted", extra={"volume_id": v["id"], "backend": v["backend"]})
    return deleted


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
