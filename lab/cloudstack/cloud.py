"""The lab cloud's state and the rules CloudStack enforces on it.

Each operation is split where CloudStack splits it. For an asynchronous command, CloudStack checks
the parameters when the request arrives and runs everything else in the job; a *create* command
(createVolume, createSnapshot, deployVirtualMachine) also allocates its object before answering,
with the checks of that allocation (``create()`` in CloudStack's command classes). So the methods
here come in pairs: ``alloc_*`` (synchronous, may raise) and the job body (``async``, may raise;
its error becomes the job's result). The errors and their texts are CloudStack's (see
:mod:`.errors` for the codes); where a source file's wording could not be followed exactly the
text says the same thing.

Rules kept (with the CloudStack code they come from):

* attach (``VolumeApiServiceImpl.attachVolumeToVM``): the volume is a DATADISK or ROOT, not
  attached, not destroyed, Allocated or Ready; the VM is a user VM, Running or Stopped, in the
  volume's zone; attaching as device 0 (a ROOT volume) needs a Stopped VM without one; at most
  ``maxdatavolumeslimit`` data disks (hypervisor capability, 32 for KVM since 4.6); an Allocated
  volume is created on primary storage (here: its raw file) first; the device id is the lowest free
  one of 1..limit+1 without 3, the KVM CD-ROM slot (``getDeviceId``).
* detach (``detachVolumeFromVM``): the volume must be attached; the VM Running, Stopped or
  Destroyed; a ROOT volume only from a Stopped VM.
* delete (``retrieveAndValidateVolume``): not attached, no snapshot being taken.
* snapshots (``SnapshotManagerImpl``): of a Ready volume only; on KVM not of a volume whose VM is
  not Stopped unless ``kvm.snapshot.enabled`` (CloudStack's default: false); revert only while
  the volume's VM is stopped.
* destroy with expunge (``VolumeOrchestrator.cleanupVolumes``): the ROOT volume goes, data disks
  stay, detached.

VMs start and stop in one place, :meth:`Cloud._power_on` and :meth:`Cloud._power_off`. A user VM
runs as a qemu process on the double's one KVM host (:mod:`.hypervisor`): ``Starting`` while qemu
comes up, ``Running`` once it is, back to ``Stopped`` when it could not start (the job fails as
CloudStack's does when no host could start the VM: 533, "Unable to create a deployment for ...").
A qemu that exits on its own is noticed by :meth:`Cloud.watch_guests`, which stops the VM as
CloudStack's power-state sync does for a VM that powered off out of band (the double has no HA to
restart it). Volumes attached to or detached from a running VM are recorded at once and reach its
qemu at its next start (no hot-plug). The OMA VM is not a qemu VM: it is the host the OMA runs on;
starting and stopping it makes and removes its guest's device links.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from lab.bootdisk import VmDisk, VmError, VmSpec

from .errors import (
    ApiErrorCode,
    CloudRuntimeError,
    CloudStackError,
    InsufficientAddressCapacity,
    InvalidParameterValue,
    RuntimeFailure,
    ServerApiError,
)
from .faults import FaultMode, Faults
from .hypervisor import Guest, Host, stop_leftover
from .seed import Network, Seed, Template
from .state import Job, Nic, Snapshot, State, StateStore, VirtualMachine, Volume, cs_date
from .storage import Storage

log = logging.getLogger(__name__)

GiB = 1 << 30
CDROM_DEVICE_ID = 3
#: How often :meth:`Cloud.watch_guests` looks for qemus that exited on their own.
GUEST_WATCH_S = 0.2
#: VM states in which a user VM has (or is getting, or losing) a qemu.
POWERED = ("Starting", "Running", "Stopping")

#: Entity kinds a UUID parameter can name (ParamProcessWorker looks them up including removed).
KINDS = (
    "zone",
    "domain",
    "account",
    "serviceoffering",
    "diskoffering",
    "network",
    "template",
    "vm",
    "nic",
    "volume",
    "snapshot",
    "job",
)

_MAC = re.compile(r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")
_HOSTNAME = re.compile(r"^(?![0-9])(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def standard_mac(mac: str) -> str:
    """NetUtils.standardizeMacAddress: lower case, colons."""
    return mac.replace("-", ":").lower()


def mac_problem(mac: str) -> str | None:
    """Why CloudStack refuses ``mac`` for a NIC (NetUtils.isValidMac, isUnicastMac), or None."""
    if not _MAC.match(mac):
        return f"Mac address is not valid: {mac}"
    if int(mac[:2], 16) & 1:
        return f"Mac address is not unicast: {mac}"
    return None


@dataclass
class Options:
    """What the command line sets."""

    data_dir: Path
    device_root: Path
    oma_mac: str | None = None
    oma_ip: str | None = None


class Cloud:
    def __init__(self, seed: Seed, options: Options, faults: Faults) -> None:
        self.seed = seed
        self.options = options
        self.faults = faults
        self.store = StateStore(options.data_dir)
        self.storage = Storage(options.data_dir, options.device_root)
        self.host = Host(options.data_dir)
        self.state = State()
        #: Held by every change: job bodies and synchronous commands that change state run one at
        #: a time (CloudStack serialises work on a VM and its volumes the same way).
        self.lock = trio.Lock()
        self.zones = {z.id: z for z in seed.zones}
        self.service_offerings = {o.id: o for o in seed.serviceofferings}
        self.disk_offerings = {o.id: o for o in seed.diskofferings}
        self.networks = {n.id: n for n in seed.networks}
        self.templates = {t.id: t for t in seed.templates}

    # -- start-up -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the state, fail the jobs a previous run left pending (as a restarted management
        server does), make sure the OMA VM exists with the configured MAC and IP, and lay the OMA
        guest's device links out again (the device root may be a fresh directory)."""
        self.state = self.store.load()
        await self._stop_left_behind()
        for job in self.state.jobs.values():
            if job.status == 0:
                job.status, job.resultcode, job.completed = 2, 530, cs_date()
                job.result = {
                    "errorcode": 530,
                    "errortext": "Job failed: the management server restarted while it was pending",
                }
        oma = self.oma_vm()
        if oma is None:
            await self._create_oma_vm()
            oma = self.oma_vm()
            assert oma is not None
        nic = next(n for n in oma.nics if n.isdefault)
        if self.options.oma_mac:
            nic.macaddress = standard_mac(self.options.oma_mac)
        if self.options.oma_ip:
            nic.ipaddress = self.options.oma_ip
        self._sync_guest_devices(oma)
        await self.save()

    async def _stop_left_behind(self) -> None:
        """User VMs the previous run left powered: their host (the double) went down. A qemu it
        left running (it was killed) is stopped; every such VM is Stopped."""
        for vm in self.state.vms.values():
            if vm.is_oma or vm.removed is not None or vm.state not in POWERED:
                continue
            if vm.guest is not None:
                await trio.to_thread.run_sync(stop_leftover, vm.guest, self.host.console(vm.id))
            log.info("VM %s was %s when the double stopped: its qemu is gone, it is Stopped", vm.id, vm.state)
            vm.state, vm.guest = "Stopped", None

    async def _create_oma_vm(self) -> None:
        spec = self.seed.omavm
        template = self.templates[spec.templateid]
        vm = VirtualMachine(
            id=spec.id,
            internalid=self.state.new_internal_id(),
            name=spec.name,
            displayname=spec.name,
            zoneid=spec.zoneid,
            serviceofferingid=spec.serviceofferingid,
            templateid=spec.templateid,
            state="Running",
            created=cs_date(),
            is_oma=True,
            nics=[
                Nic(
                    id=str(uuid.uuid4()),
                    networkid=spec.networkid,
                    macaddress=standard_mac(spec.macaddress),
                    ipaddress=spec.ipaddress,
                    isdefault=True,
                    deviceid=0,
                )
            ],
        )
        self.state.vms[vm.id] = vm
        root = self._new_volume(
            f"ROOT-{vm.internalid}", vm.zoneid, "ROOT", template.size, templateid=template.id
        )
        await self._create_on_primary(root)
        self._attach(root, vm, 0)

    async def save(self) -> None:
        await self.store.save(self.state)

    # -- lookups --------------------------------------------------------------------------------

    def exists(self, kind: str, object_id: str) -> bool:
        """Whether ``object_id`` names an object of ``kind``, removed ones included."""
        tables: dict[str, Iterable[str]] = {
            "zone": self.zones,
            "domain": (self.seed.domain.id,),
            "account": (self.seed.account.id,),
            "serviceoffering": self.service_offerings,
            "diskoffering": self.disk_offerings,
            "network": self.networks,
            "template": self.templates,
            "vm": self.state.vms,
            "volume": self.state.volumes,
            "snapshot": self.state.snapshots,
            "job": self.state.jobs,
            "nic": {nic.id for vm in self.state.vms.values() for nic in vm.nics},
        }
        return object_id in tables[kind]

    def vm(self, vm_id: str | None) -> VirtualMachine | None:
        vm = self.state.vms.get(vm_id or "")
        return vm if vm is not None and vm.removed is None else None

    def volume(self, volume_id: str | None) -> Volume | None:
        vol = self.state.volumes.get(volume_id or "")
        return vol if vol is not None and vol.removed is None else None

    def snapshot(self, snapshot_id: str | None) -> Snapshot | None:
        snap = self.state.snapshots.get(snapshot_id or "")
        return snap if snap is not None and snap.removed is None else None

    def oma_vm(self) -> VirtualMachine | None:
        return next((vm for vm in self.state.vms.values() if vm.is_oma and vm.removed is None), None)

    def vm_volumes(self, vm: VirtualMachine) -> list[Volume]:
        return sorted(
            (v for v in self.state.volumes.values() if v.virtualmachineid == vm.id and v.removed is None),
            key=lambda v: v.deviceid if v.deviceid is not None else -1,
        )

    def pending_job_for(self, object_id: str) -> Job | None:
        return next(
            (j for j in self.state.jobs.values() if j.status == 0 and j.instanceid == object_id), None
        )

    def max_data_volumes(self) -> int:
        return self.seed.hypervisorcapabilities["KVM"].maxdatavolumeslimit

    def template_in_zone(self, template: Template, zone_id: str) -> bool:
        return template.zoneid is None or template.zoneid == zone_id

    # -- volumes --------------------------------------------------------------------------------

    def _new_volume(
        self,
        name: str,
        zone_id: str,
        kind: str,
        size: int,
        *,
        diskofferingid: str | None = None,
        templateid: str | None = None,
    ) -> Volume:
        vol = Volume(
            id=str(uuid.uuid4()),
            internalid=self.state.new_internal_id(),
            name=name,
            zoneid=zone_id,
            type=kind,
            size=size,
            state="Allocated",
            created=cs_date(),
            diskofferingid=diskofferingid,
            templateid=templateid,
        )
        self.state.volumes[vol.id] = vol
        return vol

    def alloc_volume(
        self,
        *,
        name: str | None,
        zone_id: str | None,
        disk_offering_id: str | None,
        size_gb: int | None,
        vm_id: str | None,
    ) -> Volume:
        """createVolume's synchronous part (``VolumeApiServiceImpl.allocVolume``)."""
        if disk_offering_id is None:
            raise InvalidParameterValue(
                "At least one of disk Offering ID or snapshot ID must be passed whilst creating volume"
            )
        vm = self.vm(vm_id) if vm_id else None
        if vm_id and vm is None:
            raise InvalidParameterValue(f"Unable to find VM by id {vm_id}")
        if zone_id is None:
            if vm is None:
                raise InvalidParameterValue("Please specify a valid zone.")
            zone_id = vm.zoneid
        size = self._data_disk_size(disk_offering_id, size_gb)
        return self._new_volume(
            name or str(uuid.uuid4()), zone_id, "DATADISK", size, diskofferingid=disk_offering_id
        )

    def _data_disk_size(self, disk_offering_id: str, size_gb: int | None) -> int:
        """A data disk's size in bytes from its offering, or the custom size an offering needs."""
        offering = self.disk_offerings[disk_offering_id]
        if offering.iscustomized:
            if size_gb is None:
                raise InvalidParameterValue("This disk offering requires a custom size specified")
            low = self.seed.config_int("custom.diskoffering.size.min", 1)
            high = self.seed.config_int("custom.diskoffering.size.max", 1024)
            if not low <= size_gb <= high:
                raise InvalidParameterValue(
                    f"Volume size: {size_gb}GB is out of allowed range. Max: {high} Min:{low}"
                )
            return size_gb * GiB
        if size_gb is not None:
            raise InvalidParameterValue("This disk offering does not allow custom size")
        return offering.disksize * GiB

    async def _create_on_primary(self, vol: Volume) -> None:
        template = self.templates.get(vol.templateid or "") if vol.type == "ROOT" else None
        if template is not None and template.image is not None:
            await self.storage.create_volume_from_image(vol.id, template.image, vol.size)
        else:
            await self.storage.create_volume_file(vol.id, vol.size)
        vol.state, vol.path = "Ready", vol.id

    def _device_id(self, vm: VirtualMachine, wanted: int | None) -> int:
        """``getDeviceId``: the requested id checked, or the lowest free one (never 3)."""
        max_device_id = self.max_data_volumes() + 1
        used = {v.deviceid for v in self.vm_volumes(vm)}
        if wanted is not None:
            if wanted < 0 or wanted > max_device_id or wanted == CDROM_DEVICE_ID:
                raise RuntimeFailure(f"deviceId should be 0,1,2,4-{max_device_id}")
            if wanted in used:
                holder = next(v for v in self.vm_volumes(vm) if v.deviceid == wanted)
                raise RuntimeFailure(
                    f"deviceId {wanted} is used by vol {holder.name} on vm {vm.instancename}"
                )
            return wanted
        free = [i for i in range(1, max_device_id + 1) if i != CDROM_DEVICE_ID and i not in used]
        if not free:
            raise RuntimeFailure(f"All device Ids are used by vm {vm.instancename}")
        return free[0]

    def _attach(self, vol: Volume, vm: VirtualMachine, device_id: int, *, link: bool = True) -> None:
        vol.virtualmachineid, vol.deviceid, vol.attached = vm.id, device_id, cs_date()
        if link and vm.is_oma and vm.state == "Running":
            self.storage.link_device(vol.id)

    def _detach(self, vol: Volume) -> None:
        self.storage.unlink_device(vol.id)
        vol.virtualmachineid = vol.deviceid = vol.attached = None

    def _root_attach_detach_allowed(self, vm: VirtualMachine) -> None:
        # validateRootVolumeDetachAttach (its condition refuses Destroyed VMs as well)
        if vm.state != "Stopped":
            raise InvalidParameterValue(
                "Root volume detach can happen only when vm is in states: Stopped or Destroyed"
            )

    async def attach_volume(self, volume_id: str, vm_id: str, device_id: int | None) -> Volume:
        """attachVolume's job."""
        vol = self.volume(volume_id)
        if vol is None or vol.type not in ("DATADISK", "ROOT"):
            raise InvalidParameterValue("Please specify a volume with the valid type: ROOT or DATADISK")
        if vol.virtualmachineid is not None:
            raise InvalidParameterValue("Please specify a volume that is not attached to any VM.")
        if vol.state == "Destroy":
            raise InvalidParameterValue("Please specify a volume that is not destroyed.")
        if vol.state not in ("Allocated", "Ready"):
            raise InvalidParameterValue("Volume state must be in Allocated, Ready or in Uploaded state")
        vm = self.vm(vm_id)
        if vm is None:
            raise InvalidParameterValue("Please specify a valid User VM.")
        if vm.state not in ("Running", "Stopped"):
            raise InvalidParameterValue("Please specify a VM that is either running or stopped.")
        if vm.zoneid != vol.zoneid:
            raise InvalidParameterValue("Please specify a VM that is in the same zone as the volume.")
        if device_id == 0:
            self._root_attach_detach_allowed(vm)
            if any(v.deviceid == 0 for v in self.vm_volumes(vm)):
                raise InvalidParameterValue("Vm already has root volume attached to it")
        else:
            data_disks = sum(1 for v in self.vm_volumes(vm) if v.type == "DATADISK")
            limit = self.max_data_volumes()
            if data_disks >= limit:
                raise InvalidParameterValue(
                    f"The specified VM already has the maximum number of data disks ({limit}) attached."
                    " Please specify another VM."
                )
        if vol.state == "Allocated":
            await self._create_on_primary(vol)
        chosen = self._device_id(vm, device_id)
        dropped = vm.is_oma and self.faults.take("attachVolume", FaultMode.DROP_DEVICE_LINK) is not None
        self._attach(vol, vm, chosen, link=not dropped)
        return vol

    def _find_for_detach(self, volume_id: str | None, vm_id: str | None, device_id: int | None) -> Volume:
        if (
            (volume_id is None and device_id is None and vm_id is None)
            or (volume_id is not None and (device_id is not None or vm_id is not None))
            or (volume_id is None and (device_id is None or vm_id is None))
        ):
            raise InvalidParameterValue(
                "Please provide either a volume id, or a tuple(device id, instance id)"
            )
        if volume_id is not None:
            vol = self.volume(volume_id)
        else:
            vol = next(
                (
                    v
                    for v in self.state.volumes.values()
                    if v.removed is None and v.virtualmachineid == vm_id and v.deviceid == device_id
                ),
                None,
            )
        if vol is None:
            raise InvalidParameterValue(f"Unable to find volume with ID: {volume_id}")
        return vol

    async def detach_volume(self, volume_id: str | None, vm_id: str | None, device_id: int | None) -> Volume:
        """detachVolume's job."""
        vol = self._find_for_detach(volume_id, vm_id, device_id)
        target_vm_id = vm_id or vol.virtualmachineid
        if target_vm_id is None:
            raise InvalidParameterValue("The specified volume is not attached to a VM.")
        vm = self.vm(target_vm_id)
        if vm is None or vm.state not in ("Running", "Stopped", "Destroyed"):
            raise InvalidParameterValue("Please specify a VM that is either running or stopped.")
        if vol.type == "ROOT":
            self._root_attach_detach_allowed(vm)
        self._detach(vol)
        return vol

    def delete_volume(self, volume_id: str) -> None:
        """deleteVolume (synchronous; ``destroyVolume`` with expunge)."""
        vol = self.volume(volume_id)
        if vol is None:
            raise InvalidParameterValue(f"Unable to find volume with ID: {volume_id}")
        if self._snapshot_in_progress({vol.id}):
            raise InvalidParameterValue(
                "There are snapshot operations in progress on the volume, unable to delete it"
            )
        if vol.virtualmachineid is not None and self.vm(vol.virtualmachineid) is not None:
            raise InvalidParameterValue("Please specify a volume that is not attached to any VM.")
        if vol.state not in ("Allocated", "Ready", "Destroy"):
            raise CloudRuntimeError(f"Volume {vol.name} cannot be deleted in state {vol.state}")
        self._expunge_volume(vol)

    def _expunge_volume(self, vol: Volume) -> None:
        self.storage.unlink_device(vol.id)
        self.storage.remove(self.storage.volume_file(vol.id))
        vol.state, vol.removed = "Expunged", cs_date()
        vol.virtualmachineid = vol.deviceid = vol.attached = None

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot_in_progress(self, volume_ids: set[str]) -> bool:
        return any(
            s.volumeid in volume_ids and s.state in ("Allocated", "Creating") and s.removed is None
            for s in self.state.snapshots.values()
        )

    def alloc_snapshot(self, volume_id: str, name: str | None) -> Snapshot:
        """createSnapshot's synchronous part (``allocSnapshot`` and ``supportedByHypervisor``)."""
        vol = self.volume(volume_id)
        if vol is None:
            raise InvalidParameterValue(f"Creating snapshot failed due to volume:{volume_id} doesn't exist")
        if vol.state != "Ready":
            raise InvalidParameterValue(
                f"VolumeId: {vol.id} is not in Ready state but {vol.state}. Cannot take snapshot."
            )
        vm = self.vm(vol.virtualmachineid)
        if vm is not None:
            if vm.state not in ("Stopped", "Destroyed") and not self.seed.config_bool("kvm.snapshot.enabled"):
                raise CloudRuntimeError(
                    "KVM Snapshot is not supported for Running VMs. It is disabled by default due to a"
                    " possible volume corruption in certain cases. To enable it set global settings"
                    " kvm.snapshot.enabled to True. See the documentation for more details."
                )
            if vm.state in ("Destroyed", "Expunging"):
                raise CloudRuntimeError(
                    f"Creating snapshot failed due to volume:{vol.id} is associated with vm:{vm.instancename}"
                    f" is in {vm.state} state"
                )
            if self._snapshot_in_progress({v.id for v in self.vm_volumes(vm)}):
                raise InvalidParameterValue(
                    "There is other active snapshot tasks on the instance to which the volume is attached,"
                    " please try again later"
                )
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        default_name = f"{vm.displayname}_{vol.name}_{stamp}" if vm is not None else f"{vol.name}_{stamp}"
        snap = Snapshot(
            id=str(uuid.uuid4()),
            internalid=self.state.new_internal_id(),
            name=name or default_name,
            volumeid=vol.id,
            zoneid=vol.zoneid,
            state="Allocated",
            created=cs_date(),
            virtualsize=vol.size,
        )
        self.state.snapshots[snap.id] = snap
        return snap

    async def take_snapshot(self, snapshot_id: str) -> Snapshot:
        """createSnapshot's job: the volume file copied to secondary storage."""
        snap = self.state.snapshots[snapshot_id]
        vol = self.volume(snap.volumeid)
        try:
            if vol is None or vol.state != "Ready":
                raise CloudRuntimeError(f"Volume {snap.volumeid} is not Ready")
            snap.state = "Creating"
            target = self.storage.snapshot_file(snap.id)
            await self.storage.copy(self.storage.volume_file(vol.id), target)
            snap.physicalsize = target.stat().st_blocks * 512
            snap.state = "BackedUp"
            return snap
        except (CloudStackError, OSError) as exc:
            snap.state = "Error"
            log.warning("snapshot %s failed: %s", snap.id, exc)
            raise CloudRuntimeError(
                "Failed to create snapshot due to an internal error creating snapshot for volume"
                f" {snap.volumeid}"
            ) from exc

    async def revert_snapshot(self, snapshot_id: str) -> Snapshot:
        """revertSnapshot's job."""
        snap = self.snapshot(snapshot_id)
        if snap is None:
            raise InvalidParameterValue("No such snapshot")
        vol = self.volume(snap.volumeid)
        if vol is None or vol.state != "Ready":
            raise InvalidParameterValue("The volume is not in Ready state.")
        vm = self.vm(vol.virtualmachineid)
        if vm is not None and vm.state != "Stopped":
            raise InvalidParameterValue(
                "The VM the specified disk is attached to is not in the shutdown state."
            )
        if snap.state != "BackedUp":
            raise InvalidParameterValue(f"Snapshot {snap.id} is not in BackedUp state but {snap.state}")
        await self.storage.copy(self.storage.snapshot_file(snap.id), self.storage.volume_file(vol.id))
        return snap

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """deleteSnapshot's job."""
        snap = self.snapshot(snapshot_id)
        if snap is None:
            raise InvalidParameterValue(f"unable to find a snapshot with id {snapshot_id}")
        if snap.state not in ("BackedUp", "Error", "Destroyed"):
            raise InvalidParameterValue(
                f"Can't delete snapshot {snap.id} due to it is in {snap.state} Status"
            )
        self.storage.remove(self.storage.snapshot_file(snap.id))
        snap.state, snap.removed = "Destroyed", cs_date()

    # -- virtual machines ----------------------------------------------------------------------

    def _network_addresses(self, net: Network) -> tuple[ipaddress.IPv4Network | None, set[str]]:
        used = {
            nic.ipaddress
            for vm in self.state.vms.values()
            if vm.removed is None
            for nic in vm.nics
            if nic.networkid == net.id and nic.ipaddress
        }
        cidr = ipaddress.IPv4Network(net.cidr) if net.cidr else None
        return cidr, used | ({net.gateway} if net.gateway else set())

    def _pick_ip(self, net: Network, wanted: str | None) -> str | None:
        cidr, used = self._network_addresses(net)
        if cidr is None:
            if wanted:
                raise InvalidParameterValue(f"Cannot specify an IP address for the L2 network {net.name}")
            return None
        if wanted:
            try:
                address = ipaddress.IPv4Address(wanted)
            except ValueError as exc:
                raise InvalidParameterValue(f"Invalid format for IPv4 address parameter: {wanted}") from exc
            if address not in cidr or address in (cidr.network_address, cidr.broadcast_address):
                raise InvalidParameterValue(
                    f"Invalid ip address {wanted} for the network {net.name} ({net.cidr})"
                )
            if wanted in used:
                raise InsufficientAddressCapacity(
                    f"The requested ip address {wanted} is not available in the network {net.name}"
                )
            return wanted
        for host in cidr.hosts():
            if str(host) not in used:
                return str(host)
        raise InsufficientAddressCapacity(f"Insufficient address capacity in network {net.name}")

    def _pick_mac(self, net: Network, wanted: str | None) -> str:
        in_use = {
            nic.macaddress
            for vm in self.state.vms.values()
            if vm.removed is None
            for nic in vm.nics
            if nic.networkid == net.id
        }
        if wanted:
            problem = mac_problem(wanted)
            if problem is not None:
                raise InvalidParameterValue(problem)
            mac = standard_mac(wanted)
            if mac in in_use:
                raise InvalidParameterValue(f"The MAC address {mac} is already in use in network {net.name}")
            return mac
        while True:  # guest NICs get 02:00:xx:xx:xx:xx, locally administered
            mac = "02:00:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:4])
            if mac not in in_use:
                return mac

    def _default_network(self, zone_id: str) -> Network:
        isolated = [n for n in self.networks.values() if n.zoneid == zone_id and n.type == "Isolated"]
        if len(isolated) != 1:
            raise InvalidParameterValue(
                f"More than 1 default Isolated networks are found for account {self.seed.account.name};"
                " please specify networkIds"
            )
        return isolated[0]

    def alloc_vm(
        self,
        *,
        zone_id: str,
        service_offering_id: str,
        template_id: str,
        name: str | None,
        display_name: str | None,
        network_ids: list[str],
        ip_address: str | None,
        mac_address: str | None,
        ip_to_network: list[dict[str, str]],
        root_disk_gb: int | None,
        disk_offering_id: str | None,
        size_gb: int | None,
    ) -> VirtualMachine:
        """deployVirtualMachine's synchronous part: the VM, its NICs and volumes allocated."""
        template = self.templates[template_id]
        if not self.template_in_zone(template, zone_id):
            raise InvalidParameterValue(f"Template {template.name} is not available in zone {zone_id}")
        requests: list[tuple[Network, str | None, str | None]] = []
        for entry in ip_to_network:
            net_id = entry.get("networkid")
            if net_id is None or net_id not in self.networks:
                raise InvalidParameterValue(f"Unable to find network by id {net_id}")
            requests.append((self.networks[net_id], entry.get("ip"), entry.get("mac")))
        for net_id in network_ids:
            if all(net.id != net_id for net, _, _ in requests):
                requests.append((self.networks[net_id], None, None))
        if not requests:
            requests.append((self._default_network(zone_id), None, None))
        if ip_address or mac_address:  # ipaddress/macaddress are for the default (first) network
            net, ip, mac = requests[0]
            requests[0] = (net, ip or ip_address, mac or mac_address)
        for net, _, _ in requests:
            if net.zoneid != zone_id:
                raise InvalidParameterValue(f"Network {net.name} doesn't belong to zone {zone_id}")
        vm_uuid = str(uuid.uuid4())
        host_name = name or f"VM-{vm_uuid}"
        if name is not None and not _HOSTNAME.match(name):
            raise InvalidParameterValue(
                "Invalid name. Vm name can contain ASCII letters 'a' through 'z', the digits '0' through '9',"
                " and the hyphen ('-'), must be between 1 and 63 characters long, and can't start or end with"
                ' "-" and can\'t start with digit'
            )
        for other in self.state.vms.values():
            if (
                other.removed is None
                and other.name == host_name
                and {n.networkid for n in other.nics} & {net.id for net, _, _ in requests}
            ):
                raise InvalidParameterValue(f"The vm with hostName {host_name} already exists in the network")
        size = template.size
        if root_disk_gb is not None:
            if root_disk_gb * GiB < template.size:
                raise InvalidParameterValue(
                    f"Root disk size ({root_disk_gb} GB) is smaller than the template size"
                    f" {template.size} bytes"
                )
            size = root_disk_gb * GiB
        nics = []
        for index, (net, ip, mac) in enumerate(requests):
            nics.append(
                Nic(
                    id=str(uuid.uuid4()),
                    networkid=net.id,
                    macaddress=self._pick_mac(net, mac),
                    ipaddress=self._pick_ip(net, ip),
                    isdefault=index == 0,
                    deviceid=index,
                )
            )
        data_size = self._data_disk_size(disk_offering_id, size_gb) if disk_offering_id else None
        vm = VirtualMachine(
            id=vm_uuid,
            internalid=self.state.new_internal_id(),
            name=host_name,
            displayname=display_name or host_name,
            zoneid=zone_id,
            serviceofferingid=service_offering_id,
            templateid=template.id,
            state="Stopped",
            created=cs_date(),
            nics=nics,
        )
        self.state.vms[vm.id] = vm
        root = self._new_volume(f"ROOT-{vm.internalid}", zone_id, "ROOT", size, templateid=template.id)
        self._attach(root, vm, 0)
        if disk_offering_id is not None and data_size is not None:
            data = self._new_volume(
                f"DATA-{vm.internalid}", zone_id, "DATADISK", data_size, diskofferingid=disk_offering_id
            )
            self._attach(data, vm, 1)
        return vm

    async def deploy_vm(self, vm_id: str, start: bool) -> VirtualMachine:
        """deployVirtualMachine's job: the volumes created on primary storage, the VM started."""
        vm = self.state.vms[vm_id]
        await self._create_allocated_volumes(vm)
        if start:
            await self._power_on(vm)
        return vm

    async def _create_allocated_volumes(self, vm: VirtualMachine) -> None:
        """A VM's volumes get their files before it first runs (CloudStack creates them on
        primary storage when the VM is deployed on a host)."""
        for vol in self.vm_volumes(vm):
            if vol.state == "Allocated":
                await self._create_on_primary(vol)

    def _vm_for_power(self, vm_id: str) -> VirtualMachine:
        vm = self.vm(vm_id)
        if vm is None:
            raise InvalidParameterValue(f"unable to find a virtual machine with id {vm_id}")
        if vm.state in ("Destroyed", "Expunging", "Error"):
            raise InvalidParameterValue(f"Unable to change the power state of VM {vm.name}: it is {vm.state}")
        return vm

    async def start_vm(self, vm_id: str) -> VirtualMachine:
        vm = self._vm_for_power(vm_id)
        if vm.state != "Running":  # starting a running VM succeeds and changes nothing
            await self._create_allocated_volumes(vm)
            await self._power_on(vm)
        return vm

    async def stop_vm(self, vm_id: str, forced: bool = False) -> VirtualMachine:
        vm = self._vm_for_power(vm_id)
        if vm.state != "Stopped":
            await self._power_off(vm, forced=forced)
        return vm

    def guest_spec(self, vm: VirtualMachine) -> VmSpec:
        """What the VM runs as under qemu: its volumes in device-id order, its NICs' MACs in NIC
        order, its offering's memory and CPUs."""
        volumes = self.vm_volumes(vm)
        if not any(v.deviceid == 0 for v in volumes):
            raise InvalidParameterValue(f"Unable to start VM {vm.name}: it has no ROOT volume")
        offering = self.service_offerings[vm.serviceofferingid]
        return VmSpec(
            vm.instancename,
            [VmDisk(self.storage.volume_file(v.id)) for v in volumes],
            [nic.macaddress for nic in sorted(vm.nics, key=lambda n: n.deviceid)],
            memory_mb=offering.memory,
            cpus=offering.cpunumber,
        )

    async def _power_on(self, vm: VirtualMachine) -> None:
        """The one place a VM starts: a user VM is Running once its qemu is up."""
        if vm.is_oma:
            vm.state = "Running"
            self._sync_guest_devices(vm)
            return
        spec = self.guest_spec(vm)
        vm.state = "Starting"
        try:
            guest = await self.host.start(vm.id, spec)
        except VmError as exc:
            vm.state = "Stopped"
            log.warning("VM %s (%s) did not start: %s", vm.id, vm.instancename, exc)
            raise ServerApiError(
                ApiErrorCode.INSUFFICIENT_CAPACITY_ERROR,
                f'Unable to create a deployment for VM instance {{id: "{vm.internalid}", name: '
                f'"{vm.instancename}", uuid: "{vm.id}", type="User"}}',
            ) from exc
        ref = guest.running.process_ref()
        vm.state, vm.guest = "Running", str(ref) if ref is not None else None

    async def _power_off(self, vm: VirtualMachine, *, forced: bool = False) -> None:
        """The one place a VM stops: a user VM's qemu is stopped (SIGTERM, then SIGKILL after a
        grace period; SIGKILL at once when ``forced``)."""
        if vm.is_oma:
            vm.state = "Stopped"
            self._sync_guest_devices(vm)
            return
        vm.state = "Stopping"
        await self.host.stop(vm.id, forced=forced)
        vm.state, vm.guest = "Stopped", None

    async def watch_guests(self) -> None:
        """Forever: a user VM whose qemu exited on its own becomes Stopped (CloudStack's power
        state sync for a VM that powered off out of band)."""
        while True:
            await trio.sleep(GUEST_WATCH_S)
            for guest in self.host.exited():
                with trio.CancelScope(shield=True):
                    async with self.lock:
                        await self._guest_exited(guest)

    async def _guest_exited(self, guest: Guest) -> None:
        if self.host.guests.get(guest.vm_id) is not guest:
            return  # stopped by a job meanwhile
        await self.host.forget(guest)
        vm = self.vm(guest.vm_id)
        if vm is not None and vm.state == "Running":
            log.warning("VM %s (%s): its qemu exited on its own; the VM is Stopped", vm.id, vm.instancename)
            vm.state, vm.guest = "Stopped", None
            await self.save()

    async def shutdown(self) -> None:
        """The double stops: so does every qemu it started (their VMs are Stopped at the next
        start)."""
        async with self.lock:
            await self.host.stop_all()

    def _sync_guest_devices(self, vm: VirtualMachine) -> None:
        """The OMA guest's disk/by-id: a link per attached volume while it runs, none otherwise."""
        if not vm.is_oma:
            return
        for vol in self.vm_volumes(vm):
            if vm.state == "Running" and vol.state == "Ready":
                self.storage.link_device(vol.id)
            else:
                self.storage.unlink_device(vol.id)

    async def destroy_vm(self, vm_id: str, expunge: bool, volume_ids: list[str]) -> VirtualMachine:
        """destroyVirtualMachine's job."""
        vm = self.vm(vm_id)
        if vm is None:
            raise InvalidParameterValue("Unable to find a virtual machine with specified vmId")
        attached = {v.id for v in self.vm_volumes(vm) if v.type == "DATADISK"}
        strays = [v for v in volume_ids if v not in attached]
        if strays:
            raise InvalidParameterValue(
                "The following supplied volumes are not DATADISK attached to the VM: " + ", ".join(strays)
            )
        if vm.state in POWERED:
            await self._power_off(vm)
        for volume_id in volume_ids:
            vol = self.state.volumes[volume_id]
            self._detach(vol)
            self._expunge_volume(vol)
        if expunge:
            for vol in self.vm_volumes(vm):
                if vol.type == "ROOT":
                    self._expunge_volume(vol)
                else:
                    self._detach(vol)
            vm.state, vm.removed = "Expunging", cs_date()
            self.host.remove_files(vm.id)
        else:
            vm.state = "Destroyed"
            for vol in self.vm_volumes(vm):
                if vol.type == "ROOT":
                    vol.state = "Destroy"
        return vm

    def update_vm(
        self, vm_id: str, display_name: str | None, name: str | None, ha: bool | None
    ) -> VirtualMachine:
        """updateVirtualMachine (synchronous)."""
        vm = self.vm(vm_id)
        if vm is None:
            raise InvalidParameterValue(f"unable to find virtual machine with id {vm_id}")
        if name is not None and name != vm.name:
            if not _HOSTNAME.match(name):
                raise InvalidParameterValue(f"Invalid name {name} for the VM")
            if vm.state != "Stopped":
                raise InvalidParameterValue(f"Vm {vm.name} should be stopped to change its name")
            vm.name = name
        if display_name is not None:
            vm.displayname = display_name
        if ha is not None:
            vm.haenable = ha
        return vm

    # -- what tests look at ---------------------------------------------------------------------

    def lab_state(self) -> dict[str, Any]:
        """GET /lab/state: objects that are not removed, pending jobs, device links and files."""
        return {
            "vms": [vm.model_dump() for vm in self.state.vms.values() if vm.removed is None],
            "volumes": [v.model_dump() for v in self.state.volumes.values() if v.removed is None],
            "snapshots": [s.model_dump() for s in self.state.snapshots.values() if s.removed is None],
            "pending_jobs": [j.model_dump() for j in self.state.jobs.values() if j.status == 0],
            "device_links": self.storage.device_links(),
            "files": self.storage.files(),
            "guests": self.host.describe(),
        }
