"""The lab cloud's one KVM host: a ``qemu-system-x86_64`` process for every running user VM.

Where CloudStack's KVM agent turns a ``StartCommand`` into a libvirt domain, the double starts the
VM under qemu through :class:`lab.bootdisk.RunningVM` (``docs/lab-boot.md``): the VM's volume files
as virtio disks in device-id order (ROOT, device 0, first), a virtio network card per NIC with the
NIC's MAC on qemu's user-mode network (``restrict=on``: the guest reaches nothing outside), machine
``pc``, CPU ``qemu64``, the offering's memory and CPUs, KVM only when a probe boot under KVM
succeeded in this process and TCG otherwise. A start returns once qemu is up (its QMP socket
answered); it does not wait for the guest, which may not even boot.

What the guest prints on its serial console goes to ``<data-dir>/guests/<vm uuid>.console``
(SeaBIOS's own messages to ``….console.firmware.log``, qemu's to ``….console.qemu.log``), kept
after the VM stops and removed when it is expunged; the lab-only endpoint
``GET /lab/vms/<id>/console`` answers it.

The host lives as long as the double: :meth:`Host.stop_all` stops every qemu when the double
stops. A double that was killed leaves its qemus behind; the next start finds them by the process
reference each running VM keeps in the state (PID and start time, :class:`pyapp.process.ProcessRef`,
checked against the VM's console path in the qemu command line) and stops them
(:func:`stop_leftover`): the host went down, and its VMs with it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from lab.bootdisk import RunningVM, VmSpec
from lab.bootdisk.qemu import control_dir_of, firmware_log_of, qemu_messages_of, serial_option
from pyapp import process

log = logging.getLogger(__name__)

#: How long qemu has to exit after SIGTERM before it is killed (a stop that is not forced).
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class Guest:
    vm_id: str
    running: RunningVM


class Host:
    """The qemu processes of the running user VMs, by VM UUID. Starting and stopping block (qemu
    is started and reaped by :class:`RunningVM`): they run in threads under a limiter."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / "guests"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.guests: dict[str, Guest] = {}
        self._limiter = trio.CapacityLimiter(4)

    def console(self, vm_id: str) -> Path:
        return self.directory / f"{vm_id}.console"

    def firmware_log(self, vm_id: str) -> Path:
        return firmware_log_of(self.console(vm_id))

    async def start(self, vm_id: str, spec: VmSpec) -> Guest:
        """Start ``spec`` as the VM ``vm_id``; returns once qemu is up. Raises
        :class:`lab.bootdisk.VmError` (qemu's message) when it is not."""
        if vm_id in self.guests:
            raise RuntimeError(f"VM {vm_id} already has a qemu (pid {self.guests[vm_id].running.pid})")
        running = await trio.to_thread.run_sync(
            lambda: RunningVM.start(spec, self.console(vm_id)), limiter=self._limiter
        )
        guest = Guest(vm_id, running)
        self.guests[vm_id] = guest
        return guest

    async def stop(self, vm_id: str, *, forced: bool = False) -> None:
        """Stop the VM's qemu: SIGTERM and :data:`STOP_GRACE_S` to exit, then SIGKILL; SIGKILL at
        once when ``forced``. Reaped either way; nothing to do for a VM without one."""
        guest = self.guests.pop(vm_id, None)
        if guest is None:
            return
        grace = 0.0 if forced else STOP_GRACE_S
        await trio.to_thread.run_sync(guest.running.stop, grace, limiter=self._limiter)
        log.info("VM %s: qemu (pid %d) stopped%s", vm_id, guest.running.pid, " (forced)" if forced else "")

    def exited(self) -> list[Guest]:
        """The guests whose qemu exited on its own (the guest powered off, or qemu died)."""
        return [g for g in self.guests.values() if not g.running.running()]

    async def forget(self, guest: Guest) -> None:
        """Drop a guest whose qemu exited (reaped, its QMP directory removed)."""
        if self.guests.get(guest.vm_id) is guest:
            await self.stop(guest.vm_id)

    async def stop_all(self) -> None:
        """Stop every qemu this host started (the double is stopping)."""
        async with trio.open_nursery() as nursery:
            for vm_id in list(self.guests):
                nursery.start_soon(self.stop, vm_id)

    def remove_files(self, vm_id: str) -> None:
        """The VM's console and logs (it was expunged)."""
        for path in (self.console(vm_id), self.firmware_log(vm_id), qemu_messages_of(self.console(vm_id))):
            path.unlink(missing_ok=True)

    def describe(self) -> dict[str, dict[str, Any]]:
        """For ``GET /lab/state``: every running qemu by VM UUID."""
        return {
            vm_id: {
                "pid": g.running.pid,
                "process": str(g.running.process_ref() or ""),
                "accel": g.running.accel,
                "console": str(g.running.console),
                "disks": [str(d.path) for d in g.running.spec.disks],
                "macs": list(g.running.spec.macs),
            }
            for vm_id, g in self.guests.items()
        }


def stop_leftover(reference: str, console: Path) -> bool:
    """Stop the qemu a previous run of the double left running for the VM whose console is
    ``console``, named by ``reference`` (``pid@start``). Only a process that is still that very
    one and runs qemu with that console is signalled. True when one was stopped. Blocking."""
    ref = process.ProcessRef.parse(reference)
    if ref is None or not ref.alive():
        return False
    argv = process.cmdline(ref.pid)
    if serial_option(console) not in argv:
        return False
    log.warning("stopping qemu pid %d left running by a previous run of the double", ref.pid)
    stopped = ref.terminate(STOP_GRACE_S)
    qmp = control_dir_of(argv)
    if qmp is not None:
        shutil.rmtree(qmp, ignore_errors=True)
    return stopped
