"""Powering a source VM off and on: the live failover's cut-over and its rollback (the VMA's
additions to the seed, docs/vma.md "Additions to the seed").

Power-off, in the order an operator expects:

1. the VM is off already: success, ``already_off`` (a failover that retries gets the same answer);
2. unless the caller is the failover's final pass (``final_pass``), a job of this VMA that is not
   finished and copies or exports this VM (same vCenter, one of its ``vm_paths`` is this VM now)
   refuses the power-off (:class:`VmBusy`): the OMA decides whether to wait for it or stop it;
3. the VM is on and VMware Tools run in its guest: ``ShutdownGuest``, then the power state is
   polled until the VM is off or ``shutdown_timeout`` has passed (``guest_shutdown``);
4. still on (no Tools, suspended, the guest refused or was too slow, or ``shutdown_timeout`` 0):
   ``PowerOffVM_Task`` when ``force`` allows it (``forced``), else :class:`PowerOffRefused`.

Power-on: ``already_on``, or ``PowerOnVM_Task`` (``powered_on``; a suspended VM resumes).

The job check reads the tracker at the time of the request: a job started after it is not seen
(the OMA starts the jobs, and its failover validates that none runs before it powers off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import trio

from vma.replication.jobs import Job
from vma.vsphere.client import VCenterLogin, VmPower, VSphere, VSphereError, run

log = logging.getLogger(__name__)

#: Seconds between two reads of the power state while the guest shuts down.
SHUTDOWN_POLL = 1.0

Outcome = Literal["already_off", "guest_shutdown", "forced", "already_on", "powered_on"]


@dataclass(frozen=True)
class PowerOffOptions:
    #: Power off hard when the guest could not (or would not in time) shut down itself.
    force: bool = True
    #: Seconds the guest may take to shut down (0: no guest shutdown, straight to ``force``).
    shutdown_timeout: float = 120.0
    #: The caller is the live failover's final pass: active jobs on the VM do not block it.
    final_pass: bool = False


@dataclass(frozen=True)
class PowerResult:
    """What a power call did: the API's answer (``as_dict``), documented as it is in the OpenAPI
    document."""

    vm_id: str
    name: str
    action: Literal["power_off", "power_on"]
    outcome: Outcome
    previous_power_state: str
    power_state: str
    tools_running: bool
    guest_shutdown_attempted: bool
    elapsed_seconds: float
    message: str
    status: Literal["success"] = "success"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class VmBusy(Exception):
    """Jobs of this VMA copy or export the VM (the API answers 409)."""

    def __init__(self, vm: VmPower, job_ids: list[str]) -> None:
        super().__init__(
            f"{vm.name} ({vm.vm_id}) has active jobs on this VMA: {', '.join(job_ids)};"
            " wait for them or stop them (POST /api/v1/cleanup), or send final_pass: true"
            " when this is a live failover whose final pass follows"
        )
        self.job_ids = job_ids


class PowerOffRefused(Exception):
    """The VM is still on and ``force`` was false: the guest could not shut down (409: no VMware
    Tools, suspended) or did not in time (504)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _same_vcenter(a: VCenterLogin, b: VCenterLogin) -> bool:
    _, host_a, port_a = a.endpoint()
    _, host_b, port_b = b.endpoint()
    return (host_a.lower(), port_a) == (host_b.lower(), port_b)


def jobs_on_vm(vs: VSphere, jobs: Iterable[Job], vm_id: str) -> list[str]:
    """Ids of the jobs not finished that work on the VM ``vm_id`` of ``vs``'s vCenter: each job's
    ``vm_paths`` resolved now, as the job resolved them. Blocking: call through :func:`run`."""
    busy = []
    for job in jobs:
        if job.finished or not _same_vcenter(job.login, vs.login):
            continue
        for path in job.vm_paths:
            try:
                found = vs.find_vm(path)
            except VSphereError:
                continue  # gone or renamed: not this VM
            if found._moId == vm_id:
                busy.append(job.job_id)
                break
    return busy


async def power_off(
    login: VCenterLogin, vm_id: str, options: PowerOffOptions, jobs: Iterable[Job], *, insecure: bool
) -> PowerResult:
    """Power the VM off as the module doc says. Raises :class:`~vma.vsphere.client.VmNotFound`,
    :class:`VmBusy`, :class:`PowerOffRefused`, or :class:`VSphereError` when vCenter fails."""
    started = time.monotonic()
    vs = await run(VSphere.connect, login, insecure=insecure)
    try:
        vm = await run(vs.vm_by_id, vm_id)
        before = await run(vs.vm_power, vm)

        def result(outcome: Outcome, after: VmPower, attempted: bool, message: str) -> PowerResult:
            return PowerResult(
                vm_id=vm_id,
                name=before.name,
                action="power_off",
                outcome=outcome,
                previous_power_state=before.power_state,
                power_state=after.power_state,
                tools_running=before.tools_running,
                guest_shutdown_attempted=attempted,
                elapsed_seconds=round(time.monotonic() - started, 3),
                message=message,
            )

        label = f"{before.name} ({vm_id})"
        if before.power_state == "poweredOff":
            return result("already_off", before, False, f"{label} was already powered off")
        if not options.final_pass:
            busy = await run(jobs_on_vm, vs, list(jobs), vm_id)
            if busy:
                raise VmBusy(before, busy)
        guest = await _shut_down_guest(vs, vm, before, options.shutdown_timeout)
        if not guest.off and not options.force:
            raise PowerOffRefused(
                f"{label} is still {before.power_state}: {guest.reason};"
                " send force: true to power it off hard",
                504 if guest.timed_out else 409,
            )
        # False: the VM went off meanwhile (a guest that ended its shutdown just after the
        # deadline, or someone else): nothing was forced.
        forced = not guest.off and await run(vs.power_off_vm, vm)
        after = await run(vs.vm_power, vm)
        if forced:
            return result("forced", after, guest.attempted, f"{label} powered off hard: {guest.reason}")
        if guest.attempted:
            seconds = time.monotonic() - started
            return result("guest_shutdown", after, True, f"the guest of {label} shut down in {seconds:.1f} s")
        return result("already_off", after, False, f"{label} was powered off meanwhile")
    finally:
        await run(vs.disconnect)


@dataclass(frozen=True)
class GuestShutdown:
    """How asking the guest to shut down went: ``off``, or why not (``reason``)."""

    off: bool
    attempted: bool = False
    reason: str = ""
    timed_out: bool = False


async def _shut_down_guest(vs: VSphere, vm: object, before: VmPower, within: float) -> GuestShutdown:
    """Ask the guest to shut down when it can, and wait up to ``within`` s for the VM to be off."""
    if before.power_state != "poweredOn":
        return GuestShutdown(False, reason=f"it is {before.power_state}, so its guest cannot shut down")
    if not before.tools_running:
        return GuestShutdown(
            False, reason="VMware Tools are not running in its guest, so it cannot shut down by itself"
        )
    if within <= 0:
        return GuestShutdown(False, reason="shutdown_timeout 0: no guest shutdown asked")
    try:
        await run(vs.shutdown_guest, vm)
    except VSphereError as e:
        log.warning("%s", e, extra={"action": "guest_shutdown", "vm": before.vm_id})
        return GuestShutdown(False, attempted=True, reason=str(e))
    with trio.move_on_after(within):
        # vCenter tells nothing when the guest is done: its power state is read until it is off.
        while (await run(vs.vm_power, vm)).power_state != "poweredOff":  # noqa: ASYNC110
            await trio.sleep(SHUTDOWN_POLL)
        return GuestShutdown(True, attempted=True)
    return GuestShutdown(
        False, attempted=True, reason=f"the guest did not shut down within {within:g} s", timed_out=True
    )


async def power_on(login: VCenterLogin, vm_id: str, *, insecure: bool) -> PowerResult:
    """Power the VM on (``already_on`` when it is). Raises
    :class:`~vma.vsphere.client.VmNotFound` or :class:`VSphereError`."""
    started = time.monotonic()
    vs = await run(VSphere.connect, login, insecure=insecure)
    try:
        vm = await run(vs.vm_by_id, vm_id)
        before = await run(vs.vm_power, vm)
        done = await run(vs.power_on_vm, vm)
        after = await run(vs.vm_power, vm)
    finally:
        await run(vs.disconnect)
    label = f"{before.name} ({vm_id})"
    return PowerResult(
        vm_id=vm_id,
        name=before.name,
        action="power_on",
        outcome="powered_on" if done else "already_on",
        previous_power_state=before.power_state,
        power_state=after.power_state,
        tools_running=after.tools_running,
        guest_shutdown_attempted=False,
        elapsed_seconds=round(time.monotonic() - started, 3),
        message=f"{label} powered on" if done else f"{label} was already powered on",
    )
