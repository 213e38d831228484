"""Replica volumes as CloudStack data volumes on the OMA VM.

A replica disk is a CloudStack DATADISK volume, created with the configured disk offering and the
source disk's size, attached to the OMA VM. The OMA's guest kernel names it by id:
``<device root>/disk/by-id/virtio-<first 20 hex digits of the volume UUID without dashes>`` (KVM
passes the volume's UUID as the virtio serial, which the guest truncates to 20 characters); the
device root is ``/dev`` in production (``OMA_DEVICE_ROOT``).

**One attach or detach at a time on the OMA VM.** CloudStack runs the volume jobs of one VM one
after the other anyway, but the guest sees hot-plugged disks in the order they come: one
operation at a time — the job and the device's arrival or departure — keeps every device where
its volume's id says. :class:`OmaVmLock` serialises them: a trio lock among the tasks of this
process, then a PostgreSQL advisory lock (transaction-scoped, keyed by the VM's id) among the
OMA processes sharing the database.

Operations are idempotent where a restart needs them to be: attaching a volume already attached
to the OMA VM only waits for its device, detaching a detached volume does nothing. An attach
whose device does not appear within the deadline detaches the volume again before it fails
(504 ``DEVICE_TIMEOUT``), so no volume is left attached without a device; deleting the volume is
the caller's decision.

:class:`ReplicaVolumes` is what the replication domain gets of all this (its
``oma.replication.volumes.CloudVolumes``, handed over by the app): each call uses the active
settings (their zone, disk offering and OMA VM) and this process's :class:`OmaVmLock`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from oma.cloudstack.client import PARAM_ERROR, CloudStackClient, CloudStackError
from oma.cloudstack.resources import disk_offering_view, volume_view
from oma.cloudstack.settings import CLOUDSTACK_NOT_CONFIGURED, active_client
from oma.config import OmaConfig
from oma.crypto import SecretBox
from pyapp.api import CONFLICT, NOT_FOUND, ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)

GIB = 1024**3
DEVICE_TIMEOUT = "DEVICE_TIMEOUT"
DEVICE_POLL_S = 0.05
#: The namespace of the OMA VM's advisory lock keys ("oma_vol" + the VM id's digest).
_LOCK_PREFIX = b"oma-cloudstack-volume-ops:"


def device_path(device_root: Path, volume_id: str) -> Path:
    """Where the OMA's guest sees volume ``volume_id`` once attached."""
    return device_root / "disk" / "by-id" / f"virtio-{volume_id.replace('-', '')[:20]}"


def size_gib(size_bytes: int) -> int:
    """The whole GiB (CloudStack's unit for a volume's size) that hold ``size_bytes``."""
    if size_bytes <= 0:
        raise ValueError(f"a volume size must be positive, not {size_bytes}")
    return math.ceil(size_bytes / GIB)


def lock_key(vm_id: str) -> int:
    """The 64-bit advisory lock key of the OMA VM ``vm_id`` (signed, as PostgreSQL takes it)."""
    digest = hashlib.sha256(_LOCK_PREFIX + vm_id.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    type: str
    state: str
    size_bytes: int | None
    zone_id: str
    disk_offering_id: str | None
    virtual_machine_id: str | None
    device_id: int | None

    @classmethod
    def from_cloudstack(cls, item: dict[str, Any]) -> Volume:
        return cls(**volume_view(item))


@dataclass(frozen=True)
class AttachedVolume:
    volume: Volume
    device: Path


class OmaVmLock:
    """One volume operation at a time on an OMA VM, across tasks and OMA processes. Make one per
    process (its trio locks are the process's) and share it among the callers."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._locks: dict[str, trio.Lock] = {}

    @asynccontextmanager
    async def hold(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(vm_id.lower(), trio.Lock())
        async with lock, self._db.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(vm_id))
            yield


class OmaVmVolumes:
    """Volume operations for replicas on the OMA VM ``vm_id``."""

    def __init__(
        self,
        client: CloudStackClient,
        lock: OmaVmLock,
        *,
        vm_id: str,
        device_root: Path,
        device_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.lock = lock
        self.vm_id = vm_id.lower()
        self.device_root = device_root
        self.device_timeout = device_timeout

    @classmethod
    def from_config(
        cls, client: CloudStackClient, lock: OmaVmLock, vm_id: str, config: OmaConfig
    ) -> OmaVmVolumes:
        return cls(
            client,
            lock,
            vm_id=vm_id,
            device_root=config.device_root,
            device_timeout=config.device_wait_timeout,
        )

    def device(self, volume_id: str) -> Path:
        return device_path(self.device_root, volume_id)

    async def get(self, volume_id: str) -> Volume:
        """The volume as CloudStack has it now (404 when it has none of that id)."""
        try:
            items = await self.client.list("listVolumes", id=volume_id, listall=True)
        except CloudStackError as exc:
            if exc.errorcode != PARAM_ERROR:
                raise
            items = []
        for item in items:
            if str(item.get("id", "")).lower() == volume_id.lower():
                return Volume.from_cloudstack(item)
        raise ApiError.not_found(f"CloudStack has no volume {volume_id}", NOT_FOUND)

    async def attached(self) -> list[Volume]:
        """The data volumes attached to the OMA VM, by device id."""
        items = await self.client.list(
            "listVolumes", virtualmachineid=self.vm_id, type="DATADISK", listall=True
        )
        return sorted((Volume.from_cloudstack(i) for i in items), key=lambda v: (v.device_id or 0, v.id))

    async def create(self, *, name: str, size_bytes: int, disk_offering_id: str, zone_id: str) -> Volume:
        """A new data volume of at least ``size_bytes`` (whole GiB), detached. A custom-size
        offering gets the size; a fixed-size one is used as it is when it is large enough (422
        otherwise). ``name`` is for display: a ``~`` in it (which CloudStack would refuse, see
        :mod:`.client`) becomes ``-``."""
        gib = size_gib(size_bytes)
        name = name.replace("~", "-")
        offerings = await self.client.list("listDiskOfferings", id=disk_offering_id)
        found = next((o for o in offerings if str(o.get("id", "")).lower() == disk_offering_id.lower()), None)
        if found is None:
            raise ApiError.unprocessable(f"CloudStack has no disk offering {disk_offering_id}")
        offering = disk_offering_view(found)
        params: dict[str, Any] = {"name": name, "zoneid": zone_id, "diskofferingid": disk_offering_id}
        if offering["is_customized"]:
            params["size"] = gib
        elif (offering["disk_size_gb"] or 0) < gib:
            raise ApiError.unprocessable(
                f"disk offering {offering['name']} makes {offering['disk_size_gb']} GiB volumes;"
                f" this disk needs {gib} GiB: choose a custom-size offering"
            )
        result = await self.client.job("createVolume", **params)
        volume = Volume.from_cloudstack(result.get("volume") or {})
        log.info(
            "CloudStack volume created",
            extra={"action": "cloudstack_volume_create", "volume_id": volume.id, "size_gib": gib},
        )
        return volume

    async def attach(self, volume_id: str) -> AttachedVolume:
        """Attach the volume to the OMA VM and wait for its device (module doc)."""
        async with self.lock.hold(self.vm_id):
            volume = await self.get(volume_id)
            if volume.virtual_machine_id is not None and volume.virtual_machine_id.lower() != self.vm_id:
                raise ApiError(
                    409,
                    CONFLICT,
                    f"CloudStack volume {volume_id} is attached to another VM ({volume.virtual_machine_id})",
                )
            if volume.virtual_machine_id is None:
                result = await self.client.job("attachVolume", id=volume_id, virtualmachineid=self.vm_id)
                volume = Volume.from_cloudstack(result.get("volume") or {})
                log.info(
                    "CloudStack volume attached to the OMA VM",
                    extra={
                        "action": "cloudstack_volume_attach",
                        "volume_id": volume_id,
                        "device_id": volume.device_id,
                    },
                )
            device = self.device(volume_id)
            if not await self._wait(device, present=True):
                await self._detach_after_missing_device(volume_id)
                raise ApiError(
                    504,
                    DEVICE_TIMEOUT,
                    f"CloudStack attached volume {volume_id} to the OMA VM but {device} did not appear within"
                    f" {self.device_timeout:g} s; the volume was detached again",
                    {"volume_id": volume_id, "device": str(device)},
                )
            return AttachedVolume(volume, device)

    async def detach(self, volume_id: str) -> Volume:
        """Detach the volume from the OMA VM (nothing to do when it is detached); waits for its
        device to go (a device that stays is logged, not failed: the volume is detached)."""
        async with self.lock.hold(self.vm_id):
            volume = await self.get(volume_id)
            if volume.virtual_machine_id is None:
                return volume
            if volume.virtual_machine_id.lower() != self.vm_id:
                raise ApiError(
                    409,
                    CONFLICT,
                    f"CloudStack volume {volume_id} is attached to another VM ({volume.virtual_machine_id})",
                )
            result = await self.client.job("detachVolume", id=volume_id)
            volume = Volume.from_cloudstack(result.get("volume") or {})
            device = self.device(volume_id)
            if not await self._wait(device, present=False):
                log.warning(
                    "device %s of detached CloudStack volume %s is still there",
                    device,
                    volume_id,
                    extra={"action": "cloudstack_volume_detach", "volume_id": volume_id},
                )
            log.info(
                "CloudStack volume detached from the OMA VM",
                extra={"action": "cloudstack_volume_detach", "volume_id": volume_id},
            )
            return volume

    async def delete(self, volume_id: str) -> None:
        """Delete a detached volume (an attached one: 409, detach it first)."""
        volume = await self.get(volume_id)
        if volume.virtual_machine_id is not None:
            raise ApiError.conflict(
                f"CloudStack volume {volume_id} is attached to VM {volume.virtual_machine_id}:"
                " detach it first"
            )
        await self.client.job("deleteVolume", id=volume_id)
        log.info(
            "CloudStack volume deleted", extra={"action": "cloudstack_volume_delete", "volume_id": volume_id}
        )

    async def _wait(self, device: Path, *, present: bool) -> bool:
        """Wait until ``device`` exists (``present``) or is gone; False at the deadline."""
        path = trio.Path(device)
        with trio.move_on_after(self.device_timeout):
            while await path.exists() != present:  # noqa: ASYNC110 - nothing to wait on but the file
                await trio.sleep(DEVICE_POLL_S)
            return True
        return False

    async def _detach_after_missing_device(self, volume_id: str) -> None:
        """Undo an attach whose device never came (shielded: a cancelled caller still undoes it)."""
        with trio.CancelScope(shield=True):
            try:
                await self.client.job("detachVolume", id=volume_id)
            except ApiError as exc:
                log.error(
                    "volume %s stays attached to the OMA VM without a device: %s",
                    volume_id,
                    exc.message,
                    extra={"action": "cloudstack_volume_attach", "volume_id": volume_id},
                )


class ReplicaVolumes:
    """Replica volumes in the active CloudStack settings' zone, made with their disk offering and
    attached to their OMA VM: the replication domain's ``CloudVolumes`` (module doc). One per
    process, sharing ``lock`` with every other volume operation of the process."""

    def __init__(self, db: Database, box: SecretBox, config: OmaConfig, lock: OmaVmLock) -> None:
        self.db = db
        self.box = box
        self.config = config
        self.lock = lock

    @asynccontextmanager
    async def _volumes(self, *needs: str) -> AsyncIterator[tuple[OmaVmVolumes, dict[str, str]]]:
        """The OMA VM's volume operations with the active settings, and their resources; 409
        ``CLOUDSTACK_NOT_CONFIGURED`` naming what the settings lack of ``needs`` (and the OMA VM)."""
        async with active_client(self.db, self.box, self.config) as (client, stored):
            resources = {
                "zone_id": stored.resources.zone_id,
                "disk_offering_id": stored.resources.disk_offering_id,
                "oma_vm_id": stored.resources.oma_vm_id,
            }
            missing = [n for n in ("oma_vm_id", *needs) if not resources[n]]
            if missing:
                raise ApiError(
                    409,
                    CLOUDSTACK_NOT_CONFIGURED,
                    f"the CloudStack settings {stored.name!r} have no {', '.join(missing)}: replica volumes"
                    " need a zone, a disk offering and the OMA VM (POST /ossea/config)",
                )
            yield OmaVmVolumes.from_config(client, self.lock, resources["oma_vm_id"], self.config), resources

    async def configured(self) -> bool:
        return bool(
            await self.db.fetchval("SELECT EXISTS (SELECT 1 FROM cloudstack_configs WHERE is_active)")
        )

    async def create(self, name: str, size_bytes: int) -> str:
        async with self._volumes("zone_id", "disk_offering_id") as (volumes, resources):
            volume = await volumes.create(
                name=name,
                size_bytes=size_bytes,
                disk_offering_id=resources["disk_offering_id"],
                zone_id=resources["zone_id"],
            )
        return volume.id

    async def find(self, name: str) -> str | None:
        async with self._volumes() as (volumes, _):
            items = await volumes.client.list("listVolumes", name=name, listall=True)
        found = [Volume.from_cloudstack(i) for i in items if i.get("name") == name]
        return found[0].id if found else None

    async def size(self, volume_id: str) -> int | None:
        async with self._volumes() as (volumes, _):
            try:
                volume = await volumes.get(volume_id)
            except ApiError as exc:
                if exc.status == 404:
                    return None
                raise
        return volume.size_bytes

    async def attach(self, volume_id: str) -> Path:
        async with self._volumes() as (volumes, _):
            return (await volumes.attach(volume_id)).device

    async def delete(self, volume_id: str) -> bool:
        async with self._volumes() as (volumes, _):
            try:
                await volumes.detach(volume_id)
                await volumes.delete(volume_id)
            except ApiError as exc:
                if exc.status == 404:
                    return False
                raise
        return True
