"""The lab CloudStack driven by the ``cs`` library, as the OMA drives CloudStack: lists (paged),
a volume created, attached (the guest's device appears), polled through its job, detached and
deleted, and the errors cs raises for CloudStack's answers, over GET and POST."""

from __future__ import annotations

import pytest
import trio
from cs import CloudStack, CloudStackApiException

from .cloudstack_fixtures import (
    API_KEY,
    OMA_VM,
    SECRET_KEY,
    SMALL,
    ZONE1,
    ZONE2,
    CloudStackLab,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
)


def oma_like_session(lab: CloudStackLab, method: str) -> None:
    api = CloudStack(
        endpoint=lab.url, key=API_KEY, secret=SECRET_KEY, method=method, poll_interval=0.05, job_timeout=30
    )
    zones = api.listZones(fetch_list=True)
    assert {z["id"] for z in zones} == {ZONE1, ZONE2}
    assert api.listServiceOfferings(fetch_list=True)
    assert {n["zoneid"] for n in api.listNetworks(zoneid=ZONE1, fetch_list=True)} == {ZONE1}
    oma = next(
        vm
        for vm in api.listVirtualMachines(fetch_list=True)
        if any(nic["macaddress"] == "02:00:4f:4d:41:01" for nic in vm["nic"])
    )
    assert oma["id"] == OMA_VM

    volume = api.createVolume(
        name=f"replica-{method}", zoneid=ZONE1, diskofferingid=SMALL, fetch_result=True
    )["volume"]
    assert volume["state"] == "Allocated"
    attached = api.attachVolume(id=volume["id"], virtualmachineid=OMA_VM, fetch_result=True)["volume"]
    assert attached["virtualmachineid"] == OMA_VM and attached["state"] == "Ready"
    assert lab.link(volume["id"]).is_symlink()
    listed = api.listVolumes(virtualmachineid=OMA_VM, type="DATADISK", fetch_list=True)
    assert [v["id"] for v in listed] == [volume["id"]]

    # CloudStack's errors, as cs reports them
    with pytest.raises(CloudStackApiException) as twice:
        api.attachVolume(id=volume["id"], virtualmachineid=OMA_VM, fetch_result=True)
    assert twice.value.error == {
        "errorcode": 431,
        "errortext": "Please specify a volume that is not attached to any VM.",
    }
    with pytest.raises(CloudStackApiException) as missing:
        api.attachVolume(id=volume["id"])
    assert missing.value.response.status_code == 431
    assert missing.value.error["errortext"].endswith("due to missing parameter virtualmachineid")
    with pytest.raises(CloudStackApiException) as tilde:  # cs signs ~ unencoded: CloudStack refuses
        api.listVolumes(name="replica~1")
    assert tilde.value.response.status_code == 401

    detached = api.detachVolume(id=volume["id"], fetch_result=True)["volume"]
    assert "virtualmachineid" not in detached
    assert not lab.link(volume["id"]).exists()
    assert api.deleteVolume(id=volume["id"]) == {"success": True}
    assert api.listVolumes(id=volume["id"]) == {}


@pytest.mark.parametrize("method", ["get", "post"])
async def test_cs_drives_the_double_as_the_oma_would(cloudstack: CloudStackLab, method: str) -> None:
    await trio.to_thread.run_sync(oma_like_session, cloudstack, method)
    assert (await cloudstack.state())["pending_jobs"] == []


async def test_cs_pages_through_a_long_list(cloudstack: CloudStackLab) -> None:
    for i in range(5):
        await cloudstack.new_volume(name=f"paged-{i}")

    def list_all() -> list[str]:
        api = CloudStack(endpoint=cloudstack.url, key=API_KEY, secret=SECRET_KEY)
        return [v["name"] for v in api.listVolumes(type="DATADISK", pagesize=2, fetch_list=True)]

    assert await trio.to_thread.run_sync(list_all) == [f"paged-{i}" for i in range(5)]
