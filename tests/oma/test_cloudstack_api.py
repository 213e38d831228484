"""The seed's "CloudStack (OSSEA) Settings" and "OSSEA Config" endpoints against the lab CloudStack
(its own process): every endpoint, bad input, a refused key, faults, and the keys never shown."""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cloudstack_lab import (
    CUSTOM_DISK,
    ISOLATED,
    MEDIUM_SO,
    OMA_VM,
    OMA_VM_IP,
    OMA_VM_MAC,
    SMALL_DISK,
    TEMPLATE,
    ZONE1,
    ZONE2,
    ZONE2_NET,
    LabCloudStack,
    run_cloudstack_lab,
)
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble

from oma.cloudstack.omavm import os_addresses
from pyapp.db import open_database

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def key(label: str) -> str:
    """A key no other text holds, with characters every encoding changes ('~' aside: see the
    client's module doc)."""
    return f"{label}/{secrets.token_urlsafe(12).replace('~', '')}+&=%"


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    async with run_cloudstack_lab(
        tmp_path / "cloudstack", api_key=key("ak"), secret_key=key("sk")
    ) as started:
        yield started


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble, lab: LabCloudStack) -> AsyncIterator[Oma]:
    """The OMA of the OMA VM: it knows its MAC as the lab's OMA VM has it."""
    config = make_config(
        tmp_path, oma_dsn, vma.base_url, oma_vm_macs=(OMA_VM_MAC,), device_root=lab.device_root
    )
    async with run_oma(config) as handle:
        yield handle


def assert_no_keys(lab: LabCloudStack, *texts: str) -> None:
    for text in texts:
        for secret in (lab.api_key, lab.secret_key):
            assert secret not in text and json.dumps(secret)[1:-1] not in text


async def save(oma: Oma, lab: LabCloudStack, **extra: Any) -> dict[str, Any]:
    body = {
        **lab.login(),
        "zone_id": ZONE1,
        "disk_offering_id": CUSTOM_DISK,
        "service_offering_id": MEDIUM_SO,
        "network_id": ISOLATED,
        **extra,
    }
    r = await oma.post("/ossea/config-streamlined", json=body)
    assert r.status_code == 200, r.text
    assert_no_keys(lab, r.text)
    saved: dict[str, Any] = r.json()
    return saved


async def test_test_connection(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.post("/settings/cloudstack/test-connection", json=lab.login())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["zone_count"] == 2 and body["cloudstack_version"] == "4.19.1.0"
    assert body["api_url"] == lab.url and body["account"] == {"name": "admin", "domain": "ROOT"}
    # a refused key: the test ran, and says why it failed, in the envelope's terms
    r = await oma.post("/settings/cloudstack/test-connection", json=lab.login(secret_key="wrong"))
    assert r.status_code == 200
    failed = r.json()
    assert failed["success"] is False and failed["error"]["code"] == "CLOUDSTACK_AUTH_FAILED"
    assert "refused the given API key" in failed["message"]
    # the URL as an operator types it
    host = lab.url.removeprefix("http://").removesuffix("/client/api")
    r = await oma.post("/settings/cloudstack/test-connection", json=lab.login(api_url=host))
    assert r.json()["success"] is True and r.json()["api_url"] == lab.url
    assert_no_keys(lab, r.text)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 409, "CLOUDSTACK_NOT_CONFIGURED"),  # nothing saved yet
        ({"api_url": "http://cs:8080"}, 422, "VALIDATION_FAILED"),  # half a login
        ({"api_url": "ftp://cs", "api_key": "a", "secret_key": "b"}, 422, "VALIDATION_FAILED"),
        ({"api_url": "http://u:p@cs", "api_key": "a", "secret_key": "b"}, 422, "VALIDATION_FAILED"),
        ({"api_url": "http://cs", "api_key": "a~b", "secret_key": "b"}, 422, "VALIDATION_FAILED"),
        ({"api_url": "http://cs", "api_key": "", "secret_key": "b"}, 422, "VALIDATION_FAILED"),
        ({"api_url": "http://cs", "api_key": "a", "secret_key": "b", "zone": "z"}, 422, "VALIDATION_FAILED"),
    ],
)
async def test_bad_logins_are_refused(oma: Oma, body: dict[str, Any], status: int, code: str) -> None:
    r = await oma.post("/settings/cloudstack/test-connection", json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


async def test_an_unreachable_cloudstack_is_a_502(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.post("/ossea/discover-resources", json=lab.login(api_url="http://127.0.0.1:1/client/api"))
    assert (r.status_code, r.json()["code"]) == (502, "UPSTREAM_UNAVAILABLE"), r.text
    assert "127.0.0.1:1" in r.json()["error"]


async def test_detect_oma_vm_by_its_mac(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.post("/settings/cloudstack/detect-oma-vm", json=lab.login())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["oma_info"]["id"] == OMA_VM and body["matched_by"] == "mac"
    assert body["matched_address"] == OMA_VM_MAC and body["vms_checked"] == 1
    assert body["searched"] == {"source": "config", "mac_addresses": [OMA_VM_MAC], "ip_addresses": []}
    assert OMA_VM_MAC in body["message"]


@pytest.mark.parametrize(
    ("macs", "ips", "status", "matched_by"),
    [
        ((), (OMA_VM_IP,), 200, "ip"),
        (("02-00-4F-4D-41-01",), (), 200, "mac"),  # as other tools write it
        (("02:00:00:00:00:99",), ("10.9.9.9",), 404, None),
    ],
)
async def test_detect_oma_vm_by_configured_addresses(
    tmp_path: Path,
    oma_dsn: str,
    vma: VmaDouble,
    lab: LabCloudStack,
    macs: tuple[str, ...],
    ips: tuple[str, ...],
    status: int,
    matched_by: str | None,
) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url, oma_vm_macs=macs, oma_vm_ips=ips)
    async with run_oma(config) as oma:
        r = await oma.post("/settings/cloudstack/detect-oma-vm", json=lab.login())
    assert r.status_code == status, r.text
    if matched_by is not None:
        assert r.json()["matched_by"] == matched_by and r.json()["oma_info"]["id"] == OMA_VM
    else:
        error = r.json()
        assert error["code"] == "OMA_VM_NOT_FOUND" and "none of the 1 CloudStack VMs" in error["error"]
        assert error["details"]["searched"]["mac_addresses"] == ["02:00:00:00:00:99"]


async def test_detect_oma_vm_by_this_hosts_own_addresses(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    """No configured address: the OS's are compared; the lab's OMA VM is given this host's MAC."""
    host = os_addresses()
    assert host.macs, f"this host has no MAC address to test with: {psutil.net_if_addrs()}"
    async with (
        run_cloudstack_lab(tmp_path / "cloudstack", oma_vm_mac=host.macs[0], oma_vm_ip="10.1.1.77") as lab,
        run_oma(make_config(tmp_path, oma_dsn, vma.base_url)) as oma,
    ):
        r = await oma.post("/settings/cloudstack/detect-oma-vm", json=lab.login())
    assert r.status_code == 200, r.text
    assert r.json()["searched"]["source"] == "os" and r.json()["matched_address"] == host.macs[0]


async def test_ossea_config_actions(oma: Oma, lab: LabCloudStack, oma_dsn: str) -> None:
    create = {"action": "create", "config": {"name": "main", **lab.login(), "zone_id": ZONE1}}
    r = await oma.post("/ossea/config", json=create)
    assert r.status_code == 201, r.text
    created = r.json()
    config = created["config"]
    assert created["validation"]["checks"]["zone"]["status"] == "pass"
    assert config["is_active"] is True and config["has_api_key"] is True and config["zone_id"] == ZONE1
    assert "api_key" not in config and "secret_key" not in config
    assert (await oma.post("/ossea/config", json=create)).status_code == 409  # the name is taken
    # the keys are encrypted at rest
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        row = await db.fetchrow("SELECT * FROM cloudstack_configs WHERE id = $1", config["id"])
    assert row is not None
    assert lab.api_key.encode() not in bytes(row["api_key_ciphertext"])
    assert lab.secret_key.encode() not in bytes(row["secret_key_ciphertext"])
    assert_no_keys(lab, json.dumps({k: str(v) for k, v in row.items()}))
    # a second set is not active unless asked
    second = {"action": "create", "config": {"name": "spare", **lab.login()}, "verify": False}
    spare = (await oma.post("/ossea/config", json=second)).json()["config"]
    assert spare["is_active"] is False
    listed = (await oma.post("/ossea/config", json={"action": "get"})).json()
    assert [c["name"] for c in listed["configs"]] == ["main", "spare"] and listed["count"] == 2
    got = (await oma.post("/ossea/config", json={"action": "get", "id": config["id"]})).json()
    assert got["config"]["name"] == "main"
    update = {"action": "update", "id": config["id"], "config": {"disk_offering_id": CUSTOM_DISK}}
    r = await oma.post("/ossea/config", json=update)
    assert r.status_code == 200 and r.json()["config"]["disk_offering_id"] == CUSTOM_DISK, r.text
    r = await oma.post(
        "/ossea/config", json={"action": "update", "id": spare["id"], "config": {"is_active": True}}
    )
    assert r.json()["config"]["is_active"] is True
    listed = (await oma.post("/ossea/config", json={"action": "get"})).json()
    assert [c["is_active"] for c in listed["configs"]] == [False, True]
    tested = (await oma.post("/ossea/config", json={"action": "test", "id": config["id"]})).json()
    assert tested["success"] is True and tested["test_result"]["zone_count"] == 2
    got = (await oma.post("/ossea/config", json={"action": "get", "id": config["id"]})).json()["config"]
    assert got["last_test_ok"] is True and got["last_test_at"]
    r = await oma.post("/ossea/config", json={"action": "test", "config": lab.login(secret_key="nope")})
    assert (
        r.json()["success"] is False and r.json()["test_result"]["error"]["code"] == "CLOUDSTACK_AUTH_FAILED"
    )
    r = await oma.post("/ossea/config", json={"action": "delete", "id": spare["id"]})
    assert r.status_code == 200 and r.json()["id"] == spare["id"]
    assert_no_keys(lab, r.text, json.dumps(listed), json.dumps(tested))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"action": "get", "id": 999999}, 404, "NOT_FOUND"),
        ({"action": "delete", "id": 999999}, 404, "NOT_FOUND"),
        ({"action": "delete"}, 422, "VALIDATION_FAILED"),
        ({"action": "update", "id": 999999, "config": {"zone_id": ZONE1}, "verify": False}, 404, "NOT_FOUND"),
        ({"action": "update", "id": 1}, 422, "VALIDATION_FAILED"),
        ({"action": "create", "config": {"name": "x"}}, 422, "VALIDATION_FAILED"),
        ({"action": "explode"}, 422, "VALIDATION_FAILED"),
        ({"action": "get", "id": 0}, 422, "VALIDATION_FAILED"),
        ({"action": "update", "id": 1, "config": {"secret_key": "s"}}, 422, "VALIDATION_FAILED"),
        (
            {"action": "update", "id": 1, "config": {"api_url": "http://elsewhere:8080"}},
            422,
            "VALIDATION_FAILED",
        ),
        ({"action": "create", "config": {"name": "x", "zone_id": "zone-1"}}, 422, "VALIDATION_FAILED"),
    ],
)
async def test_ossea_config_bad_operations(
    oma: Oma, lab: LabCloudStack, body: dict[str, Any], status: int, code: str
) -> None:
    await oma.post("/ossea/config", json={"action": "create", "config": {"name": "one", **lab.login()}})
    r = await oma.post("/ossea/config", json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


async def test_saving_checks_the_settings_with_cloudstack_first(oma: Oma, lab: LabCloudStack) -> None:
    refused = {"action": "create", "config": {"name": "bad", **lab.login(secret_key="wrong")}}
    r = await oma.post("/ossea/config", json=refused)
    assert (r.status_code, r.json()["code"]) == (422, "CLOUDSTACK_VALIDATION_FAILED"), r.text
    assert r.json()["details"]["connection"]["details"]["code"] == "CLOUDSTACK_AUTH_FAILED"
    nowhere = {"action": "create", "config": {"name": "bad", **lab.login(), "zone_id": UNKNOWN}}
    r = await oma.post("/ossea/config", json=nowhere)
    assert r.status_code == 422 and r.json()["details"]["zone"]["status"] == "fail"
    assert f"no zone {UNKNOWN}" in r.json()["error"]
    elsewhere = {
        "action": "create",
        "config": {"name": "bad", **lab.login(), "zone_id": ZONE1, "network_id": ZONE2_NET},
    }
    r = await oma.post("/ossea/config", json=elsewhere)
    assert r.status_code == 422 and r.json()["details"]["network"]["status"] == "fail"
    assert (await oma.post("/ossea/config", json={"action": "get"})).json()["count"] == 0


async def test_discover_resources_and_discover_all(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.post("/ossea/discover-resources", json={**lab.login(), "domain": "ROOT"})
    assert r.status_code == 200, r.text
    found = r.json()
    assert found["success"] is True and [d["name"] for d in found["domains"]] == ["ROOT"]
    assert {z["id"] for z in found["zones"]} == {ZONE1, ZONE2}
    assert {o["id"] for o in found["disk_offerings"]} >= {CUSTOM_DISK, SMALL_DISK}
    assert {o["id"] for o in found["service_offerings"]} >= {MEDIUM_SO}
    assert {n["id"] for n in found["networks"]} >= {ISOLATED, ZONE2_NET}
    assert {(t["id"], t["zone_id"]) for t in found["templates"]} == {(TEMPLATE, ZONE1), (TEMPLATE, ZONE2)}
    # the streamlined page's name for the URL
    base = {"base_url": lab.url, "api_key": lab.api_key, "secret_key": lab.secret_key}
    assert (await oma.post("/ossea/discover-resources", json=base)).status_code == 200
    r = await oma.post("/settings/cloudstack/discover-all", json=lab.login())
    assert r.status_code == 200, r.text
    everything = r.json()
    assert everything["oma_vm_id"] == OMA_VM and everything["oma_vm_name"] == "oma"
    assert {z["id"] for z in everything["zones"]} == {ZONE1, ZONE2}
    assert_no_keys(lab, json.dumps(found), json.dumps(everything))


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ({"domain": "no-such-domain"}, 422, "VALIDATION_FAILED"),
        ({"secret_key": "wrong"}, 422, "CLOUDSTACK_AUTH_FAILED"),
    ],
)
async def test_discover_resources_refusals(
    oma: Oma, lab: LabCloudStack, extra: dict[str, str], status: int, code: str
) -> None:
    r = await oma.post("/ossea/discover-resources", json={**lab.login(), **extra})
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


async def test_a_key_cloudstack_would_refuse_is_never_sent(oma: Oma, lab: LabCloudStack) -> None:
    """An API key with '~' (a signed parameter): refused with a clear 422 before anything is sent
    (the URL names a port where nothing listens: sending would have been a 502)."""
    login = lab.login(api_url="http://127.0.0.1:1/client/api", api_key="abc~def")
    for path in ("/settings/cloudstack/test-connection", "/ossea/discover-resources"):
        r = await oma.post(path, json=login)
        assert (r.status_code, r.json()["code"]) == (422, "VALIDATION_FAILED"), r.text
        assert "api_key" in r.json()["error"] and "'~'" in r.json()["error"]


async def test_discover_all_without_the_oma_vm_says_why(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble, lab: LabCloudStack
) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url, oma_vm_macs=("02:00:00:00:00:99",))
    async with run_oma(config) as oma:
        r = await oma.post("/settings/cloudstack/discover-all", json=lab.login())
    assert r.status_code == 200, r.text
    assert r.json()["oma_vm_id"] is None and r.json()["oma_vm_error"]["code"] == "OMA_VM_NOT_FOUND"
    assert len(r.json()["zones"]) == 2


async def test_streamlined_save_detects_the_oma_vm_and_keeps_keys(oma: Oma, lab: LabCloudStack) -> None:
    saved = await save(oma, lab)
    config = saved["config"]
    assert config["oma_vm_id"] == OMA_VM and config["is_active"] is True and config["name"] == "default"
    assert saved["validation"]["overall_status"] in ("pass", "warning")
    # saved again without keys: the stored ones stay, and the saved settings work without a login
    r = await oma.post(
        "/ossea/config-streamlined",
        json={"zone_id": ZONE1, "disk_offering_id": SMALL_DISK, "oma_vm_id": OMA_VM},
    )
    assert r.status_code == 200, r.text
    assert r.json()["config"]["id"] == config["id"] and r.json()["config"]["disk_offering_id"] == SMALL_DISK
    r = await oma.post("/settings/cloudstack/test-connection", json={})
    assert r.json()["success"] is True, r.text
    r = await oma.post(
        "/ossea/config-streamlined",
        json={
            **lab.login(),
            "name": "other",
            "zone_id": ZONE1,
            "disk_offering_id": CUSTOM_DISK,
            "oma_vm_id": UNKNOWN,
        },
    )
    assert (r.status_code, r.json()["code"]) == (422, "CLOUDSTACK_VALIDATION_FAILED")
    assert r.json()["details"]["oma_vm"]["status"] == "fail"
    r = await oma.post("/ossea/config-streamlined", json={"zone_id": ZONE1})
    assert r.status_code == 422  # disk_offering_id is needed
    # saved keys are not sent to a URL the request names
    moved = {"base_url": "http://elsewhere:8080", "zone_id": ZONE1, "disk_offering_id": CUSTOM_DISK}
    r = await oma.post("/ossea/config-streamlined", json=moved)
    assert r.status_code == 422 and "a new api_url needs its api_key" in r.json()["error"]


async def test_validate(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.post("/settings/cloudstack/validate", json={**lab.login(), "zone_id": ZONE1})
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert r.json()["overall_status"] == "fail"  # no disk offering, no OMA VM: nothing could be replicated
    assert checks["disk_offering"]["status"] == "fail" and checks["oma_vm"]["status"] == "fail"
    assert checks["connection"]["status"] == "pass" and checks["permissions"]["status"] == "pass"
    assert checks["volume_slots"]["status"] == "skipped"
    await save(oma, lab, template_id=TEMPLATE)
    r = await oma.post("/settings/cloudstack/validate", json={})  # the saved settings
    result = r.json()
    assert result["success"] is True and result["overall_status"] == "warning", result
    statuses = {name: c["status"] for name, c in result["checks"].items()}
    assert statuses == {
        "connection": "pass",
        "permissions": "pass",
        "zone": "pass",
        "disk_offering": "pass",
        "service_offering": "warning",  # fixed CPU and memory
        "network": "pass",
        "template": "pass",
        "oma_vm": "pass",
        "volume_slots": "pass",
    }
    slots = result["checks"]["volume_slots"]["details"]
    assert slots == {"attached": 0, "limit": 32, "limit_source": "default", "free": 32}
    # a choice of the request overrides the saved one
    r = await oma.post("/settings/cloudstack/validate", json={"network_id": ZONE2_NET})
    assert r.json()["checks"]["network"]["status"] == "fail"
    # CloudStack failing a check's call fails that check only
    await lab.fault(command="listDiskOfferings", mode="error", errorcode=530, times=10)
    r = await oma.post("/settings/cloudstack/validate", json={})
    assert r.status_code == 200 and r.json()["checks"]["disk_offering"]["status"] == "fail"
    assert r.json()["checks"]["oma_vm"]["status"] == "pass"
    # a refused login fails the connection and skips the rest
    r = await oma.post("/settings/cloudstack/validate", json=lab.login(secret_key="wrong"))
    checks = r.json()["checks"]
    assert checks["connection"]["status"] == "fail" and checks["zone"]["status"] == "skipped"


async def test_networks_of_the_saved_settings(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.get("/settings/cloudstack/networks")
    assert (r.status_code, r.json()["code"]) == (409, "CLOUDSTACK_NOT_CONFIGURED")
    await save(oma, lab)
    everything = (await oma.get("/settings/cloudstack/networks")).json()
    assert everything["count"] == 4
    zone2 = (await oma.get(f"/settings/cloudstack/networks?zone_id={ZONE2}")).json()
    assert [n["id"] for n in zone2["networks"]] == [ZONE2_NET]
    assert (await oma.get("/settings/cloudstack/networks?zone_id=nope")).status_code == 400


async def test_a_5xx_is_retried_and_a_stored_key_refused_is_a_409(oma: Oma, lab: LabCloudStack) -> None:
    await save(oma, lab)
    await lab.fault(command="listNetworks", mode="error", errorcode=530, times=2)
    r = await oma.get("/settings/cloudstack/networks")
    assert r.status_code == 200 and r.json()["count"] == 4, r.text
    keys = {"api_key": lab.api_key, "secret_key": "changed"}
    update = {"action": "update", "id": 1, "config": keys, "verify": False}
    assert (await oma.post("/ossea/config", json=update)).status_code == 200
    r = await oma.get("/settings/cloudstack/networks")
    assert (r.status_code, r.json()["code"]) == (409, "CLOUDSTACK_AUTH_FAILED"), r.text


async def test_the_keys_are_in_no_answer_and_no_log(
    oma: Oma, lab: LabCloudStack, log_capture: io.StringIO
) -> None:
    texts = [(await oma.post("/settings/cloudstack/test-connection", json=lab.login())).text]
    texts.append(json.dumps(await save(oma, lab)))
    for path, body in (
        ("/settings/cloudstack/detect-oma-vm", {}),
        ("/settings/cloudstack/validate", {}),
        ("/settings/cloudstack/discover-all", {}),
        ("/ossea/discover-resources", {}),
        ("/ossea/config", {"action": "get"}),
        ("/ossea/config", {"action": "get", "id": 1}),
        ("/ossea/config", {"action": "test"}),
        ("/ossea/config", {"action": "update", "id": 1, "config": lab.login()}),
        ("/settings/cloudstack/test-connection", lab.login(secret_key="wrong")),
        ("/ossea/discover-resources", lab.login(secret_key="wrong")),
    ):
        r = await oma.post(path, json=body)
        assert r.status_code < 500, r.text
        texts.append(r.text)
    texts.append((await oma.get("/settings/cloudstack/networks")).text)
    texts.append((await oma.get("/debug/logs?limit=1000")).text)
    assert_no_keys(lab, *texts, log_capture.getvalue())


# The seed's "CloudStack (OSSEA) Settings", "OSSEA Config" and "Network Mapping and Service
# Offerings" sections: every path, in the OpenAPI document with its request model.
SEED_PATHS = {
    ("post", "/api/v1/settings/cloudstack/test-connection"),
    ("post", "/api/v1/settings/cloudstack/detect-oma-vm"),
    ("get", "/api/v1/settings/cloudstack/networks"),
    ("post", "/api/v1/settings/cloudstack/validate"),
    ("post", "/api/v1/settings/cloudstack/discover-all"),
    ("post", "/api/v1/ossea/config"),
    ("post", "/api/v1/ossea/discover-resources"),
    ("post", "/api/v1/ossea/config-streamlined"),
    ("post", "/api/v1/network-mappings"),
    ("get", "/api/v1/network-mappings"),
    ("get", "/api/v1/network-mappings/{vm_id}"),
    ("get", "/api/v1/network-mappings/{vm_id}/status"),
    ("delete", "/api/v1/network-mappings/{vm_id}/{source_network_name}"),
    ("get", "/api/v1/networks/available"),
    ("post", "/api/v1/networks/resolve"),
    ("get", "/api/v1/service-offerings/available"),
}


async def test_openapi_lists_every_cloudstack_path(oma: Oma) -> None:
    spec = (await oma.client.get(oma.url("/swagger/openapi.json"))).json()
    present = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert SEED_PATHS - present == set()
    for method, path in SEED_PATHS:
        if method == "post":
            assert "requestBody" in spec["paths"][path][method], path
        assert "504" in spec["paths"][path][method]["responses"], path
