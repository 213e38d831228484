"""CloudStack's JSON, as its serializer writes it.

``ApiResponseSerializer.toJSONSerializedString`` wraps every answer in ``{"<command>response": ...}``:

* a list: ``{"count": N, "<object name>": [...]}``, and an empty list as ``{}`` (no count at all;
  a page past the end of a non-empty list is ``{"count": N}``);
* one object: ``{"<object name>": {...}}`` (``{"virtualmachine": {...}}``);
* a success without an object: ``{"success": true}``;
* an async job's acceptance: ``{"jobid": ...}``, plus ``"id"`` for create commands;
* an error: ``{"uuidList": [], "errorcode": N, "cserrorcode": M, "errortext": ...}``.

Inside ``queryAsyncJobResult`` the job's result is ``{"<object name>": {...}}``,
``{"success": true}`` or, for a failed job, ``{"errorcode": N, "errortext": ...}``
(``ResponseObjectTypeAdapter``). Fields whose value would be null are left out, as Gson does.
The objects carry the fields a client of the product reads, with CloudStack's names.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import TYPE_CHECKING, Any

from .state import Job, Nic, Snapshot, VirtualMachine, Volume

if TYPE_CHECKING:
    from .cloud import Cloud
    from .seed import DiskOffering, Network, ServiceOffering, Template, Zone

#: When the seeded objects were "created" (they exist before the double starts).
SEED_CREATED = "2024-01-01T00:00:00+0000"

_OFFERING_NAMES = {
    "Isolated": "DefaultIsolatedNetworkOfferingWithSourceNatService",
    "Shared": "DefaultSharedNetworkOffering",
    "L2": "DefaultL2NetworkOffering",
}


def list_response(object_name: str, items: list[dict[str, Any]], count: int | None = None) -> dict[str, Any]:
    """A list answer: ``count`` is every match, ``items`` the page shown. A page past the end
    has the count alone; nothing at all is ``{}``."""
    total = len(items) if count is None else count
    if not total:
        return {}
    if not items:
        return {"count": total}
    return {"count": total, object_name: items}


def error_body(code: int, text: str, cs_error_code: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"uuidList": [], "errorcode": code}
    if cs_error_code is not None:
        body["cserrorcode"] = cs_error_code
    body["errortext"] = text
    return body


def _owner(cloud: Cloud) -> dict[str, Any]:
    seed = cloud.seed
    return {"account": seed.account.name, "domainid": seed.domain.id, "domain": seed.domain.name}


def _pending_job(cloud: Cloud, object_id: str) -> dict[str, Any]:
    job = cloud.pending_job_for(object_id)
    return {"jobid": job.id, "jobstatus": job.status} if job is not None else {}


def zone(cloud: Cloud, z: Zone) -> dict[str, Any]:
    return {
        "id": z.id,
        "name": z.name,
        "dns1": z.dns1,
        "internaldns1": z.dns1,
        "networktype": "Advanced",
        "securitygroupsenabled": False,
        "allocationstate": "Enabled",
        "dhcpprovider": "VirtualRouter",
        "localstorageenabled": False,
        "type": "Core",
        "tags": [],
        "hasannotations": False,
    }


def domain(cloud: Cloud) -> dict[str, Any]:
    d = cloud.seed.domain
    return {
        "id": d.id,
        "name": d.name,
        "level": 0,
        "haschild": False,
        "path": "ROOT",
        "state": "Active",
        "hasannotations": False,
    }


def account(cloud: Cloud) -> dict[str, Any]:
    a, d = cloud.seed.account, cloud.seed.domain
    user = {
        "id": a.userid,
        "username": a.username,
        "account": a.name,
        "accounttype": 1,
        "roletype": "Admin",
        "domainid": d.id,
        "domain": d.name,
        "state": "enabled",
        "created": SEED_CREATED,
    }
    return {
        "id": a.id,
        "name": a.name,
        "accounttype": 1,
        "roletype": "Admin",
        "rolename": "Root Admin",
        "domainid": d.id,
        "domain": d.name,
        "domainpath": "ROOT",
        "state": "enabled",
        "isdefault": True,
        "created": SEED_CREATED,
        "user": [user],
    }


def capabilities(cloud: Cloud) -> dict[str, Any]:
    seed = cloud.seed
    return {
        "cloudstackversion": seed.cloudstackversion,
        "securitygroupsenabled": False,
        "dynamicrolesenabled": True,
        "userpublictemplateenabled": True,
        "supportELB": "false",
        "projectinviterequired": False,
        "allowusercreateprojects": True,
        "customdiskofferingminsize": seed.config_int("custom.diskoffering.size.min", 1),
        "customdiskofferingmaxsize": seed.config_int("custom.diskoffering.size.max", 1024),
        "regionsecondaryenabled": False,
        "kvmsnapshotenabled": seed.config_bool("kvm.snapshot.enabled"),
        "allowuserviewdestroyedvm": False,
        "allowuserexpungerecovervm": False,
        "allowuserexpungerecovervolume": False,
        "defaultuipagesize": 20,
    }


def service_offering(cloud: Cloud, o: ServiceOffering) -> dict[str, Any]:
    return {
        "id": o.id,
        "name": o.name,
        "displaytext": o.displaytext,
        "cpunumber": o.cpunumber,
        "cpuspeed": o.cpuspeed,
        "memory": o.memory,
        "created": SEED_CREATED,
        "storagetype": "shared",
        "provisioningtype": "thin",
        "offerha": False,
        "limitcpuuse": False,
        "isvolatile": False,
        "issystem": False,
        "defaultuse": False,
        "iscustomized": False,
        "cacheMode": "none",
        "dynamicscalingenabled": True,
        "diskofferingstrictness": False,
        "hasannotations": False,
    }


def disk_offering(cloud: Cloud, o: DiskOffering) -> dict[str, Any]:
    return {
        "id": o.id,
        "name": o.name,
        "displaytext": o.displaytext,
        "disksize": o.disksize,
        "created": SEED_CREATED,
        "iscustomized": o.iscustomized,
        "storagetype": "shared",
        "provisioningtype": "thin",
        "displayoffering": True,
        "cacheMode": "none",
        "encrypt": False,
        "disksizestrictness": False,
        "hasannotations": False,
    }


def network(cloud: Cloud, n: Network) -> dict[str, Any]:
    offering = _OFFERING_NAMES[n.type]
    out: dict[str, Any] = {
        "id": n.id,
        "name": n.name,
        "displaytext": n.displaytext,
        "broadcastdomaintype": "Vlan",
        "traffictype": "Guest",
        "zoneid": n.zoneid,
        "zonename": cloud.zones[n.zoneid].name,
        "networkofferingid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"lab-cloudstack:{offering}")),
        "networkofferingname": offering,
        "networkofferingdisplaytext": offering,
        "networkofferingavailability": "Optional",
        "issystem": False,
        "state": "Implemented" if n.type == "Isolated" else "Setup",
        "related": n.id,
        "type": n.type,
        "acltype": "Account" if n.type != "Shared" else "Domain",
        **_owner(cloud),
        "dns1": cloud.zones[n.zoneid].dns1,
        "restartrequired": False,
        "specifyipranges": n.type == "Shared",
        "canusefordeploy": True,
        "ispersistent": False,
        "displaynetwork": True,
        "service": [],
        "tags": [],
        "hasannotations": False,
    }
    if n.vlan:
        out["vlan"] = n.vlan
        out["broadcasturi"] = f"vlan://{n.vlan}"
    if n.cidr:
        net = ipaddress.IPv4Network(n.cidr)
        out.update(cidr=n.cidr, gateway=n.gateway, netmask=str(net.netmask))
    return out


def template_entries(cloud: Cloud, t: Template, zone_id: str | None) -> list[dict[str, Any]]:
    """A template's answer: one entry per zone it is in (``template_view`` joins the zones)."""
    zones = [z for z in cloud.zones.values() if cloud.template_in_zone(t, z.id) and zone_id in (None, z.id)]
    return [
        {
            "id": t.id,
            "name": t.name,
            "displaytext": t.displaytext,
            "ispublic": True,
            "created": SEED_CREATED,
            "isready": True,
            "passwordenabled": False,
            "format": t.format,
            "isfeatured": True,
            "crossZones": t.zoneid is None,
            "ostypename": t.ostypename,
            **_owner(cloud),
            "zoneid": z.id,
            "zonename": z.name,
            "status": "Download Complete",
            "size": t.size,
            "templatetype": "USER",
            "hypervisor": "KVM",
            "isextractable": False,
            "bootable": True,
            "sshkeyenabled": False,
            "isdynamicallyscalable": False,
            "directdownload": False,
            "deployasis": False,
            "requireshvm": True,
            "tags": [],
            "hasannotations": False,
        }
        for z in zones
    ]


def nic(cloud: Cloud, n: Nic) -> dict[str, Any]:
    net = cloud.networks[n.networkid]
    out: dict[str, Any] = {
        "id": n.id,
        "networkid": net.id,
        "networkname": net.name,
        "traffictype": "Guest",
        "type": net.type,
        "isdefault": n.isdefault,
        "macaddress": n.macaddress,
        "deviceid": str(n.deviceid),
        "extradhcpoption": [],
        "secondaryip": [],
    }
    if net.vlan:
        out["broadcasturi"] = out["isolationuri"] = f"vlan://{net.vlan}"
    if n.ipaddress and net.cidr:
        out.update(
            ipaddress=n.ipaddress, gateway=net.gateway, netmask=str(ipaddress.IPv4Network(net.cidr).netmask)
        )
    return out


def virtual_machine(cloud: Cloud, vm: VirtualMachine) -> dict[str, Any]:
    offering = cloud.service_offerings[vm.serviceofferingid]
    template = cloud.templates[vm.templateid]
    out: dict[str, Any] = {
        "id": vm.id,
        "name": vm.name,
        "displayname": vm.displayname,
        **_owner(cloud),
        "userid": cloud.seed.account.userid,
        "username": cloud.seed.account.username,
        "created": vm.created,
        "state": vm.state,
        "haenable": vm.haenable,
        "zoneid": vm.zoneid,
        "zonename": cloud.zones[vm.zoneid].name,
        "templateid": template.id,
        "templatename": template.name,
        "templatedisplaytext": template.displaytext,
        "passwordenabled": False,
        "serviceofferingid": offering.id,
        "serviceofferingname": offering.name,
        "cpunumber": offering.cpunumber,
        "cpuspeed": offering.cpuspeed,
        "memory": offering.memory,
        "osdisplayname": template.ostypename,
        "rootdeviceid": 0,
        "rootdevicetype": "ROOT",
        "securitygroup": [],
        "nic": [nic(cloud, n) for n in vm.nics],
        "hypervisor": "KVM",
        "instancename": vm.instancename,
        "details": {},
        "affinitygroup": [],
        "displayvm": True,
        "isdynamicallyscalable": False,
        "tags": [],
        "hasannotations": False,
    }
    out.update(_pending_job(cloud, vm.id))
    return out


def volume(cloud: Cloud, v: Volume) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v.id,
        "name": v.name,
        "zoneid": v.zoneid,
        "zonename": cloud.zones[v.zoneid].name,
        "type": v.type,
        "provisioningtype": "thin",
        "size": v.size,
        "created": v.created,
        "state": v.state,
        **_owner(cloud),
        "storagetype": "shared",
        "hypervisor": "KVM",
        "destroyed": v.state == "Destroy",
        "isextractable": False,
        "displayvolume": True,
        "quiescevm": False,
        "supportsstoragesnapshot": False,
        "tags": [],
        "hasannotations": False,
    }
    if v.diskofferingid is not None:
        offering = cloud.disk_offerings[v.diskofferingid]
        out.update(
            diskofferingid=offering.id,
            diskofferingname=offering.name,
            diskofferingdisplaytext=offering.displaytext,
        )
    if v.templateid is not None:
        out["templateid"] = v.templateid
        out["templatename"] = cloud.templates[v.templateid].name
    if v.path is not None:
        out.update(
            path=v.path, storage="lab-primary", storageid=str(uuid.uuid5(uuid.NAMESPACE_URL, "lab-primary"))
        )
    vm = cloud.vm(v.virtualmachineid)
    if vm is not None:
        out.update(
            virtualmachineid=vm.id,
            vmname=vm.name,
            vmdisplayname=vm.displayname,
            vmstate=vm.state,
            vmtype="User",
            deviceid=v.deviceid,
            attached=v.attached,
        )
    out.update(_pending_job(cloud, v.id))
    return out


def snapshot(cloud: Cloud, s: Snapshot) -> dict[str, Any]:
    vol = cloud.state.volumes.get(s.volumeid)
    out: dict[str, Any] = {
        "id": s.id,
        "name": s.name,
        **_owner(cloud),
        "snapshottype": "MANUAL",
        "intervaltype": "MANUAL",
        "volumeid": s.volumeid,
        "created": s.created,
        "state": s.state,
        "zoneid": s.zoneid,
        "zonename": cloud.zones[s.zoneid].name,
        "physicalsize": s.physicalsize,
        "virtualsize": s.virtualsize,
        "revertable": s.state == "BackedUp",
        "locationtype": "SECONDARY",
        "tags": [],
        "hasannotations": False,
    }
    if vol is not None:
        out.update(volumename=vol.name, volumetype=vol.type, volumestate=vol.state)
    out.update(_pending_job(cloud, s.id))
    return out


def job(cloud: Cloud, j: Job) -> dict[str, Any]:
    """queryAsyncJobResult's answer (``AsyncJobResponse``)."""
    out: dict[str, Any] = {
        "accountid": cloud.seed.account.id,
        "account": cloud.seed.account.name,
        "domainid": cloud.seed.domain.id,
        "domainpath": "ROOT",
        "userid": cloud.seed.account.userid,
        "cmd": j.cmd,
        "jobstatus": j.status,
        "jobprocstatus": 0,
        "jobresultcode": j.resultcode,
    }
    if j.status != 0:
        out["jobresulttype"] = "object"
        out["jobresult"] = j.result or {}
    if j.instancetype is not None:
        out["jobinstancetype"] = j.instancetype
    if j.instanceid is not None:
        out["jobinstanceid"] = j.instanceid
    out["created"] = j.created
    if j.completed is not None:
        out["completed"] = j.completed
    out["jobid"] = j.id
    return out
