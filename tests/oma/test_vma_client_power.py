# pyvmomi's data-object constructors are unannotated:
# mypy: disable-error-code="no-untyped-call"
"""The OMA's typed power calls (:meth:`VmaClient.power_off`, :meth:`VmaClient.power_on`) against a
real VMA on the vSphere lab, signed as the OMA signs every VMA request; the VM's power state read
back through pyvmomi."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypedDict

import httpx
import pytest
import trio
from pyVim.connect import Disconnect
from pyVmomi import vim

from lab import Lab, LabVM, MiB
from lab.vsphere import DiskSpec
from oma.vma_client import PowerResult, VmaClient, VmaRequestFailed, VmaVmBusy, VmaVmNotFound
from tests.vma.conftest import vma_config
from vma.server import serve_vma


class Login(TypedDict):
    vcenter: str
    username: str
    password: str


def lab_login(lab: Lab, password: str | None = None) -> Login:
    return {"vcenter": lab.url, "username": lab.username, "password": password or lab.password}


def _power_state(lab: Lab, moref: str) -> str:
    si = lab.connect()
    try:
        return str(vim.VirtualMachine(moref, si._stub).runtime.powerState)
    finally:
        Disconnect(si)


async def power_state(lab: Lab, vm: LabVM) -> str:
    state: str = await trio.to_thread.run_sync(_power_state, lab, vm.moref)
    return state


@pytest.fixture
def vm2(lab: Lab) -> LabVM:
    return lab.create_vm("vm2", [DiskSpec(8 * MiB)])


@pytest.fixture
async def client(tmp_path: Path, lab: Lab, nursery: trio.Nursery) -> AsyncIterator[VmaClient]:
    """The OMA's client of a real VMA (no OMA behind it: power calls never call the OMA)."""
    config = vma_config(tmp_path, lab, None)
    url: str = await nursery.start(
        lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
    )
    async with httpx.AsyncClient(timeout=30) as http:
        yield VmaClient(http, url, config.oma_secret_file)


async def test_power_off_and_on_through_the_oma_client(client: VmaClient, lab: Lab, vm2: LabVM) -> None:
    login = lab_login(lab)
    off = await client.power_off(vm2.moref, **login, shutdown_timeout=5)
    assert isinstance(off, PowerResult)
    assert (off.vm_id, off.name, off.action, off.outcome) == (vm2.moref, "vm2", "power_off", "forced")
    assert off.previous_power_state == "poweredOn" and off.power_state == "poweredOff"
    assert await power_state(lab, vm2) == "poweredOff"
    assert (await client.power_off(vm2.moref, **login)).outcome == "already_off"

    on = await client.power_on(vm2.moref, **login)
    assert (on.action, on.outcome, on.power_state) == ("power_on", "powered_on", "poweredOn")
    assert await power_state(lab, vm2) == "poweredOn"
    assert (await client.power_on(vm2.moref, **login)).outcome == "already_on"

    with pytest.raises(VmaVmNotFound) as missing:
        await client.power_on("vm-999999", **login)
    assert missing.value.status == 404 and missing.value.code == "VM_NOT_FOUND"
    with pytest.raises(VmaRequestFailed) as refused:
        await client.power_off(vm2.moref, **login, force=False)  # no VMware Tools in the lab's guest
    assert refused.value.status == 409 and refused.value.code == "OPERATION_FAILED"
    with pytest.raises(VmaRequestFailed) as bad_login:
        await client.power_off(vm2.moref, **lab_login(lab, "wrong"))
    assert bad_login.value.status == 502
    assert await power_state(lab, vm2) == "poweredOn"


async def test_power_off_refused_while_an_export_runs(client: VmaClient, lab: Lab, vm1: LabVM) -> None:
    login = lab_login(lab)
    disks = {"/DC0/vm/vm1": [f"disk-{vm1.disks[0].key}"]}
    await client.export(job_id="exp-oma-power", **login, disks=disks, previous_change_ids={})
    with trio.fail_after(30):
        while (await client.status("exp-oma-power")).get("phase") != "exported":
            await trio.sleep(0.05)
    with pytest.raises(VmaVmBusy) as busy:
        await client.power_off(vm1.moref, **login)
    assert busy.value.status == 409 and busy.value.active_jobs == ["exp-oma-power"]
    assert await power_state(lab, vm1) == "poweredOn"
    final = await client.power_off(vm1.moref, **login, final_pass=True)
    assert final.outcome == "forced" and await power_state(lab, vm1) == "poweredOff"
    await client.cleanup("exp-oma-power")
