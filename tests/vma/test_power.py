# pyvmomi's data-object constructors are unannotated:
# mypy: disable-error-code="no-untyped-call"
"""``POST /api/v1/vms/{vm_id}/power-off`` and ``power-on`` (docs/vma.md, "Additions to the seed")
against the vSphere lab: after every call the VM's power state is read through pyvmomi, and
vCenter's events tell which way it went off (``VmGuestShutdownEvent`` for a guest shutdown,
``VmStoppingEvent`` for ``PowerOffVM_Task``).

What govmomi's simulator supports: lab VMs report VMware Tools not running (the forced path);
``SET.guest.toolsRunningStatus`` in a reconfiguration's extraConfig (the simulator's own switch)
makes them report Tools running, and ``ShutdownGuest`` then powers the VM off at once. A guest that
ignores the shutdown request does not exist there: that case replaces the VMA's ``ShutdownGuest``
call by one that asks nothing, and the rest runs against the simulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from pyVim.connect import Disconnect
from pyVmomi import vim

from lab import Lab, LabVM, MiB
from lab.vsphere import DiskSpec
from tests.vma.conftest import Vma, replicate_body
from vma.vsphere.client import VSphere

# -- the lab through pyvmomi (blocking; through trio.to_thread.run_sync) ------------------------------


def _with_vm(lab: Lab, moref: str, action: Callable[[Any, Any], Any]) -> Any:
    si = lab.connect()
    try:
        return action(si, vim.VirtualMachine(moref, si._stub))
    finally:
        Disconnect(si)


def _wait_task(task: Any) -> None:
    deadline = time.monotonic() + 30
    while str(task.info.state) not in ("success", "error"):
        assert time.monotonic() < deadline, "the lab's task did not end"
        time.sleep(0.05)
    assert str(task.info.state) == "success", task.info.error


async def power_state(lab: Lab, vm: LabVM) -> str:
    return str(await trio.to_thread.run_sync(_with_vm, lab, vm.moref, lambda si, v: v.runtime.powerState))


async def events(lab: Lab, vm: LabVM) -> list[str]:
    """The type names of the VM's events, oldest first."""

    def read(si: Any, v: Any) -> list[str]:
        by_entity = vim.event.EventFilterSpec.ByEntity(entity=v, recursion="self")
        spec = vim.event.EventFilterSpec(entity=by_entity)
        collector = si.content.eventManager.CreateCollectorForEvents(spec)
        try:
            page = collector.latestPage
            return [type(e).__name__.rsplit(".", 1)[-1] for e in sorted(page, key=lambda e: e.key)]
        finally:
            collector.DestroyCollector()

    out: list[str] = await trio.to_thread.run_sync(_with_vm, lab, vm.moref, read)
    return out


async def set_tools_running(lab: Lab, vm: LabVM) -> None:
    """Make the simulator report VMware Tools running in the VM's guest."""

    def reconfigure(si: Any, v: Any) -> None:
        tools = vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsRunning")
        spec = vim.vm.ConfigSpec(extraConfig=[tools])
        _wait_task(v.ReconfigVM_Task(spec))

    await trio.to_thread.run_sync(_with_vm, lab, vm.moref, reconfigure)


async def suspend(lab: Lab, vm: LabVM) -> None:
    await trio.to_thread.run_sync(_with_vm, lab, vm.moref, lambda si, v: _wait_task(v.SuspendVM_Task()))


def login(lab: Lab, **fields: Any) -> dict[str, Any]:
    return {"vcenter": lab.url, "username": lab.username, "password": lab.password, **fields}


async def power_off(vma: Vma, lab: Lab, vm_id: str, **fields: Any) -> Any:
    return await vma.post(f"/api/v1/vms/{vm_id}/power-off", login(lab, **fields))


async def power_on(vma: Vma, lab: Lab, vm_id: str, **fields: Any) -> Any:
    return await vma.post(f"/api/v1/vms/{vm_id}/power-on", login(lab, **fields))


@pytest.fixture
def vm2(lab: Lab) -> LabVM:
    return lab.create_vm("vm2", [DiskSpec(8 * MiB)])


# -- the tests ------------------------------------------------------------------------------------


async def test_power_off_without_tools_is_forced_and_both_calls_are_idempotent(
    vma: Vma, lab: Lab, vm2: LabVM
) -> None:
    assert await power_state(lab, vm2) == "poweredOn"
    r = await power_off(vma, lab, vm2.moref)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vm_id"] == vm2.moref and body["name"] == "vm2" and body["action"] == "power_off"
    assert body["status"] == "success" and body["outcome"] == "forced"
    assert (body["previous_power_state"], body["power_state"]) == ("poweredOn", "poweredOff")
    assert body["tools_running"] is False and body["guest_shutdown_attempted"] is False
    assert "VMware Tools are not running" in body["message"]
    assert await power_state(lab, vm2) == "poweredOff"
    assert "VmStoppingEvent" in await events(lab, vm2)
    assert "VmGuestShutdownEvent" not in await events(lab, vm2)

    again = await power_off(vma, lab, vm2.moref)  # a failover's retry
    assert again.status_code == 200, again.text
    assert again.json()["outcome"] == "already_off" and again.json()["power_state"] == "poweredOff"
    assert await power_state(lab, vm2) == "poweredOff"

    on = await power_on(vma, lab, vm2.moref)
    assert on.status_code == 200, on.text
    assert on.json()["outcome"] == "powered_on" and on.json()["action"] == "power_on"
    assert (on.json()["previous_power_state"], on.json()["power_state"]) == ("poweredOff", "poweredOn")
    assert await power_state(lab, vm2) == "poweredOn"
    on_again = await power_on(vma, lab, vm2.moref)
    assert on_again.status_code == 200 and on_again.json()["outcome"] == "already_on"
    assert await power_state(lab, vm2) == "poweredOn"


async def test_guest_shutdown_when_tools_run(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    await set_tools_running(lab, vm2)
    r = await power_off(vma, lab, vm2.moref, force=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outcome"] == "guest_shutdown" and body["guest_shutdown_attempted"] is True
    assert body["tools_running"] is True and body["power_state"] == "poweredOff"
    assert await power_state(lab, vm2) == "poweredOff"
    seen = await events(lab, vm2)
    assert "VmGuestShutdownEvent" in seen and "VmStoppingEvent" not in seen  # no hard power-off


async def test_no_guest_shutdown_asked_with_timeout_zero(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    await set_tools_running(lab, vm2)
    r = await power_off(vma, lab, vm2.moref, shutdown_timeout=0)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "forced" and r.json()["guest_shutdown_attempted"] is False
    assert await power_state(lab, vm2) == "poweredOff"
    assert "VmGuestShutdownEvent" not in await events(lab, vm2)


async def test_a_guest_that_ignores_the_shutdown(
    vma: Vma, lab: Lab, vm2: LabVM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request reaches no guest (one that hangs): after ``shutdown_timeout`` the VM is powered
    off hard, or with ``force`` false the answer is 504 and the VM stays on."""
    asked: list[str] = []
    monkeypatch.setattr(VSphere, "shutdown_guest", lambda self, vm: asked.append(vm._moId))
    await set_tools_running(lab, vm2)
    refused = await power_off(vma, lab, vm2.moref, force=False, shutdown_timeout=0.5)
    assert refused.status_code == 504, refused.text
    assert refused.json()["code"] == "OPERATION_FAILED"
    assert "did not shut down within 0.5 s" in refused.json()["error"]
    assert await power_state(lab, vm2) == "poweredOn"

    r = await power_off(vma, lab, vm2.moref, shutdown_timeout=0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outcome"] == "forced" and body["guest_shutdown_attempted"] is True
    assert "did not shut down within 0.5 s" in body["message"] and body["elapsed_seconds"] >= 0.5
    assert asked == [vm2.moref, vm2.moref]
    assert await power_state(lab, vm2) == "poweredOff"


async def test_force_false_without_tools_is_refused(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    r = await power_off(vma, lab, vm2.moref, force=False)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "OPERATION_FAILED" and "force: true" in r.json()["error"]
    assert await power_state(lab, vm2) == "poweredOn"


async def test_a_suspended_vm(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    await suspend(lab, vm2)
    on = await power_on(vma, lab, vm2.moref)  # resumes it
    assert on.status_code == 200, on.text
    assert on.json()["outcome"] == "powered_on" and on.json()["previous_power_state"] == "suspended"
    assert await power_state(lab, vm2) == "poweredOn"
    await suspend(lab, vm2)
    off = await power_off(vma, lab, vm2.moref)
    assert off.status_code == 200, off.text
    assert off.json()["outcome"] == "forced" and "suspended" in off.json()["message"]
    assert await power_state(lab, vm2) == "poweredOff"


async def test_unknown_vm_is_404(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    for vm_id in ("vm-999999", "host-21"):
        for call in (power_off, power_on):
            r = await call(vma, lab, vm_id)
            assert r.status_code == 404, (vm_id, r.text)
            assert r.json()["code"] == "VM_NOT_FOUND" and vm_id in r.json()["error"]


async def test_an_active_job_refuses_power_off_unless_final_pass(
    vma: Vma, lab: Lab, vm1: LabVM, vm2: LabVM
) -> None:
    """An export job holds vm1's snapshot until released: a running job of this VMA."""
    r = await vma.post("/api/v1/replicate", replicate_body(lab, "exp-power", mode="export"))
    assert r.status_code == 200, r.text
    await vma.wait_phase("exp-power", "exported")

    busy = await power_off(vma, lab, vm1.moref)
    assert busy.status_code == 409, busy.text
    assert busy.json()["code"] == "VM_BUSY" and busy.json()["active_jobs"] == ["exp-power"]
    assert "exp-power" in busy.json()["error"]
    assert await power_state(lab, vm1) == "poweredOn"

    other = await power_off(vma, lab, vm2.moref)  # the job is not on vm2
    assert other.status_code == 200 and other.json()["outcome"] == "forced", other.text

    final = await power_off(vma, lab, vm1.moref, final_pass=True)
    assert final.status_code == 200, final.text
    assert final.json()["outcome"] == "forced"
    assert await power_state(lab, vm1) == "poweredOff"
    # off already: a retry succeeds even while the job runs
    again = await power_off(vma, lab, vm1.moref)
    assert again.status_code == 200 and again.json()["outcome"] == "already_off", again.text
    # power-on is never refused for a job (rollback)
    on = await power_on(vma, lab, vm1.moref)
    assert on.status_code == 200 and on.json()["outcome"] == "powered_on", on.text

    released = await vma.post("/api/v1/cleanup", {"job_id": "exp-power", "action": "cleanup_all"})
    assert released.status_code == 200, released.text
    assert (await vma.wait_job("exp-power"))["status"] == "completed"
    done = await power_off(vma, lab, vm1.moref)  # a finished job no longer blocks
    assert done.status_code == 200 and done.json()["outcome"] == "forced", done.text


async def test_vcenter_refusing_the_login_is_502(vma: Vma, lab: Lab, vm2: LabVM) -> None:
    for call in (power_off, power_on):
        r = await call(vma, lab, vm2.moref, password="wrong")
        assert r.status_code == 502, r.text
        assert r.json()["code"] == "OPERATION_FAILED" and "refused the login" in r.json()["error"]
    assert await power_state(lab, vm2) == "poweredOn"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"force": "yes"}, "force must be true or false"),
        ({"final_pass": 1}, "final_pass must be true or false"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be a number"),
        ({"shutdown_timeout": 3601}, "shutdown_timeout must be a number"),
        ({"shutdown_timeout": True}, "shutdown_timeout must be a number"),
        ({"force": False, "shutdown_timeout": 0}, "leaves nothing to do"),
        ({"job_id": "x"}, "unknown field: job_id"),
        ({"tls_mode": "none"}, "tls_mode must be one of"),
    ],
)
async def test_power_off_request_validation(api: Vma, fields: dict[str, Any], message: str) -> None:
    r = await api.post(
        "/api/v1/vms/vm-1/power-off",
        {"vcenter": "127.0.0.1:9", "username": "u", "password": "p", **fields},
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_REQUEST" and message in r.json()["error"], r.text


async def test_power_request_validation(api: Vma) -> None:
    base = {"vcenter": "127.0.0.1:9", "username": "u", "password": "p"}
    r = await api.post("/api/v1/vms/vm-1/power-on", {**base, "force": True})
    assert r.status_code == 400 and "unknown field: force" in r.json()["error"], r.text
    r = await api.post("/api/v1/vms/vm-1/power-on", {"vcenter": "127.0.0.1:9"})
    assert r.status_code == 400 and "username is required" in r.json()["error"], r.text
    r = await api.post("/api/v1/vms/%2Evm/power-on", base)
    assert r.status_code == 400 and "vm_id must be" in r.json()["error"], r.text
    r = await api.get("/api/v1/vms/vm-1/power-on")
    assert r.status_code == 405 and r.json()["code"] == "INVALID_REQUEST", r.text
    # no vCenter answers there: 502, never 500
    r = await api.post("/api/v1/vms/vm-1/power-on", base)
    assert r.status_code == 502 and r.json()["code"] == "OPERATION_FAILED", r.text


async def test_openapi_documents_the_power_calls(api: Vma) -> None:
    doc = (await api.get("/api/v1/swagger/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    login = {"vcenter", "username", "password", "tls_mode", "tls_thumbprint"}
    for action, fields in (("power-off", {"force", "shutdown_timeout", "final_pass"}), ("power-on", set())):
        op = doc["paths"][f"/api/v1/vms/{{vm_id}}/{action}"]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        request = schemas[body["$ref"].rsplit("/", 1)[-1]] if "$ref" in body else body
        assert set(request["properties"]) == login | fields
        answer = op["responses"]["200"]["content"]["application/json"]["schema"]
        response = schemas[answer["$ref"].rsplit("/", 1)[-1]] if "$ref" in answer else answer
        assert {"vm_id", "outcome", "power_state", "message"} <= set(response["properties"])
        assert op["responses"]["404"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorEnvelope"
        }
