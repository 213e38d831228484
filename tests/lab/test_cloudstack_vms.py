"""Virtual machines in the lab CloudStack: deploy with NICs, start/stop, destroy with expunge,
update, and the OMA VM whose guest sees attached volumes."""

from __future__ import annotations

from pathlib import Path

import trio

from .cloudstack_fixtures import (
    ISOLATED,
    MEDIUM_SO,
    OMA_VM,
    SEED,
    SHARED,
    TEMPLATE,
    ZONE1,
    CloudStackLab,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
    start_lab,
)

DEPLOY = {"zoneid": ZONE1, "serviceofferingid": MEDIUM_SO, "templateid": TEMPLATE}


async def test_deploy_stopped_vm_with_nics(cloudstack: CloudStackLab) -> None:
    accepted = await cloudstack.api(
        "deployVirtualMachine",
        **DEPLOY,
        name="web-1",
        startvm="false",
        **{
            "iptonetworklist[0].networkid": ISOLATED,
            "iptonetworklist[0].ip": "10.1.1.50",
            "iptonetworklist[0].mac": "02:AA:BB:CC:DD:01",
            "iptonetworklist[1].networkid": SHARED,
        },
    )
    assert set(accepted) == {"id", "jobid"}
    job = await cloudstack.job(accepted["jobid"])
    vm = job["jobresult"]["virtualmachine"]
    assert vm["id"] == accepted["id"] and vm["state"] == "Stopped" and vm["name"] == "web-1"
    assert vm["cpunumber"] == 2 and vm["memory"] == 2048 and vm["hypervisor"] == "KVM"
    first, second = vm["nic"]
    assert first["isdefault"] and first["networkid"] == ISOLATED
    assert first["ipaddress"] == "10.1.1.50" and first["macaddress"] == "02:aa:bb:cc:dd:01"
    assert first["gateway"] == "10.1.1.1" and first["netmask"] == "255.255.255.0"
    assert (
        not second["isdefault"]
        and second["networkid"] == SHARED
        and second["ipaddress"].startswith("192.168.100.")
    )
    nics = await cloudstack.api("listNics", virtualmachineid=vm["id"])
    assert nics["count"] == 2 and [n["macaddress"] for n in nics["nic"]] == [
        n["macaddress"] for n in vm["nic"]
    ]
    root = (await cloudstack.api("listVolumes", virtualmachineid=vm["id"]))["volume"]
    assert [(v["type"], v["deviceid"], v["state"]) for v in root] == [("ROOT", 0, "Ready")]
    assert root[0]["name"].startswith("ROOT-")
    assert cloudstack.volume_file(root[0]["id"]).stat().st_size == SEED.templates[0].size
    assert not cloudstack.link(root[0]["id"]).exists()  # only the OMA's guest has a device root


async def test_deploy_with_ipaddress_macaddress_and_a_data_disk(cloudstack: CloudStackLab) -> None:
    small = next(o.id for o in SEED.diskofferings if o.name == "Small")
    vm = (
        await cloudstack.ok(
            "deployVirtualMachine",
            **DEPLOY,
            networkids=ISOLATED,
            ipaddress="10.1.1.77",
            macaddress="02:00:00:00:00:77",
            diskofferingid=small,
            rootdisksize="2",
        )
    )["virtualmachine"]
    assert vm["state"] == "Running"
    assert vm["nic"][0]["ipaddress"] == "10.1.1.77" and vm["nic"][0]["macaddress"] == "02:00:00:00:00:77"
    volumes = (await cloudstack.api("listVolumes", virtualmachineid=vm["id"]))["volume"]
    assert [(v["type"], v["deviceid"], v["size"]) for v in volumes] == [
        ("ROOT", 0, 2 << 30),
        ("DATADISK", 1, 5 << 30),
    ]


async def test_deploy_refusals(cloudstack: CloudStackLab) -> None:
    no_network = await cloudstack.call("deployVirtualMachine", **DEPLOY)
    assert no_network.status_code == 431  # zone 1 has two isolated networks: which one?
    assert "please specify networkIds" in no_network.json()["deployvirtualmachineresponse"]["errortext"]
    taken = await cloudstack.call(
        "deployVirtualMachine", **DEPLOY, networkids=ISOLATED, ipaddress="10.1.1.10"
    )
    assert taken.status_code == 533  # the OMA VM's address
    assert taken.json()["deployvirtualmachineresponse"]["cserrorcode"] == 4320
    outside = await cloudstack.call(
        "deployVirtualMachine", **DEPLOY, networkids=ISOLATED, ipaddress="10.7.7.7"
    )
    assert outside.status_code == 431
    for mac in ("02:00:00:00:00", "03:00:00:00:00:01", "02:00:4f:4d:41:01"):  # short, multicast, the OMA's
        bad = await cloudstack.call("deployVirtualMachine", **DEPLOY, networkids=ISOLATED, macaddress=mac)
        assert bad.status_code == 431, mac
    name = await cloudstack.call("deployVirtualMachine", **DEPLOY, networkids=ISOLATED, name="9-bad_name")
    assert name.status_code == 431
    assert (await cloudstack.api("listVirtualMachines"))["count"] == 1  # nothing was allocated


async def test_start_stop(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm(startvm="false")
    started = await cloudstack.ok("startVirtualMachine", id=vm["id"])
    assert started["virtualmachine"]["state"] == "Running"
    again = await cloudstack.ok("startVirtualMachine", id=vm["id"])  # already running: succeeds
    assert again["virtualmachine"]["state"] == "Running"
    stopped = await cloudstack.ok("stopVirtualMachine", id=vm["id"])
    assert stopped["virtualmachine"]["state"] == "Stopped"
    listed = await cloudstack.api("listVirtualMachines", state="Stopped")
    assert [v["id"] for v in listed["virtualmachine"]] == [vm["id"]]


async def test_destroy_with_expunge_keeps_data_volumes_detached(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm()
    root = (await cloudstack.api("listVolumes", virtualmachineid=vm["id"]))["volume"][0]
    keep = await cloudstack.new_volume(name="keep")
    drop = await cloudstack.new_volume(name="drop")
    for vol in (keep, drop):
        await cloudstack.ok("attachVolume", id=vol["id"], virtualmachineid=vm["id"])
    result = await cloudstack.ok("destroyVirtualMachine", id=vm["id"], expunge="true", volumeids=drop["id"])
    assert result["virtualmachine"]["id"] == vm["id"]
    assert (await cloudstack.api("listVirtualMachines", id=vm["id"])) == {}
    kept = (await cloudstack.api("listVolumes", id=keep["id"]))["volume"][0]
    assert kept["state"] == "Ready" and "virtualmachineid" not in kept and "deviceid" not in kept
    assert cloudstack.volume_file(keep["id"]).exists()
    assert await cloudstack.api("listVolumes", id=root["id"]) == {}
    assert not cloudstack.volume_file(root["id"]).exists()
    assert await cloudstack.api("listVolumes", id=drop["id"]) == {}
    assert not cloudstack.volume_file(drop["id"]).exists()
    gone = await cloudstack.run("startVirtualMachine", id=vm["id"])  # the UUID still parses: job fails
    assert gone["jobstatus"] == 2 and gone["jobresultcode"] == 431


async def test_destroy_without_expunge(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm()
    data = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=data["id"], virtualmachineid=vm["id"])
    destroyed = await cloudstack.ok("destroyVirtualMachine", id=vm["id"])
    assert destroyed["virtualmachine"]["state"] == "Destroyed"
    volumes = {
        v["type"]: v for v in (await cloudstack.api("listVolumes", virtualmachineid=vm["id"]))["volume"]
    }
    assert volumes["ROOT"]["state"] == "Destroy" and volumes["DATADISK"]["vmstate"] == "Destroyed"
    await cloudstack.ok("detachVolume", id=data["id"])  # allowed from a Destroyed VM
    refused = await cloudstack.run("attachVolume", id=data["id"], virtualmachineid=vm["id"])
    assert refused["jobresult"]["errortext"] == "Please specify a VM that is either running or stopped."


async def test_update_virtual_machine(cloudstack: CloudStackLab) -> None:
    vm = await cloudstack.new_vm()
    updated = await cloudstack.api(
        "updateVirtualMachine", id=vm["id"], displayname="Web One", haenable="true"
    )
    assert (
        updated["virtualmachine"]["displayname"] == "Web One"
        and updated["virtualmachine"]["haenable"] is True
    )
    running = await cloudstack.call("updateVirtualMachine", id=vm["id"], name="web-one")
    assert running.status_code == 431
    await cloudstack.ok("stopVirtualMachine", id=vm["id"])
    renamed = await cloudstack.api("updateVirtualMachine", id=vm["id"], name="web-one")
    assert renamed["virtualmachine"]["name"] == "web-one"
    assert (await cloudstack.api("listVirtualMachines", name="web-o"))["virtualmachine"][0]["id"] == vm["id"]


async def test_the_oma_vm(tmp_path: Path, nursery: trio.Nursery) -> None:
    lab = await start_lab(nursery, tmp_path / "cs", oma_mac="02:00:0A:0B:0C:0D", oma_ip="10.1.1.99")
    vms = (await lab.api("listVirtualMachines"))["virtualmachine"]
    assert len(vms) == 1 and vms[0]["id"] == OMA_VM and vms[0]["state"] == "Running"
    assert (
        vms[0]["nic"][0]["macaddress"] == "02:00:0a:0b:0c:0d" and vms[0]["nic"][0]["ipaddress"] == "10.1.1.99"
    )
    root = (await lab.api("listVolumes", virtualmachineid=OMA_VM))["volume"][0]
    assert lab.link(root["id"]).is_symlink()  # the guest sees its root disk by id too
    data = await lab.new_volume()
    await lab.ok("attachVolume", id=data["id"], virtualmachineid=OMA_VM)
    await lab.ok("stopVirtualMachine", id=OMA_VM)
    assert not lab.link(data["id"]).exists() and not lab.link(root["id"]).exists()
    await lab.ok("startVirtualMachine", id=OMA_VM)
    assert lab.link(data["id"]).is_symlink() and lab.link(root["id"]).is_symlink()
    await lab.http.aclose()
