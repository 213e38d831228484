# pyvmomi's stubs leave the data-object constructors and pyVim's helpers unannotated:
# mypy: disable-error-code="no-untyped-call"
"""The vSphere lab: a running simulator (``lab/vcsim``) plus VMs whose disks are real images.

lab = Lab(tmp_path)
with lab:                                   # or: await nursery.start(lab.serve) under trio
    vm = lab.create_vm("vm1", [DiskSpec(64 * MiB, [Partition(32 * MiB, "ext4", files=...)])])
    si = lab.connect()                      # pyvmomi, plain HTTP
    vm.disks[0].guest.write(4096, b"...")   # a guest write, journalled for CBT
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import select
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast
from urllib.parse import urlsplit

import trio
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab.datastore import DatastoreMap, datastore_path, flat_of, write_descriptor
from lab.disks import DiskLayout, TableType, build_disk
from lab.filesystems import MiB, Partition
from lab.guest import GuestDisk
from lab.simulator import LabError, Ready, build_vcsim, vcsim_command
from pyapp.process import aterminate, terminate

__all__ = ["DiskSpec", "Lab", "LabDisk", "LabVM", "MiB"]


@dataclass(frozen=True)
class DiskSpec:
    """A lab disk: its capacity and partitions (none: a blank disk of holes)."""

    size: int
    partitions: Sequence[Partition] = ()
    table: TableType = "gpt"


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
            task_status.started(self.ready)
            code = await proc.wait()
            raise LabError(f"the simulator exited unexpectedly with {code} (see {self.log_path})")
        finally:
            self.ready = None
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
        guest_id: str = "otherLinux64Guest",
        memory_mb: int = 1024,
        num_cpus: int = 1,
        network: str = "VM Network",
        datacenter: str = "DC0",
        datastore: str = "LocalDS_0",
        power_on: bool = True,
        folder: str = "",
        directory: str | None = None,
    ) -> LabVM:
        """Build the disk images, then create the VM through the vSphere API with those disks.

        ``folder``: a VM folder path under the datacenter's ``vm`` folder (``"f2"``, ``"a/b"``),
        made when missing, so the VM's inventory path is ``/DC0/vm/<folder>/<name>``;
        ``directory``: the VM's directory on the datastore (default: its name; two VMs of one name
        in two folders need two)."""
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

        target_folder = dc.vmFolder
        for part in [p for p in folder.split("/") if p]:
            child = next(
                (e for e in target_folder.childEntity if isinstance(e, vim.Folder) and e.name == part), None
            )
            target_folder = child if child is not None else target_folder.CreateFolder(part)
        home = directory or name
        built: list[tuple[str, Path, DiskLayout, int]] = []
        for i, spec in enumerate(disks):
            rel = f"{home}/{name}.vmdk" if i == 0 else f"{home}/{name}_{i}.vmdk"
            ds_path = datastore_path(datastore, rel)
            descriptor = self.resolve(ds_path)
            if descriptor.exists():
                raise LabError(f"{ds_path} already exists")
            layout = build_disk(flat_of(descriptor), spec.size, list(spec.partitions), spec.table)
            write_descriptor(descriptor, spec.size)
            built.append((ds_path, descriptor, layout, spec.size))

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
        nic_backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network)
        changes.append(
            vim.vm.device.VirtualDeviceSpec(
                operation="add", device=vim.vm.device.VirtualVmxnet3(key=-300, backing=nic_backing)
            )
        )
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

        by_file = {
            d.backing.fileName: d
            for d in vm.config.hardware.device
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
        return LabVM(name, vm._moId, vm.config.uuid, tuple(lab_disks))

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
