"""The lab CloudStack's fault injection (``/lab/faults``) and state view (``/lab/state``)."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from lab.cloudstack.app import create_app

from .cloudstack_fixtures import (
    OMA_VM,
    SMALL,
    ZONE1,
    CloudStackLab,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
    lab_settings,
)


async def test_error_fault_answers_the_next_calls(cloudstack: CloudStackLab) -> None:
    added = await cloudstack.fault(
        command="listVolumes", mode="error", times=2, errorcode=503, errortext="busy"
    )
    assert added.status_code == 201
    assert added.json()["pending"][0]["command"] == "listVolumes"
    for _ in range(2):
        response = await cloudstack.call("listVolumes")
        assert response.status_code == 503
        assert response.json() == {
            "listvolumesresponse": {
                "uuidList": [],
                "errorcode": 503,
                "cserrorcode": 9999,
                "errortext": "busy",
            }
        }
    assert (await cloudstack.call("listVolumes")).status_code == 200
    assert (await cloudstack.http.get(f"{cloudstack.base}/lab/faults")).json() == {"pending": []}


async def test_error_fault_counts_only_verified_calls(cloudstack: CloudStackLab) -> None:
    await cloudstack.fault(command="listZones", mode="error")
    unsigned = await cloudstack.send({"command": "listZones", "response": "json"})
    assert unsigned.status_code == 401
    assert (await cloudstack.call("listZones")).status_code == 530
    assert (await cloudstack.call("listZones")).status_code == 200


async def test_job_failure_fault(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.fault(command="attachVolume", mode="job_failure", errorcode=530, errortext="agent lost")
    failed = await cloudstack.run("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert failed["jobstatus"] == 2 and failed["jobresultcode"] == 530
    assert failed["jobresult"] == {"errorcode": 530, "errortext": "agent lost"}
    listed = (await cloudstack.api("listVolumes", id=volume["id"]))["volume"][0]
    assert listed["state"] == "Allocated" and "virtualmachineid" not in listed  # nothing changed
    assert not cloudstack.link(volume["id"]).exists()
    assert (await cloudstack.run("attachVolume", id=volume["id"], virtualmachineid=OMA_VM))["jobstatus"] == 1


async def test_job_failure_of_a_create_leaves_the_allocated_object(cloudstack: CloudStackLab) -> None:
    await cloudstack.fault(command="createVolume", mode="job_failure")
    accepted = await cloudstack.api("createVolume", name="half", zoneid=ZONE1, diskofferingid=SMALL)
    assert (await cloudstack.job(accepted["jobid"]))["jobstatus"] == 2
    assert (await cloudstack.api("listVolumes", id=accepted["id"]))["volume"][0]["state"] == "Allocated"


async def test_delay_fault(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.fault(command="attachVolume", mode="delay", seconds=2.0)
    started = trio.current_time()
    accepted = await cloudstack.api("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    await trio.sleep(0.3)
    assert (await cloudstack.api("queryAsyncJobResult", jobid=accepted["jobid"]))["jobstatus"] == 0
    assert (await cloudstack.job(accepted["jobid"]))["jobstatus"] == 1
    assert trio.current_time() - started >= 2.0


async def test_drop_device_link_fault(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.fault(command="attachVolume", mode="drop_device_link")
    attached = await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert attached["volume"]["virtualmachineid"] == OMA_VM  # attached, as far as CloudStack knows
    assert not cloudstack.link(volume["id"]).exists()  # but the guest never saw it
    await cloudstack.ok("detachVolume", id=volume["id"])
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert cloudstack.link(volume["id"]).is_symlink()


async def test_bad_fault_requests(cloudstack: CloudStackLab) -> None:
    for fault in (
        {"command": "listVolumes", "mode": "explode"},
        {"command": "listHosts", "mode": "error"},
        {"command": "listVolumes", "mode": "job_failure"},
        {"command": "detachVolume", "mode": "drop_device_link"},
        {"command": "listVolumes", "mode": "error", "errorcode": 200},
        {"command": "listVolumes", "mode": "error", "colour": "red"},
    ):
        response = await cloudstack.fault(**fault)
        assert response.status_code == 400, fault
        assert response.json()["error"]
    not_json = await cloudstack.http.post(f"{cloudstack.base}/lab/faults", content=b"{")
    assert not_json.status_code == 400
    await cloudstack.fault(command="listVolumes", mode="error")
    cleared = await cloudstack.http.delete(f"{cloudstack.base}/lab/faults")
    assert cleared.json() == {"pending": []}
    assert (await cloudstack.call("listVolumes")).status_code == 200


async def test_lab_state_shows_what_is_left(cloudstack: CloudStackLab) -> None:
    before = await cloudstack.state()
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    during = await cloudstack.state()
    assert {v["id"] for v in during["volumes"]} - {v["id"] for v in before["volumes"]} == {volume["id"]}
    assert volume["id"] in during["files"]["primary"]
    await cloudstack.ok("detachVolume", id=volume["id"])
    await cloudstack.api("deleteVolume", id=volume["id"])
    after = await cloudstack.state()
    assert after["volumes"] == before["volumes"] and after["files"] == before["files"]
    assert after["device_links"] == before["device_links"] and after["pending_jobs"] == []


async def test_lab_endpoints_answer_loopback_only(tmp_path: Path) -> None:
    app = create_app(lab_settings(tmp_path / "cs"))
    client = app.test_client()
    remote = {"client": ("192.0.2.10", 40000)}
    for path in ("/lab/state", "/lab/faults", f"/lab/vms/{OMA_VM}/console"):
        response = await client.get(path, scope_base=remote)
        assert response.status_code == 403
    posted = await client.post(
        "/lab/faults", data=json.dumps({"command": "listZones", "mode": "error"}), scope_base=remote
    )
    assert posted.status_code == 403
    local = await client.get("/lab/faults", scope_base={"client": ("127.0.0.1", 40000)})
    assert local.status_code == 200
