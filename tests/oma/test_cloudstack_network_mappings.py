"""The seed's "Network Mapping and Service Offerings" endpoints against the lab CloudStack: mappings
per managed VM (live and test apart), their status, the networks and offerings to choose from."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cloudstack_lab import (
    CUSTOM_DISK,
    ISOLATED,
    MEDIUM_SO,
    OMA_VM_MAC,
    SHARED,
    TEST_NET,
    ZONE1,
    ZONE2,
    ZONE2_NET,
    LabCloudStack,
    run_cloudstack_lab,
)
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble

from pyapp.db import open_database

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    async with run_cloudstack_lab(tmp_path / "cloudstack") as started:
        yield started


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble, lab: LabCloudStack) -> AsyncIterator[Oma]:
    config = make_config(tmp_path, oma_dsn, vma.base_url, oma_vm_macs=(OMA_VM_MAC,))
    async with run_oma(config) as handle:
        yield handle


async def configure(oma: Oma, lab: LabCloudStack) -> None:
    body = {
        **lab.login(),
        "zone_id": ZONE1,
        "disk_offering_id": CUSTOM_DISK,
        "service_offering_id": MEDIUM_SO,
    }
    r = await oma.post("/ossea/config-streamlined", json=body)
    assert r.status_code == 200, r.text


async def manage(oma: Oma, context_id: str, vm_id: str, name: str, networks: list[str] | None) -> None:
    """A managed VM (its context) and, unless None, its inventory with these networks."""
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host)"
            " VALUES ($1, $2, $3, $4, 'vc.lab')",
            context_id,
            name,
            vm_id,
            f"/DC/vm/{name}",
        )
        if networks is not None:
            nics = [
                {"key": 4000 + i, "network": n, "mac_address": f"00:50:56:00:00:0{i}"}
                for i, n in enumerate(networks)
            ]
            await db.execute(
                "INSERT INTO vms (id, name, path, vcenter_host, networks)"
                " VALUES ($1, $2, $3, 'vc.lab', $4::jsonb)",
                vm_id,
                name,
                f"/DC/vm/{name}",
                json.dumps(nics),
            )


async def mapping(oma: Oma, **body: Any) -> tuple[int, dict[str, Any]]:
    r = await oma.post("/network-mappings", json=body)
    return r.status_code, r.json()


async def test_mappings_need_cloudstack(oma: Oma) -> None:
    await manage(oma, "ctx-web", "vm-101", "web", ["VM Network"])
    status, body = await mapping(
        oma, vm_id="web", source_network_name="VM Network", destination_network_id=ISOLATED
    )
    assert (status, body["code"]) == (409, "CLOUDSTACK_NOT_CONFIGURED")
    r = await oma.get("/network-mappings/web/status")
    assert r.status_code == 200 and r.json()["destinations"]["status"] == "not_checked"
    for path in ("/networks/available", "/service-offerings/available"):
        assert (await oma.get(path)).json()["code"] == "CLOUDSTACK_NOT_CONFIGURED"


async def test_map_list_status_delete(oma: Oma, lab: LabCloudStack) -> None:
    await configure(oma, lab)
    await manage(oma, "ctx-web", "vm-101", "web", ["VM Network", "Backend"])
    status, created = await mapping(
        oma, vm_id="web", source_network_name="VM Network", destination_network_id=ISOLATED
    )
    assert status == 201 and created["created"] is True, created
    live = created["mapping"]
    assert live["destination_network_name"] == "lab-isolated" and live["is_test_network"] is False
    assert (live["vm_context_id"], live["vm_id"], live["vm_name"]) == ("ctx-web", "vm-101", "web")
    # the test network apart, for the same source network; named by the VMware id
    status, test = await mapping(
        oma,
        vm_id="vm-101",
        source_network_name="VM Network",
        destination_network_id=TEST_NET,
        is_test_network=True,
    )
    assert status == 201 and test["mapping"]["destination_network_name"] == "lab-test"
    # mapped again: changed in place
    status, again = await mapping(
        oma, vm_context_id="ctx-web", source_network_name="VM Network", destination_network_id=SHARED
    )
    assert status == 200 and again["created"] is False and again["mapping"]["id"] == live["id"]
    assert again["mapping"]["destination_network_name"] == "lab-shared"

    r = await oma.get("/network-mappings/web/status")
    state = r.json()
    assert r.status_code == 200, r.text
    assert state["source_networks"] == ["Backend", "VM Network"]
    assert (state["live_mappings"], state["test_mappings"], state["total_mappings"]) == (1, 1, 2)
    assert state["unmapped_networks"] == ["Backend"] and state["mapping_complete"] is False
    assert state["readiness_level"] == "incomplete" and state["destinations"]["status"] == "ok"
    await mapping(oma, vm_id="web", source_network_name="Backend", destination_network_id=ISOLATED)
    await mapping(
        oma, vm_id="web", source_network_name="Backend", destination_network_id=TEST_NET, is_test_network=True
    )
    state = (await oma.get("/network-mappings/ctx-web/status")).json()
    assert (
        state["mapping_complete"] and state["test_mapping_complete"] and state["readiness_level"] == "ready"
    )

    by_vm = (await oma.get("/network-mappings/vm-101")).json()
    assert by_vm["vm"]["vm_context_id"] == "ctx-web" and by_vm["count"] == 4
    assert [(m["source_network_name"], m["is_test_network"]) for m in by_vm["mappings"]] == [
        ("Backend", False),
        ("Backend", True),
        ("VM Network", False),
        ("VM Network", True),
    ]
    await manage(oma, "ctx-db", "vm-102", "db", None)  # no inventory: any source network goes
    assert (await mapping(oma, vm_id="db", source_network_name="anything", destination_network_id=SHARED))[
        0
    ] == 201
    page = (await oma.get("/network-mappings?limit=2")).json()
    assert (page["total"], page["count"], page["limit"]) == (5, 2, 2)
    assert [m["vm_name"] for m in page["mappings"]] == ["db", "web"]
    tests = (await oma.get("/network-mappings?is_test_network=true")).json()
    assert tests["total"] == 2 and all(m["is_test_network"] for m in tests["mappings"])
    no_inventory = (await oma.get("/network-mappings/db/status")).json()
    assert no_inventory["source_networks"] is None and no_inventory["readiness_level"] == "live_only"

    r = await oma.delete("/network-mappings/web/VM Network?is_test_network=true")
    assert r.status_code == 200 and r.json()["deleted"] == 1
    r = await oma.delete("/network-mappings/web/VM Network")
    assert r.status_code == 200 and r.json()["deleted"] == 1
    r = await oma.delete("/network-mappings/web/VM Network")
    assert (r.status_code, r.json()["code"]) == (404, "NOT_FOUND")
    assert (await oma.get("/network-mappings/web")).json()["count"] == 2


async def test_a_destination_gone_from_cloudstack_breaks_the_status(oma: Oma, lab: LabCloudStack) -> None:
    await configure(oma, lab)
    await manage(oma, "ctx-web", "vm-101", "web", ["VM Network"])
    await mapping(oma, vm_id="web", source_network_name="VM Network", destination_network_id=ISOLATED)
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute("UPDATE network_mappings SET destination_network_id = $1", UNKNOWN)
    state = (await oma.get("/network-mappings/web/status")).json()
    assert state["destinations"] == {
        "status": "missing",
        "message": "1 destination networks no longer exist in CloudStack",
        "missing": [UNKNOWN],
    }
    assert state["readiness_level"] == "broken"
    await lab.fault(command="listNetworks", mode="error", errorcode=530, times=10)
    state = (await oma.get("/network-mappings/web/status")).json()
    assert state["destinations"]["status"] == "not_checked" and "530" in state["destinations"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (
            {"vm_id": "nobody", "source_network_name": "VM Network", "destination_network_id": ISOLATED},
            404,
            "NOT_FOUND",
        ),
        (
            {"vm_id": "twin", "source_network_name": "VM Network", "destination_network_id": ISOLATED},
            409,
            "CONFLICT",
        ),
        ({"vm_id": "web", "source_network_name": "Elsewhere", "destination_network_id": ISOLATED}, 422, None),
        ({"vm_id": "web", "source_network_name": "VM Network", "destination_network_id": UNKNOWN}, 422, None),
        ({"vm_id": "web", "source_network_name": "VM Network", "destination_network_id": "net-1"}, 422, None),
        ({"source_network_name": "VM Network", "destination_network_id": ISOLATED}, 422, None),
        (
            {
                "vm_id": "web",
                "vm_context_id": "ctx-web",
                "source_network_name": "x",
                "destination_network_id": ISOLATED,
            },
            422,
            None,
        ),
        ({"vm_id": "web", "source_network_name": "", "destination_network_id": ISOLATED}, 422, None),
        ({"vm_id": "web", "source_network_name": "VM Network"}, 422, None),
    ],
)
async def test_bad_mappings(
    oma: Oma, lab: LabCloudStack, body: dict[str, Any], status: int, code: str | None
) -> None:
    await configure(oma, lab)
    await manage(oma, "ctx-web", "vm-101", "web", ["VM Network"])
    await manage(oma, "ctx-twin-1", "vm-201", "twin", ["VM Network"])
    await manage(oma, "ctx-twin-2", "vm-202", "twin", ["VM Network"])
    got, answer = await mapping(oma, **body)
    assert (got, answer["code"]) == (status, code or "VALIDATION_FAILED"), answer
    assert (await oma.get("/network-mappings")).json()["total"] == 0


async def test_networks_available_resolve_and_offerings(oma: Oma, lab: LabCloudStack) -> None:
    await configure(oma, lab)
    zone1 = (await oma.get("/networks/available")).json()  # the configured zone's
    assert zone1["zone_id"] == ZONE1 and {n["id"] for n in zone1["networks"]} == {ISOLATED, SHARED, TEST_NET}
    zone2 = (await oma.get(f"/networks/available?zone_id={ZONE2}")).json()
    assert [n["id"] for n in zone2["networks"]] == [ZONE2_NET]
    assert (await oma.get("/networks/available?zone_id=x")).status_code == 400

    r = await oma.post("/networks/resolve", json={"network_name": "lab-test"})
    assert r.status_code == 200 and r.json()["networks"][0]["network_id"] == TEST_NET, r.text
    r = await oma.post("/networks/resolve", json={"network_name": "no-such-net"})
    assert (r.status_code, r.json()["code"]) == (404, "NOT_FOUND")
    r = await oma.post("/networks/resolve", json={"network_names": ["lab-shared", ZONE2_NET, "nope"]})
    found = r.json()
    assert [n["network_id"] for n in found["networks"]] == [SHARED, ZONE2_NET] and found["not_found"] == [
        "nope"
    ]
    for bad in (
        {},
        {"network_name": "a", "network_names": ["b"]},
        {"network_names": []},
        {"network_names": [""]},
    ):
        r = await oma.post("/networks/resolve", json=bad)
        assert (r.status_code, r.json()["code"]) == (422, "VALIDATION_FAILED"), (bad, r.text)

    offerings = (await oma.get("/service-offerings/available")).json()
    assert offerings["count"] == 3 and MEDIUM_SO in {o["id"] for o in offerings["service_offerings"]}
    medium = next(o for o in offerings["service_offerings"] if o["id"] == MEDIUM_SO)
    assert (medium["cpu"], medium["memory_mb"]) == (2, 2048)
