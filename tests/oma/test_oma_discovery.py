"""Discovery through the VMA's /api/v1/discover: contexts persisted, no job created."""

from __future__ import annotations

from oma_harness import Oma
from test_oma_auth import assert_envelope
from test_oma_credentials import cred_body
from vma_double import VmaDouble

from pyapp.db import open_database


async def _setup(oma: Oma, vma: VmaDouble) -> int:
    vma.add_vm("vm-101", "web01", disks=2)
    vma.add_vm("vm-102", "web02")
    vma.add_vm("vm-103", "db01", power_state="poweredOff")
    r = await oma.post("/vmware-credentials", json=cred_body(vma, is_default=True))
    return int(r.json()["id"])


async def _job_count(oma: Oma) -> int:
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        return int(await db.fetchval("SELECT count(*) FROM replication_jobs"))


async def test_discover_preview_add_bulk_ungrouped(oma: Oma, vma: VmaDouble) -> None:
    cred_id = await _setup(oma, vma)

    preview = (await oma.post("/discovery/preview", json={"filter": "web"})).json()
    assert preview["total"] == 2 and preview["new_count"] == 2
    assert vma.requests[-1][2] == {
        "vcenter": vma.vcenter_host,
        "username": vma.username,
        "password": vma.password,
        "tls_mode": "verify",
        "datacenter": vma.datacenter,
        "filter": "web",
    }
    assert (await oma.get("/vm-contexts")).json()["total"] == 0  # preview persists nothing

    found = (await oma.post("/discovery/discover-vms", json={"credential_id": cred_id})).json()
    assert found["count"] == 3 and found["contexts_created"] == 0
    inventory = (await oma.get("/vms")).json()
    assert inventory["total"] == 3
    vm = (await oma.get("/vms/vm-101")).json()
    assert vm["name"] == "web01" and len(vm["disks"]) == 2 and vm["source"] == "discovery"

    added = (await oma.post("/discovery/add-vms", json={"vm_names": ["web01", "ghost"]})).json()
    assert [a["vm_name"] for a in added["added"]] == ["web01"] and added["not_found"] == ["ghost"]
    again = (await oma.post("/discovery/add-vms", json={"vm_names": ["web01"]})).json()
    assert again["added"] == [] and again["skipped"][0]["reason"] == "already managed"

    bulk = (await oma.post("/discovery/bulk-add", json={"exclude_powered_off": True})).json()
    assert [a["vm_name"] for a in bulk["added"]] == ["web02"] and bulk["excluded"] == 1

    ungrouped = (await oma.get("/discovery/ungrouped-vms")).json()
    assert sorted(v["vm_name"] for v in ungrouped["vms"]) == ["web01", "web02"]
    assert (await oma.get("/vm-contexts/ungrouped")).json() == ungrouped
    preview = (await oma.post("/discovery/preview", json={})).json()
    assert preview["existing_count"] == 2 and preview["new_count"] == 1

    ctx = (await oma.get("/vm-contexts/web01")).json()
    assert ctx["context"]["auto_added"] is True and ctx["context"]["credential_id"] == cred_id
    assert ctx["current_job"] is None and len(ctx["disks"]) == 2
    assert await _job_count(oma) == 0  # discovery never creates jobs

    # a replication for a discovered VM may omit the disks: the inventory has them
    r = await oma.post(
        "/replications", json={"source_vm": {"id": "vm-101", "name": "web01", "path": "/LabDC/vm/web01"}}
    )
    assert r.status_code == 201 and len(r.json()["disks"]) == 2
    recent = (await oma.get(f"/vm-contexts/{ctx['context']['context_id']}/recent-jobs")).json()
    assert recent["total"] == 1 and recent["jobs"][0]["id"] == r.json()["id"]
    assert (await oma.get("/vm-contexts/nope")).status_code == 404
    assert (await oma.get("/vm-contexts/ctx-nope/recent-jobs")).status_code == 404


async def test_discovery_errors(oma: Oma, vma: VmaDouble) -> None:
    r = await oma.post("/discovery/discover-vms", json={})
    assert r.status_code == 422  # no default credential
    assert_envelope(r.json(), "VALIDATION_FAILED")
    r = await oma.post("/discovery/discover-vms", json={"credential_id": 77})
    assert r.status_code == 404
    bad = (await oma.post("/vmware-credentials", json=cred_body(vma, password="wrong"))).json()
    r = await oma.post("/discovery/discover-vms", json={"credential_id": bad["id"]})
    assert r.status_code == 502
    assert_envelope(r.json(), "OPERATION_FAILED")
    assert "refused the login" in r.json()["error"]


async def test_inventory_push(oma: Oma) -> None:
    body = {
        "vcenter": {"host": "vc1", "datacenter": "DC"},
        "vms": [
            {
                "id": f"vm-{i}",
                "name": f"n{i:03d}",
                "path": f"/DC/vm/n{i:03d}",
                "power_state": "poweredOn",
                "guest_os": "x",
                "memory_mb": 1024,
                "num_cpu": 1,
            }
            for i in range(150)
        ],
    }
    r = await oma.post("/vms/inventory", json=body)
    assert r.status_code == 200 and r.json()["vm_count"] == 150
    page = (await oma.get("/vms?limit=50&offset=100")).json()
    assert page["total"] == 150 and [v["name"] for v in page["vms"]][:2] == ["n100", "n101"]
    assert (await oma.get("/vms?search=n14")).json()["total"] == 10
    assert (await oma.get("/vms/vm-nope")).status_code == 404
