"""Running a lab VM under ``qemu-system-x86_64``: its disks as virtio disks in order, its network
cards with their MACs on qemu's user-mode network, its serial console written to a file.

Machine ``pc``, CPU ``qemu64``, no display, no default devices, no option ROMs on the network
cards (no PXE attempt when a disk does not boot). The user-mode network is ``restrict=on``: the
guest reaches nothing outside its VM.

KVM or TCG
    ``/dev/kvm`` opening proves nothing: on some machines it opens and every guest dies at once
    with "KVM internal error ... emulation failure". So :func:`accelerator` boots a tiny lab
    guest once with KVM and uses KVM only when its boot line appears within
    :data:`PROBE_DEADLINE_S`; TCG otherwise. The answer is kept for the life of the process.

Up
    :meth:`RunningVM.start` returns once qemu is up: its QMP socket (in a private temporary
    directory) answered ``query-status`` with ``running``, which qemu does only from its main loop,
    after the machine is built and its disks are open. A qemu that cannot start (a disk it cannot
    open, a bad option) exits first: :class:`VmError` with qemu's own message.

Firmware log
    SeaBIOS writes its debug messages to I/O port 0x402; an ``isa-debugcon`` device sends them to
    ``<console>.firmware.log``, apart from the guest's serial console. When no disk boots SeaBIOS
    says ``No bootable device.`` there, so :meth:`RunningVM.wait_for_marker` can tell at once
    (:class:`NoBootableDisk`) instead of waiting for a boot line that will never come.

Stopping
    SIGTERM (qemu shuts the VM down and exits), then SIGKILL after a grace period, always reaped
    (:func:`pyapp.process.terminate`).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from pyapp import process

from .image import build_boot_disk
from .marker import BootMarker, check_vm_name, find_marker
from .qmp import Qmp, QmpError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]
DiskFormat = Literal["raw", "qcow2"]
#: How long the KVM probe waits for its guest's boot line (a KVM boot takes about a second).
PROBE_DEADLINE_S = 20.0
#: What qemu prints when KVM cannot run the guest: the probe stops waiting at once.
KVM_FAILURE = "KVM internal error"
#: What SeaBIOS prints (on its debug port) when no disk, floppy or network card booted.
NO_BOOTABLE_DEVICE = "No bootable device."
#: SeaBIOS's debug port (``CONFIG_DEBUG_IO``): what it writes there goes to the firmware log.
SEABIOS_DEBUG_PORT = "0x402"
#: The private temporary directories holding a running qemu's QMP socket.
CONTROL_DIR_PREFIX = "lab-qemu-"
_QMP_OPTIONS = ",server=on,wait=off"
#: How long :meth:`RunningVM.start` waits for qemu to be up (it takes well under a second).
UP_TIMEOUT_S = 30.0
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_POLL_S = 0.05


class VmError(RuntimeError):
    """A lab VM did not start, exited, or did not boot in time."""


class BootTimeout(VmError):
    """No boot line within the deadline: the disk does not boot (or boots too slowly)."""


class NoBootableDisk(VmError):
    """The firmware found nothing to boot: the VM will never print a boot line."""


@dataclass(frozen=True)
class VmDisk:
    path: Path
    format: DiskFormat = "raw"


@dataclass(frozen=True)
class VmSpec:
    """One lab VM: its disks (the first boots) and its network cards' MACs, in order."""

    name: str
    disks: Sequence[VmDisk]
    macs: Sequence[str] = ()
    memory_mb: int = 256
    cpus: int = 1

    def __post_init__(self) -> None:
        check_vm_name(self.name)
        if not self.disks:
            raise ValueError(f"VM {self.name} has no disk")
        for mac in self.macs:
            if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1:
                raise ValueError(f"not a unicast MAC address in lower case: {mac!r}")


def _drive_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # qemu's option syntax escapes a comma by doubling it


def firmware_log_of(console: Path) -> Path:
    return console.with_name(console.name + ".firmware.log")


def qemu_messages_of(console: Path) -> Path:
    return console.with_name(console.name + ".qemu.log")


def serial_option(console: Path) -> str:
    """The ``-serial`` value that writes the serial console to ``console``."""
    return f"file:{_drive_path(console)}"


def control_dir_of(argv: Sequence[str]) -> Path | None:
    """The private directory of a lab qemu's QMP socket, from its command line (None when it has
    none): what is left to remove when a qemu that :meth:`RunningVM.stop` did not stop is gone."""
    for option, value in itertools.pairwise(argv):
        if option == "-qmp" and value.startswith("unix:") and value.endswith(_QMP_OPTIONS):
            socket = Path(value.removeprefix("unix:").removesuffix(_QMP_OPTIONS).replace(",,", ","))
            if socket.parent.name.startswith(CONTROL_DIR_PREFIX):
                return socket.parent
    return None


def qemu_command(spec: VmSpec, console: Path, accel: Accel, qmp: Path | None = None) -> list[str]:
    """The command line that runs ``spec`` with its serial console written to ``console``, the
    firmware's messages to :func:`firmware_log_of` ``console``, and QMP on the socket ``qmp``."""
    cmd = [
        QEMU,
        "-name", spec.name,
        "-machine", f"pc,accel={accel}",
        "-cpu", "qemu64",
        "-m", str(spec.memory_mb),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-serial", serial_option(console),
        "-chardev", f"file,id=firmware,path={_drive_path(firmware_log_of(console))}",
        "-device", f"isa-debugcon,iobase={SEABIOS_DEBUG_PORT},chardev=firmware",
    ]  # fmt: skip
    if qmp is not None:
        cmd += ["-qmp", f"unix:{_drive_path(qmp)}{_QMP_OPTIONS}"]
    for i, disk in enumerate(spec.disks):
        cmd += ["-drive", f"file={_drive_path(disk.path)},if=virtio,index={i},format={disk.format}"]
    for i, mac in enumerate(spec.macs):
        cmd += [
            "-netdev", f"user,id=nic{i},restrict=on",
            "-device", f"virtio-net-pci,netdev=nic{i},mac={mac},romfile=",
        ]  # fmt: skip
    return cmd


@dataclass
class RunningVM:
    """A qemu process running one lab VM. Use :meth:`start`; a context manager that stops it."""

    spec: VmSpec
    console: Path
    accel: Accel
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    #: A private directory holding the QMP socket; removed by :meth:`stop`.
    control_dir: Path
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls, spec: VmSpec, console: Path, *, accel: Accel | None = None, up_timeout: float = UP_TIMEOUT_S
    ) -> RunningVM:
        """Start ``spec`` and return once qemu is up (see the module doc); its serial console goes
        to ``console`` (replaced), the firmware's messages to ``console`` + ``.firmware.log``,
        qemu's own to ``console`` + ``.qemu.log``. ``accel`` None: KVM when the probe says it
        works. :class:`VmError` when qemu is missing, exits or is not up in ``up_timeout`` s."""
        for disk in spec.disks:
            if not disk.path.is_file():
                raise VmError(f"VM {spec.name}: no disk image {disk.path}")
        chosen = accel if accel is not None else accelerator()
        console.parent.mkdir(parents=True, exist_ok=True)
        console.write_bytes(b"")
        firmware_log_of(console).write_bytes(b"")
        stderr_path = qemu_messages_of(console)
        control_dir = Path(tempfile.mkdtemp(prefix=CONTROL_DIR_PREFIX))  # short: socket paths are <108 bytes
        try:
            with stderr_path.open("wb") as err:
                proc = subprocess.Popen(
                    qemu_command(spec, console, chosen, control_dir / "qmp.sock"),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
        except FileNotFoundError as e:
            shutil.rmtree(control_dir, ignore_errors=True)
            raise VmError(f"{QEMU} is not installed: install qemu-system-x86 (scripts/bootstrap.sh)") from e
        vm = cls(spec, console, chosen, proc, stderr_path, control_dir)
        try:
            vm._wait_up(up_timeout)
        except BaseException:
            vm.stop(timeout=1.0)
            raise
        log.info("lab VM %s started (qemu pid %d, %s)", spec.name, proc.pid, chosen)
        return vm

    def _wait_up(self, timeout: float) -> None:
        try:
            with Qmp.connect(self.control_dir / "qmp.sock", timeout, self.running) as qmp:
                status = qmp.execute("query-status")
        except QmpError as e:
            self.proc.poll()
            messages = self.qemu_messages().strip()
            if self.proc.returncode is not None:
                raise VmError(
                    f"qemu for {self.spec.name} exited ({self.proc.returncode}): {messages or e}"
                ) from None
            raise VmError(f"qemu for {self.spec.name} is not up: {e}; {messages}".rstrip("; ")) from e
        if status.get("status") != "running":
            raise VmError(f"qemu for {self.spec.name} is {status.get('status')}, not running")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def console_text(self) -> str:
        return self.console.read_bytes().decode(errors="replace")

    def qemu_messages(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace")

    def firmware_text(self) -> str:
        return firmware_log_of(self.console).read_bytes().decode(errors="replace")

    def process_ref(self) -> process.ProcessRef | None:
        """The qemu process as a durable reference (None once it is gone)."""
        return process.ProcessRef.of(self.proc.pid) if self.running() else None

    def wait_for_marker(self, timeout: float) -> BootMarker:
        """Block until the guest prints its boot line; :class:`BootTimeout` after ``timeout``
        seconds, :class:`NoBootableDisk` as soon as the firmware found nothing to boot,
        :class:`VmError` at once when qemu exits or reports a KVM failure,
        :class:`~lab.bootdisk.marker.GuestReportedError` when the guest printed its error line."""
        deadline = time.monotonic() + timeout
        while True:
            marker = find_marker(self.console_text(), self.spec.name)
            if marker is not None:
                return marker
            messages = self.qemu_messages()
            if not self.running():
                raise VmError(
                    f"qemu for {self.spec.name} exited ({self.proc.returncode}): {messages.strip()}"
                )
            if KVM_FAILURE in messages:
                raise VmError(f"qemu for {self.spec.name}: {messages.strip()[:500]}")
            if NO_BOOTABLE_DEVICE in self.firmware_text():
                boot_lines = [
                    line
                    for line in self.firmware_text().splitlines()
                    if line.startswith(("Booting from", "Boot failed", NO_BOOTABLE_DEVICE))
                ]
                raise NoBootableDisk(
                    f"VM {self.spec.name}: the firmware found no bootable disk ({'; '.join(boot_lines)})"
                )
            if time.monotonic() >= deadline:
                tail = "\n".join(self.console_text().splitlines()[-5:])
                raise BootTimeout(
                    f"VM {self.spec.name} printed no boot line in {timeout:.0f} s ({self.accel}); "
                    f"last console lines: {tail!r}"
                )
            time.sleep(_POLL_S)

    def stop(self, timeout: float = process.GRACE_S) -> None:
        """SIGTERM, ``timeout`` seconds to exit, then SIGKILL (at once for 0); reaped (blocking)."""
        if timeout <= 0 and self.proc.poll() is None:
            self.proc.kill()
        process.terminate(self.proc, timeout)
        shutil.rmtree(self.control_dir, ignore_errors=True)

    def __enter__(self) -> RunningVM:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class ProbeResult:
    accel: Accel
    reason: str
    seconds: float


_probe_lock = threading.Lock()
_probe_result: ProbeResult | None = None


def probe_kvm() -> ProbeResult:
    """Boot a tiny lab guest with KVM and tell whether its boot line appeared (not cached)."""
    began = time.monotonic()
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return ProbeResult("tcg", f"/dev/kvm: {e.strerror}", time.monotonic() - began)
    with tempfile.TemporaryDirectory(prefix="lab-kvm-probe-") as tmp:
        image = Path(tmp) / "probe.img"
        build_boot_disk(image, vm_name="kvm-probe", size=32 * 1024 * 1024, data=b"kvm probe\n")
        spec = VmSpec("kvm-probe", [VmDisk(image)])
        try:
            with RunningVM.start(spec, Path(tmp) / "console.log", accel="kvm") as vm:
                vm.wait_for_marker(PROBE_DEADLINE_S)
        except VmError as e:
            return ProbeResult("tcg", f"a KVM guest did not boot: {e}", time.monotonic() - began)
    return ProbeResult("kvm", "a KVM guest booted", time.monotonic() - began)


def accelerator() -> Accel:
    """KVM when a probe boot under KVM succeeded in this process, TCG otherwise (probed once)."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = probe_kvm()
            log.info(
                "lab VMs run under %s: %s (probe took %.1f s)",
                _probe_result.accel,
                _probe_result.reason,
                _probe_result.seconds,
            )
        return _probe_result.accel
