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

Stopping
    SIGTERM (qemu shuts the VM down and exits), then SIGKILL after a grace period, always reaped
    (:func:`pyapp.process.terminate`).
"""

from __future__ import annotations

import logging
import os
import re
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

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]
DiskFormat = Literal["raw", "qcow2"]
#: How long the KVM probe waits for its guest's boot line (a KVM boot takes about a second).
PROBE_DEADLINE_S = 20.0
#: What qemu prints when KVM cannot run the guest: the probe stops waiting at once.
KVM_FAILURE = "KVM internal error"
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_POLL_S = 0.05


class VmError(RuntimeError):
    """A lab VM did not start, exited, or did not boot in time."""


class BootTimeout(VmError):
    """No boot line within the deadline: the disk does not boot (or boots too slowly)."""


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


def qemu_command(spec: VmSpec, console: Path, accel: Accel) -> list[str]:
    """The command line that runs ``spec`` with its serial console written to ``console``."""
    cmd = [
        QEMU,
        "-name", spec.name,
        "-machine", f"pc,accel={accel}",
        "-cpu", "qemu64",
        "-m", str(spec.memory_mb),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-serial", f"file:{_drive_path(console)}",
    ]  # fmt: skip
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
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, spec: VmSpec, console: Path, *, accel: Accel | None = None) -> RunningVM:
        """Start ``spec``; its serial console goes to ``console`` (replaced), qemu's own messages
        to ``console`` + ``.qemu.log``. ``accel`` None: KVM when the probe says it works."""
        for disk in spec.disks:
            if not disk.path.is_file():
                raise VmError(f"VM {spec.name}: no disk image {disk.path}")
        chosen = accel if accel is not None else accelerator()
        console.parent.mkdir(parents=True, exist_ok=True)
        console.write_bytes(b"")
        stderr_path = console.with_name(console.name + ".qemu.log")
        with stderr_path.open("wb") as err:
            try:
                proc = subprocess.Popen(
                    qemu_command(spec, console, chosen),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            except FileNotFoundError as e:
                raise VmError(
                    f"{QEMU} is not installed: install qemu-system-x86 (scripts/bootstrap.sh)"
                ) from e
        log.info("lab VM %s started (qemu pid %d, %s)", spec.name, proc.pid, chosen)
        return cls(spec, console, chosen, proc, stderr_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def console_text(self) -> str:
        return self.console.read_bytes().decode(errors="replace")

    def qemu_messages(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace")

    def wait_for_marker(self, timeout: float) -> BootMarker:
        """Block until the guest prints its boot line; :class:`BootTimeout` after ``timeout``
        seconds, :class:`VmError` at once when qemu exits or reports a KVM failure,
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
            if time.monotonic() >= deadline:
                tail = "\n".join(self.console_text().splitlines()[-5:])
                raise BootTimeout(
                    f"VM {self.spec.name} printed no boot line in {timeout:.0f} s ({self.accel}); "
                    f"last console lines: {tail!r}"
                )
            time.sleep(_POLL_S)

    def stop(self, timeout: float = process.GRACE_S) -> None:
        """SIGTERM, ``timeout`` seconds to exit, then SIGKILL; reaped (blocking)."""
        process.terminate(self.proc, timeout)

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
        with RunningVM.start(spec, Path(tmp) / "console.log", accel="kvm") as vm:
            try:
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
