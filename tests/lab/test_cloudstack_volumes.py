"""Volumes in the lab CloudStack: async jobs, CloudStack's attach/detach/delete rules, device ids,
the volume limit, raw files in primary storage and the OMA guest's disk/by-id links."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from .cloudstack_fixtures import (
    CUSTOM,
    OMA_VM,
    SMALL,
    ZONE1,
    ZONE2,
    ZONE2_NET,
    CloudStackLab,
    GiB,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
    read_at,
    seed_with,
    start_lab,
    write_at,
)


async def test_async_job_lifecycle(tmp_path: Path, nursery: trio.Nursery) -> None:
    lab = await start_lab(nursery, tmp_path / "cs", job_delay=2.0)  # long enough to look
    accepted = await lab.api("createVolume", name="slow", zoneid=ZONE1, diskofferingid=SMALL)
    assert set(accepted) == {"id", "jobid"}  # a create command answers the new object's id too
    pending = await lab.api("queryAsyncJobResult", jobid=accepted["jobid"])
    assert pending["jobstatus"] == 0 and "jobresult" not in pending
    assert pending["jobinstanceid"] == accepted["id"] and pending["jobinstancetype"] == "Volume"
    listed = await lab.api("listVolumes", id=accepted["id"])  # the volume exists while the job runs
    assert listed["volume"][0]["state"] == "Allocated"
    assert listed["volume"][0]["jobid"] == accepted["jobid"]
    done = await lab.job(accepted["jobid"])
    assert done["jobstatus"] == 1 and done["jobresultcode"] == 0 and done["jobresulttype"] == "object"
    assert done["jobresult"]["volume"]["id"] == accepted["id"]
    assert done["cmd"].endswith("CreateVolumeCmdByAdmin")
    attach = await lab.api("attachVolume", id=accepted["id"], virtualmachineid=OMA_VM)
    assert set(attach) == {"jobid"}
    await lab.http.aclose()


async def test_create_volume_is_allocated_until_attached(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    assert volume["state"] == "Allocated" and volume["size"] == 5 * GiB and volume["type"] == "DATADISK"
    assert "virtualmachineid" not in volume and "deviceid" not in volume
    assert not cloudstack.volume_file(volume["id"]).exists()
    attached = (await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM))["volume"]
    assert (
        attached["state"] == "Ready" and attached["virtualmachineid"] == OMA_VM and attached["deviceid"] == 1
    )
    path = cloudstack.volume_file(volume["id"])
    assert path.stat().st_size == 5 * GiB and path.stat().st_blocks == 0  # raw, sparse


async def test_custom_size_disk_offering(cloudstack: CloudStackLab) -> None:
    volume = (await cloudstack.ok("createVolume", name="c", zoneid=ZONE1, diskofferingid=CUSTOM, size="3"))[
        "volume"
    ]
    assert volume["size"] == 3 * GiB
    missing = await cloudstack.call("createVolume", name="c", zoneid=ZONE1, diskofferingid=CUSTOM)
    assert missing.status_code == 431
    assert (
        missing.json()["createvolumeresponse"]["errortext"]
        == "This disk offering requires a custom size specified"
    )
    huge = await cloudstack.call("createVolume", name="c", zoneid=ZONE1, diskofferingid=CUSTOM, size="5000")
    assert huge.status_code == 431
    assert "out of allowed range" in huge.json()["createvolumeresponse"]["errortext"]
    no_offering = await cloudstack.call("createVolume", name="c", zoneid=ZONE1)
    assert no_offering.status_code == 431


async def test_device_links_appear_and_disappear(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    link = cloudstack.link(volume["id"])
    assert not link.exists()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert link.is_symlink() and Path(os.readlink(link)) == cloudstack.volume_file(volume["id"]).resolve()
    assert len(link.name) == len("virtio-") + 20
    write_at(link, 4096, b"written through the device")  # the "device" is the volume's file
    assert read_at(cloudstack.volume_file(volume["id"]), 4096, 26) == b"written through the device"
    await cloudstack.ok("detachVolume", id=volume["id"])
    assert not link.exists() and not link.is_symlink()
    state = await cloudstack.state()
    assert f"virtio-{volume['id'].replace('-', '')[:20]}" not in state["device_links"]


async def test_device_ids_skip_the_cdrom_slot(cloudstack: CloudStackLab) -> None:
    ids = []
    volumes = [await cloudstack.new_volume(name=f"d{i}") for i in range(4)]
    for vol in volumes:
        ids.append(
            (await cloudstack.ok("attachVolume", id=vol["id"], virtualmachineid=OMA_VM))["volume"]["deviceid"]
        )
    assert ids == [1, 2, 4, 5]
    await cloudstack.ok("detachVolume", id=volumes[1]["id"])
    again = await cloudstack.ok("attachVolume", id=volumes[1]["id"], virtualmachineid=OMA_VM)
    assert again["volume"]["deviceid"] == 2  # the lowest free id
    extra = await cloudstack.new_volume(name="explicit")
    cdrom = await cloudstack.run("attachVolume", id=extra["id"], virtualmachineid=OMA_VM, deviceid="3")
    assert cdrom["jobstatus"] == 2
    assert cdrom["jobresult"] == {"errorcode": 530, "errortext": "deviceId should be 0,1,2,4-33"}
    taken = await cloudstack.run("attachVolume", id=extra["id"], virtualmachineid=OMA_VM, deviceid="4")
    assert taken["jobstatus"] == 2 and "deviceId 4 is used" in taken["jobresult"]["errortext"]
    chosen = await cloudstack.ok("attachVolume", id=extra["id"], virtualmachineid=OMA_VM, deviceid="9")
    assert chosen["volume"]["deviceid"] == 9


async def test_attach_rules(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    twice = await cloudstack.run("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert twice["jobstatus"] == 2 and twice["jobresultcode"] == 431
    assert twice["jobresult"] == {
        "errorcode": 431,
        "errortext": "Please specify a volume that is not attached to any VM.",
    }
    other_zone = await cloudstack.new_volume(name="z2", zoneid=ZONE2)
    refused = await cloudstack.run("attachVolume", id=other_zone["id"], virtualmachineid=OMA_VM)
    assert refused["jobresult"] == {
        "errorcode": 431,
        "errortext": "Please specify a VM that is in the same zone as the volume.",
    }
    assert (await cloudstack.api("listVolumes", id=other_zone["id"]))["volume"][0]["state"] == "Allocated"


async def test_a_volume_attached_elsewhere_cannot_be_attached(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm(startvm="false")
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=vm["id"])
    assert not cloudstack.link(volume["id"]).exists()  # not the OMA's guest
    stolen = await cloudstack.run("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert stolen["jobstatus"] == 2 and stolen["jobresultcode"] == 431
    assert (await cloudstack.api("listVolumes", id=volume["id"]))["volume"][0]["virtualmachineid"] == vm["id"]


async def test_attached_volume_cannot_be_deleted(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    refused = await cloudstack.call("deleteVolume", id=volume["id"])
    assert refused.status_code == 431
    assert refused.json()["deletevolumeresponse"]["errortext"] == (
        "Please specify a volume that is not attached to any VM."
    )
    await cloudstack.ok("detachVolume", id=volume["id"])
    assert await cloudstack.api("deleteVolume", id=volume["id"]) == {"success": True}
    assert not cloudstack.volume_file(volume["id"]).exists()
    assert await cloudstack.api("listVolumes", id=volume["id"]) == {}
    again = await cloudstack.call("deleteVolume", id=volume["id"])  # removed: known UUID, gone volume
    assert again.status_code == 431
    assert again.json()["deletevolumeresponse"]["errortext"].startswith("Unable to find volume with ID")


async def test_detach_rules(cloudstack: CloudStackLab) -> None:
    loose = await cloudstack.new_volume()
    result = await cloudstack.run("detachVolume", id=loose["id"])
    assert result["jobresult"] == {
        "errorcode": 431,
        "errortext": "The specified volume is not attached to a VM.",
    }
    neither = await cloudstack.run("detachVolume")
    assert (
        neither["jobresult"]["errortext"]
        == "Please provide either a volume id, or a tuple(device id, instance id)"
    )
    await cloudstack.ok("attachVolume", id=loose["id"], virtualmachineid=OMA_VM)
    by_slot = await cloudstack.ok("detachVolume", virtualmachineid=OMA_VM, deviceid="1")
    assert by_slot["volume"]["id"] == loose["id"] and "virtualmachineid" not in by_slot["volume"]


async def test_root_volume_detaches_and_reattaches_only_while_stopped(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm()
    assert vm["state"] == "Running"
    root = (await cloudstack.api("listVolumes", virtualmachineid=vm["id"], type="ROOT"))["volume"][0]
    assert root["deviceid"] == 0
    running = await cloudstack.run("detachVolume", id=root["id"])
    assert running["jobresult"] == {
        "errorcode": 431,
        "errortext": "Root volume detach can happen only when vm is in states: Stopped or Destroyed",
    }
    await cloudstack.ok("stopVirtualMachine", id=vm["id"])
    await cloudstack.ok("detachVolume", id=root["id"])
    rootless = await cloudstack.run("startVirtualMachine", id=vm["id"])  # qemu needs a boot disk
    assert rootless["jobresult"] == {
        "errorcode": 431,
        "errortext": f"Unable to start VM {vm['name']}: it has no ROOT volume",
    }
    listed = (await cloudstack.api("listVirtualMachines", id=vm["id"]))["virtualmachine"][0]
    assert listed["state"] == "Stopped"
    back = await cloudstack.ok("attachVolume", id=root["id"], virtualmachineid=vm["id"], deviceid="0")
    assert back["volume"]["deviceid"] == 0
    await cloudstack.ok("startVirtualMachine", id=vm["id"])
    second = await cloudstack.new_volume()
    refused = await cloudstack.run("attachVolume", id=second["id"], virtualmachineid=vm["id"], deviceid="0")
    assert refused["jobresultcode"] == 431
    await cloudstack.ok("stopVirtualMachine", id=vm["id"])
    twice = await cloudstack.run("attachVolume", id=second["id"], virtualmachineid=vm["id"], deviceid="0")
    assert twice["jobresult"]["errortext"] == "Vm already has root volume attached to it"


async def test_per_vm_volume_limit(tmp_path: Path, nursery: trio.Nursery) -> None:
    seed = seed_with(hypervisorcapabilities={"KVM": {"maxdatavolumeslimit": 3}})
    lab = await start_lab(nursery, tmp_path / "cs", seed=seed)
    volumes = [await lab.new_volume(name=f"v{i}") for i in range(4)]
    ids = [
        (await lab.ok("attachVolume", id=v["id"], virtualmachineid=OMA_VM))["volume"]["deviceid"]
        for v in volumes[:3]
    ]
    assert ids == [1, 2, 4]
    full = await lab.run("attachVolume", id=volumes[3]["id"], virtualmachineid=OMA_VM)
    assert full["jobresult"] == {
        "errorcode": 431,
        "errortext": "The specified VM already has the maximum number of data disks (3) attached."
        " Please specify another VM.",
    }
    await lab.http.aclose()


async def test_default_limit_is_kvms_32(cloudstack: CloudStackLab) -> None:
    volumes = [await cloudstack.new_volume(name=f"v{i}") for i in range(33)]
    device_ids = []
    for vol in volumes[:32]:
        attached = await cloudstack.ok("attachVolume", id=vol["id"], virtualmachineid=OMA_VM)
        device_ids.append(attached["volume"]["deviceid"])
    assert device_ids == [1, 2, *range(4, 34)]
    full = await cloudstack.run("attachVolume", id=volumes[32]["id"], virtualmachineid=OMA_VM)
    assert "maximum number of data disks (32)" in full["jobresult"]["errortext"]
    assert len((await cloudstack.state())["device_links"]) == 33  # 32 data disks and the root disk


async def test_create_volume_with_a_vm_attaches_it(cloudstack: CloudStackLab) -> None:
    result = await cloudstack.ok("createVolume", name="direct", diskofferingid=SMALL, virtualmachineid=OMA_VM)
    assert result["volume"]["zoneid"] == ZONE1 and result["volume"]["deviceid"] == 1
    assert cloudstack.link(result["volume"]["id"]).exists()
    zone2_vm = await cloudstack.new_vm(zoneid=ZONE2, networkids=ZONE2_NET)
    wrong_zone = await cloudstack.run("createVolume", name="x", diskofferingid=SMALL, zoneid=ZONE1,
                                      virtualmachineid=zone2_vm["id"])  # fmt: skip
    assert (
        wrong_zone["jobresult"]["errortext"] == "Please specify a VM that is in the same zone as the volume."
    )
