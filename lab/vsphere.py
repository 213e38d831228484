# pyvmomi's stubs leave the data-object constructors and pyVim's helpers unannotated:
# mypy: disable-error-code="no-untyped-call"
"""The vSphere lab: a running simulator (``lab/vcsim``) plus VMs whose disks are real images.

lab = Lab(tmp_path)
with lab:                                   # or: await nursery.start(lab.serve) under trio
    vm = lab.create_vm("vm1", [DiskSpec(64 * MiB, [Partition(32 * MiB, "ext4", files=...)])])
    si = lab.connect()                      # pyvmomi, plain HTTP
    vm.disks[0].guest.write(4096, b"...")   # a guest write, journalled for CBT
    boot = lab.create_boot_vm("web1")       # disk 0 boots the lab guest (lab.bootdisk)
    rewrite_data(boot.disks[0].guest, boot.boot, b"...")   # the guest changes its data file
    lab.create_vm("own", [DiskSpec.from_image(Path("guest.qcow2"))], nics=[NicSpec("VM Network", mac)])

A running lab announces itself in ``<lab dir>/lab.json`` (the simulator's ready line, mode 0600,
removed when it stops), so another process can use it: ``Lab.running(lab_dir)``, which is how
``python -m lab add-vm`` adds a VM to a lab started elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import select
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypedDict, Unpack, cast
from urllib.parse import urlsplit

import trio
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab.bootdisk import BootDiskInfo, build_boot_disk
from lab.datastore import DatastoreMap, datastore_path, flat_of, write_descriptor
from lab.disks import DiskLayout, TableType, build_disk
from lab.filesystems import MiB, Partition
from lab.guest import GuestDisk
from lab.images import copy_as_raw, inspect_image, partition_layout
from lab.simulator import LabError, Ready, build_vcsim, vcsim_command
from pyapp.process import ProcessRef, aterminate, terminate

__all__ = ["DiskSpec", "Lab", "LabDisk", "LabNic", "LabVM", "MiB", "NicSpec", "VmOptions"]

#: Where a running lab announces itself (the simulator's ready line), in its directory.
LAB_FILE = "lab.json"
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class DiskSpec:
    """A lab disk: its capacity and partitions (none: a blank disk of holes), or the disk an
    ``image`` (raw or QCOW2, see :meth:`from_image`) holds."""

    size: int
    partitions: Sequence[Partition] = ()
    table: TableType = "gpt"
    image: Path | None = None

    @classmethod
    def from_image(cls, image: Path) -> DiskSpec:
        """A disk holding the raw or QCOW2 ``image`` (copied as raw into the datastore); its
        capacity is the image's virtual size rounded up to a whole MiB (the tail reads as zeros)."""
        info = inspect_image(image)
        return cls(-(-info.virtual_size // MiB) * MiB, image=info.path)


@dataclass(frozen=True)
class NicSpec:
    """A network card: the vCenter network it is on (a standard network or a distributed port
    group, by name) and its MAC (None: vCenter generates one)."""

    network: str = "VM Network"
    mac: str | None = None

    def __post_init__(self) -> None:
        if self.mac is not None and (not _MAC_RE.fullmatch(self.mac) or int(self.mac[:2], 16) & 1):
            raise ValueError(f"not a unicast MAC address in lower case: {self.mac!r}")


class VmOptions(TypedDict, total=False):
    """How :meth:`Lab.create_vm` and :meth:`Lab.create_boot_vm` make a VM, besides its disks and
    NICs (defaults in :meth:`Lab.create_vm`)."""

    guest_id: str
    memory_mb: int
    num_cpus: int
    datacenter: str
    datastore: str
    power_on: bool
    folder: str
    directory: str | None


@dataclass(frozen=True)
class LabNic:
    key: int
    label: str
    network: str
    mac: str


@dataclass(frozen=True)
class LabDisk:
    key: int
    label: str
    capacity: int
    file_name: str  # datastore path of the descriptor, as in the disk backing
    descriptor: Path
    image: Path  # the raw bytes
    layout: DiskLayout
    guest: GuestDisk = field(repr=False)


@dataclass(frozen=True)
class LabVM:
    name: str
    moref: str
    uuid: str
    disks: tuple[LabDisk, ...]
    nics: tuple[LabNic, ...] = ()
    #: a VM of :meth:`Lab.create_boot_vm`: what its disk 0 boots and prints
    boot: BootDiskInfo | None = None


class Lab:
    """One simulator process serving on loopback (``port=0``: a free port), with its lab directory.

    Not thread-safe: share a Lab between threads only for reading ``url`` and friends."""

    def __init__(
        self,
        directory: Path,
        *,
        qcda_window: int = 0,
        cbt_block: int = 512,
        datastores: Sequence[str] = ("LocalDS_0",),
        port: int = 0,
        username: str = "user",
        password: str = "pass",
        cache_dir: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.qcda_window = qcda_window
        self.cbt_block = cbt_block
        self.datastore_names = list(datastores)
        self.port_wanted = port
        self.username = username
        self.password = password
        self.cache_dir = cache_dir
        self.tls = tls
        self.ready: Ready | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._si: vim.ServiceInstance | None = None

    # -- process ---------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        binary = build_vcsim(self.cache_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        return vcsim_command(
            binary,
            self.directory,
            port=self.port_wanted,
            datastores=self.datastore_names,
            qcda_window=self.qcda_window,
            cbt_block=self.cbt_block,
            username=self.username,
            password=self.password,
            tls=self.tls,
        )

    @property
    def log_path(self) -> Path:
        return self.directory / "vcsim.log"

    @property
    def lab_file(self) -> Path:
        return self.directory / LAB_FILE

    def _announce(self, ready: Ready) -> None:
        """Write ``lab.json`` (mode 0600: it holds the password) for :meth:`running`."""
        line = {
            "event": "ready",
            "url": ready.url,
            "username": ready.username,
            "password": ready.password,
            "datastores": {name: str(path) for name, path in ready.datastores.items()},
            "pid": ready.pid,
            "certificate": str(ready.certificate) if ready.certificate else None,
        }
        tmp = self.lab_file.with_name(f".{LAB_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(line, f)
        tmp.replace(self.lab_file)

    @classmethod
    def running(cls, directory: Path) -> Lab:
        """The lab another process runs in ``directory`` (from its ``lab.json``). Stopping the
        returned object only disconnects: the simulator is its owner's."""
        lab_file = Path(directory) / LAB_FILE
        try:
            ready = Ready.parse(lab_file.read_bytes())
        except FileNotFoundError:
            raise LabError(
                f"no lab is running in {directory} (no {LAB_FILE}):"
                f" start one with python -m lab --dir {directory}"
            ) from None
        if ProcessRef.of(ready.pid) is None:
            raise LabError(f"the lab of {directory} is gone (its simulator, pid {ready.pid}, has exited)")
        tls = ready.certificate is not None
        lab = cls(directory, username=ready.username, password=ready.password, tls=tls)
        lab.ready = ready
        return lab

    def start(self, timeout: float = 60.0) -> Ready:
        """Build if needed, start the simulator and wait for its ready line."""
        if self._proc is not None:
            raise LabError("the lab is already running")
        cmd = self._command()
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        self._proc = proc
        out = cast(IO[bytes], proc.stdout)
        line = b""
        deadline = time.monotonic() + timeout
        try:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([out], [], [], left)[0]:
                    raise LabError(
                        f"the simulator did not report ready within {timeout}s (see {self.log_path})"
                    )
                chunk = out.read1(4096) if hasattr(out, "read1") else out.read(1)
                if not chunk:
                    raise LabError(f"the simulator exited with {proc.wait()} (see {self.log_path})")
                line += chunk
            self.ready = Ready.parse(line)
            self._announce(self.ready)
        except BaseException:
            terminate(proc)
            self._proc = None
            raise
        return self.ready

    def stop(self) -> None:
        if self._si is not None:
            Disconnect(self._si)
            self._si = None
        if self._proc is not None:
            self.lab_file.unlink(missing_ok=True)
            terminate(self._proc)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        self.ready = None

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def serve(self, *, task_status: trio.TaskStatus[Ready] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the simulator until cancelled; reports the :class:`Ready` through ``task_status``."""
        if self._proc is not None or self.ready is not None:
            raise LabError("the lab is already running")
        cmd = await trio.to_thread.run_sync(self._command)
        with self.log_path.open("ab") as log:
            proc = await trio.lowlevel.open_process(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(60):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        raise LabError(f"the simulator exited with {await proc.wait()} (see {self.log_path})")
                    line += chunk
            self.ready = Ready.parse(line)
            self._announce(self.ready)
            task_status.started(self.ready)
            code = await proc.wait()
            raise LabError(f"the simulator exited unexpectedly with {code} (see {self.log_path})")
        finally:
            self.ready = None
            self.lab_file.unlink(missing_ok=True)
            with trio.CancelScope(shield=True):  # we are usually here because of a cancellation
                if self._si is not None:
                    si, self._si = self._si, None
                    with trio.move_on_after(5):
                        await trio.to_thread.run_sync(Disconnect, si, abandon_on_cancel=True)
                await aterminate(proc)
                if proc.stdout is not None:
                    await proc.stdout.aclose()

    # -- access ----------------------------------------------------------------------------------

    def _ready(self) -> Ready:
        if self.ready is None:
            raise LabError("the lab is not running")
        return self.ready

    @property
    def url(self) -> str:
        """The SDK URL, e.g. ``http://127.0.0.1:40123/sdk``."""
        return self._ready().url

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def ca_file(self) -> Path:
        """PEM file of the lab's self-signed certificate (a lab started with ``tls=True``): a CA
        file that verifies it, for 127.0.0.1."""
        cert = self._ready().certificate
        if cert is None:
            raise LabError("the lab serves plain HTTP: start it with tls=True for a certificate")
        return cert

    def thumbprint(self, algorithm: str = "sha256") -> str:
        """The certificate's fingerprint as VMware tools show it: ``AB:CD:...`` over the DER
        certificate (``sha256``, or ``sha1`` as older tools and VDDK show it)."""
        der = ssl.PEM_cert_to_DER_cert(self.ca_file.read_text(encoding="ascii"))
        return ":".join(f"{b:02X}" for b in hashlib.new(algorithm, der).digest())

    @property
    def datastores(self) -> DatastoreMap:
        return DatastoreMap(self._ready().datastores)

    def resolve(self, ds_path: str) -> Path:
        """Local file of a datastore path such as ``[LocalDS_0] vm1/vm1.vmdk``."""
        return self.datastores.resolve(ds_path)

    def image(self, ds_path: str) -> Path:
        """Raw image holding the bytes of the disk ``ds_path`` (descriptor or raw file)."""
        return self.datastores.image(ds_path)

    def connect(self) -> vim.ServiceInstance:
        """A new pyvmomi connection (plain HTTP, or HTTPS verified against the lab's own
        certificate); the caller disconnects it."""
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            https: vim.ServiceInstance = SmartConnect(
                protocol="https",
                host=self.host,
                port=self.port,
                user=self.username,
                pwd=self.password,
                sslContext=context,
            )
            return https
        si: vim.ServiceInstance = SmartConnect(
            protocol="http", host=self.host, port=self.port, user=self.username, pwd=self.password
        )
        return si

    def _service(self) -> vim.ServiceInstance:
        if self._si is None:
            self._si = self.connect()
        return self._si

    # -- VMs -------------------------------------------------------------------------------------

    def create_vm(
        self,
        name: str,
        disks: Sequence[DiskSpec],
        *,
        network: str = "VM Network",
        nics: Sequence[NicSpec] | None = None,
        **options: Unpack[VmOptions],
    ) -> LabVM:
        """Build the disk images, then create the VM through the vSphere API with those disks.

        A disk is built from its partitions, or copied from its ``image``
        (:meth:`DiskSpec.from_image`). ``nics``: the VM's network cards (vmxnet3) in order; by
        default one on ``network`` with a MAC vCenter generates. ``options`` (:class:`VmOptions`):
        ``guest_id`` (``otherLinux64Guest``), ``memory_mb`` (1024), ``num_cpus`` (1),
        ``datacenter`` (``DC0``), ``datastore`` (``LocalDS_0``), ``power_on`` (True), ``folder``: a
        VM folder path under the datacenter's ``vm`` folder (``"f2"``, ``"a/b"``), made when
        missing, so the VM's inventory path is ``/DC0/vm/<folder>/<name>``; ``directory``: the VM's
        directory on the datastore (default: its name; two VMs of one name in two folders need
        two)."""
        nic_specs = (NicSpec(network),) if nics is None else nics
        return self._create(name, [(spec.size, _disk_builder(spec)) for spec in disks], nic_specs, **options)

    def create_boot_vm(
        self,
        name: str,
        *,
        size: int = 64 * MiB,
        data: bytes | None = None,
        disks: Sequence[DiskSpec] = (),
        nics: Sequence[NicSpec] | None = None,
        **options: Unpack[VmOptions],
    ) -> LabVM:
        """A VM whose disk 0 is the lab's bootable guest (:func:`lab.bootdisk.build_boot_disk`,
        ``docs/lab-boot.md``) named ``name`` (1-63 of ``[A-Za-z0-9._-]``), its data file holding
        ``data`` (default: a few KiB naming the VM), followed by ``disks``. A VM that boots from a
        copy of disk 0 prints the boot line ``vm.boot`` describes (``vm.boot.data_sha256``); the
        guest changes its data file between passes with
        ``rewrite_data(vm.disks[0].guest, vm.boot, new)`` (journalled for CBT). ``nics`` and
        ``options`` as for :meth:`create_vm`, but 512 MB of memory by default: 1 CPU and 512 MB fit
        CloudStack's Small Instance."""
        content = data if data is not None else f"lab guest {name}\n".encode() * 256
        booted: list[BootDiskInfo] = []

        def boot_disk(flat: Path) -> DiskLayout:
            booted.append(build_boot_disk(flat, vm_name=name, size=size, data=content))
            return booted[0].layout

        builders = [(size, boot_disk), *[(spec.size, _disk_builder(spec)) for spec in disks]]
        options.setdefault("memory_mb", 512)
        vm = self._create(name, builders, (NicSpec(),) if nics is None else nics, **options)
        return dataclasses.replace(vm, boot=booted[0])

    def _create(
        self,
        name: str,
        disks: Sequence[tuple[int, Callable[[Path], DiskLayout]]],
        nics: Sequence[NicSpec],
        *,
        guest_id: str = "otherLinux64Guest",
        memory_mb: int = 1024,
        num_cpus: int = 1,
        datacenter: str = "DC0",
        datastore: str = "LocalDS_0",
        power_on: bool = True,
        folder: str = "",
        directory: str | None = None,
    ) -> LabVM:
        """Each disk's image made by its builder (given the raw file to write), then the VM."""
        if len(disks) > 15:
            raise ValueError("at most 15 disks (one SCSI controller)")
        si = self._service()
        content = si.RetrieveContent()
        dc = next(
            (
                e
                for e in content.rootFolder.childEntity
                if isinstance(e, vim.Datacenter) and e.name == datacenter
            ),
            None,
        )
        if dc is None:
            raise LabError(f"no datacenter {datacenter!r}")
        compute = next(e for e in dc.hostFolder.childEntity if isinstance(e, vim.ComputeResource))
        nic_backings = [_nic_backing(dc, nic.network) for nic in nics]  # checked before disks are built

        target_folder = dc.vmFolder
        for part in [p for p in folder.split("/") if p]:
            child = next(
                (e for e in target_folder.childEntity if isinstance(e, vim.Folder) and e.name == part), None
            )
            target_folder = child if child is not None else target_folder.CreateFolder(part)
        home = directory or name
        built: list[tuple[str, Path, DiskLayout, int]] = []
        for i, (size, build) in enumerate(disks):
            rel = f"{home}/{name}.vmdk" if i == 0 else f"{home}/{name}_{i}.vmdk"
            ds_path = datastore_path(datastore, rel)
            descriptor = self.resolve(ds_path)
            if descriptor.exists():
                raise LabError(f"{ds_path} already exists")
            descriptor.parent.mkdir(parents=True, exist_ok=True)
            layout = build(flat_of(descriptor))
            write_descriptor(descriptor, size)
            built.append((ds_path, descriptor, layout, size))

        ctrl_key = -100
        changes: list[vim.vm.device.VirtualDeviceSpec] = [
            vim.vm.device.VirtualDeviceSpec(
                operation="add",
                device=vim.vm.device.ParaVirtualSCSIController(
                    key=ctrl_key, busNumber=0, sharedBus="noSharing"
                ),
            )
        ]
        for i, (ds_path, _, _, size) in enumerate(built):
            unit = i if i < 7 else i + 1  # unit 7 is the controller's own
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=ds_path, diskMode="persistent", thinProvisioned=True
            )
            disk = vim.vm.device.VirtualDisk(
                key=-(200 + i),
                controllerKey=ctrl_key,
                unitNumber=unit,
                capacityInBytes=size,
                capacityInKB=size // 1024,
                backing=backing,
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
        for i, (nic, nic_backing) in enumerate(zip(nics, nic_backings, strict=True)):
            card = vim.vm.device.VirtualVmxnet3(key=-(300 + i), backing=nic_backing)
            if nic.mac is not None:
                card.addressType, card.macAddress = "manual", nic.mac
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=card))
        config = vim.vm.ConfigSpec(
            name=name,
            guestId=guest_id,
            memoryMB=memory_mb,
            numCPUs=num_cpus,
            files=vim.vm.FileInfo(vmPathName=datastore_path(datastore, f"{home}/{name}.vmx")),
            deviceChange=changes,
        )
        task = target_folder.CreateVM_Task(config=config, pool=compute.resourcePool)
        WaitForTask(task)
        vm = task.info.result
        if power_on and vm.runtime.powerState != "poweredOn":
            WaitForTask(vm.PowerOnVM_Task())

        devices = list(vm.config.hardware.device)
        by_file = {
            d.backing.fileName: d
            for d in devices
            if isinstance(d, vim.vm.device.VirtualDisk)
            and isinstance(d.backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo)
        }
        lab_disks = []
        for ds_path, descriptor, layout, size in built:
            dev = by_file.get(ds_path)
            if dev is None:
                raise LabError(f"the simulator did not attach {ds_path}")
            label = dev.deviceInfo.label if dev.deviceInfo is not None else ""
            lab_disks.append(
                LabDisk(
                    dev.key,
                    label,
                    size,
                    ds_path,
                    descriptor,
                    flat_of(descriptor),
                    layout,
                    GuestDisk(descriptor),
                )
            )
        cards = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        lab_nics = tuple(
            LabNic(
                card.key,
                card.deviceInfo.label if card.deviceInfo is not None else "",
                nic.network,
                card.macAddress or "",
            )
            for card, nic in zip(sorted(cards, key=lambda c: c.key), nics, strict=True)
        )
        return LabVM(name, vm._moId, vm.config.uuid, tuple(lab_disks), lab_nics)

    def grow_disk(self, vm: LabVM, index: int, capacity: int) -> LabVM:
        """Grow disk ``index`` of ``vm`` to ``capacity`` bytes, as an operator extending a virtual
        disk would: the image grows (the new area reads as zeros), then the VM's disk device
        (``ReconfigVM_Task``, operation ``edit``). Returns ``vm`` with the new capacity."""
        disk = vm.disks[index]
        if capacity <= disk.capacity or capacity % 512:
            raise ValueError("a disk grows to a larger multiple of 512 bytes")
        with disk.image.open("r+b") as f:
            f.truncate(capacity)
            os.fsync(f.fileno())
        write_descriptor(disk.descriptor, capacity)
        si = self.connect()  # a connection of its own: the shared one may have gone idle
        try:
            found: Any = vim.VirtualMachine(
                vm.moref, si._stub
            )  # by its moref: SearchIndex trips on the lab's objects
            if found.config is None:
                raise LabError(f"no VM {vm.name} ({vm.moref})")
            device: Any = next(
                d
                for d in found.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk) and d.key == disk.key
            )
            device.capacityInBytes = capacity
            device.capacityInKB = capacity // 1024
            spec = vim.vm.ConfigSpec(
                deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=device)]
            )
            WaitForTask(found.ReconfigVM_Task(spec=spec))
        finally:
            Disconnect(si)
        disks = list(vm.disks)
        disks[index] = dataclasses.replace(disk, capacity=capacity, guest=GuestDisk(disk.descriptor))
        return dataclasses.replace(vm, disks=tuple(disks))


def _disk_builder(spec: DiskSpec) -> Callable[[Path], DiskLayout]:
    """How :meth:`Lab.create_vm` makes ``spec``'s raw file: built from its partitions, or copied
    from its image."""
    image = spec.image
    if image is None:
        return lambda flat: build_disk(flat, spec.size, list(spec.partitions), spec.table)

    def copy(flat: Path) -> DiskLayout:
        copy_as_raw(inspect_image(image), flat, spec.size)
        return partition_layout(flat)

    return copy


def _nic_backing(dc: Any, network: str) -> vim.vm.device.VirtualDevice.BackingInfo:
    """The backing that puts a card on the datacenter's network ``network``: a standard network
    by name, or a distributed port group by its switch and key (as vSphere wants each)."""
    found = next((n for n in dc.network if n.name == network), None)
    if found is None:
        have = ", ".join(sorted(n.name for n in dc.network))
        raise LabError(f"no network {network!r} in datacenter {dc.name} (it has: {have})")
    if isinstance(found, vim.dvs.DistributedVirtualPortgroup):
        switch = found.config.distributedVirtualSwitch
        if switch is None:
            raise LabError(f"port group {network!r} belongs to no distributed switch")
        port = vim.dvs.PortConnection(portgroupKey=found.key, switchUuid=switch.uuid)
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network)
