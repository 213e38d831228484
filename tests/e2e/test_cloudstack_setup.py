"""The CloudStack side set up end to end, as an operator does it: the real OMA and VMA with the
vSphere lab, and the lab CloudStack as its own process whose OMA VM has this host's MAC address.
Through the OMA's API: discover CloudStack and find the OMA VM by the host's own addresses, save
and validate the settings, add a VM from vCenter, map its network (live and test) to CloudStack
networks found by name, and see the status follow — then CloudStack goes away and the answers say
so instead of failing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import LabVM
from oma.cloudstack.omavm import os_addresses
from tests.e2e.conftest import Product
from tests.oma.cloudstack_lab import run_cloudstack_lab

pytestmark = pytest.mark.e2e


async def test_configure_cloudstack_and_map_a_discovered_vm(
    product: Product, vm1: LabVM, tmp_path: Path
) -> None:
    oma = product.oma
    host = os_addresses()
    assert host.macs, "this host has no MAC address for the OMA VM to have"
    async with run_cloudstack_lab(tmp_path / "cloudstack", oma_vm_mac=host.macs[0]) as cloud:
        # discover: what CloudStack offers, and which VM is this OMA (by this host's own MAC)
        r = await oma.post("/settings/cloudstack/discover-all", json=cloud.login())
        assert r.status_code == 200, r.text
        found = r.json()
        assert found["oma_vm"]["searched"]["source"] == "os" and found["oma_vm"]["matched_by"] == "mac"
        zone = next(z for z in found["zones"] if z["name"] == "lab-zone-1")
        disk = next(o for o in found["disk_offerings"] if o["is_customized"])
        compute = next(o for o in found["service_offerings"] if o["name"] == "Medium Instance")

        # save (the OMA VM detected again, as the streamlined page leaves it out) and validate
        r = await oma.post(
            "/ossea/config-streamlined",
            json={
                "base_url": cloud.base,
                "api_key": cloud.api_key,
                "secret_key": cloud.secret_key,
                "zone_id": zone["id"],
                "disk_offering_id": disk["id"],
                "service_offering_id": compute["id"],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["config"]["oma_vm_id"] == found["oma_vm_id"]
        result = (await oma.post("/settings/cloudstack/validate", json={})).json()
        assert result["success"] is True, result
        assert result["checks"]["oma_vm"]["status"] == "pass"
        assert result["checks"]["volume_slots"]["details"]["free"] == 32

        # a VM from vCenter, with its networks as the VMA discovered them
        r = await oma.post("/discovery/add-vms", json={"vm_names": [vm1.name]})
        assert r.status_code == 200, r.text
        status = (await oma.get(f"/network-mappings/{vm1.name}/status")).json()
        assert status["source_networks"] == ["VM Network"] and status["readiness_level"] == "incomplete"

        # map it: CloudStack networks found by name
        live = (await oma.post("/networks/resolve", json={"network_name": "lab-isolated"})).json()
        test = (await oma.post("/networks/resolve", json={"network_name": "lab-test"})).json()
        for resolved, is_test in ((live, False), (test, True)):
            r = await oma.post(
                "/network-mappings",
                json={
                    "vm_id": vm1.moref,
                    "source_network_name": "VM Network",
                    "destination_network_id": resolved["networks"][0]["network_id"],
                    "is_test_network": is_test,
                },
            )
            assert r.status_code == 201, r.text
        status = (await oma.get(f"/network-mappings/{vm1.name}/status")).json()
        assert status["readiness_level"] == "ready" and status["destinations"]["status"] == "ok"
        mappings = (await oma.get(f"/network-mappings/{vm1.name}")).json()["mappings"]
        assert [(m["destination_network_name"], m["is_test_network"]) for m in mappings] == [
            ("lab-isolated", False),
            ("lab-test", True),
        ]

    # CloudStack is gone: the mappings stay, the answers say CloudStack cannot be reached
    r = await oma.get("/networks/available")
    assert (r.status_code, r.json()["code"]) == (502, "UPSTREAM_UNAVAILABLE"), r.text
    status = (await oma.get(f"/network-mappings/{vm1.name}/status")).json()
    assert status["destinations"]["status"] == "not_checked" and status["mapping_complete"] is True
    tested = (await oma.post("/settings/cloudstack/test-connection", json={})).json()
    assert tested["success"] is False and tested["error"]["code"] == "UPSTREAM_UNAVAILABLE"
