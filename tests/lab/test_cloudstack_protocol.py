"""The lab CloudStack's wire protocol, checked against CloudStack's documentation and source with the
test's own request builder (``cloudstack_fixtures``): signatures, expiry, encoding, error shapes,
list shapes, parameter errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest
from cs.client import cs_encode

from lab.cloudstack.signing import parse_expires

from .cloudstack_fixtures import (
    API_KEY,
    SECRET_KEY,
    SMALL,
    ZONE1,
    CloudStackLab,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
    documented_signature,
    expires_in,
    query_string,
)

UNVERIFIED = "unable to verify user credentials and/or request signature"


def refused(response_json: dict[str, object], name: str) -> None:
    assert response_json == {name: {"uuidList": [], "errorcode": 401, "errortext": UNVERIFIED}}


async def test_good_signature_is_accepted_by_get_and_post(cloudstack: CloudStackLab) -> None:
    for method in ("GET", "POST"):
        response = await cloudstack.call("listZones", method=method)
        assert response.status_code == 200, response.text
        zones = response.json()["listzonesresponse"]
        assert zones["count"] == 2
        assert {z["name"] for z in zones["zone"]} == {"lab-zone-1", "lab-zone-2"}


async def test_post_with_parameters_in_body_and_query(cloudstack: CloudStackLab) -> None:
    """CloudStack reads both and the query string wins for a name in both (utf8Fixup)."""
    params = cloudstack.signed("listZones", name="lab-zone-2")
    body = {**params, "name": "lab-zone-1"}  # a stale value in the body: the query's is signed and used
    response = await cloudstack.http.post(
        f"{cloudstack.url}?name=lab-zone-2",
        content=query_string(body),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert [z["name"] for z in response.json()["listzonesresponse"]["zone"]] == ["lab-zone-2"]


async def test_bad_signature_is_401_with_cloudstacks_body(cloudstack: CloudStackLab) -> None:
    params = cloudstack.signed("listZones")
    params["signature"] = documented_signature({**params, "name": "other"}, SECRET_KEY)
    response = await cloudstack.send(params)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    refused(response.json(), "listzonesresponse")


async def test_signature_with_the_wrong_secret_or_key_is_refused(cloudstack: CloudStackLab) -> None:
    params = {"command": "listZones", "apiKey": API_KEY, "response": "json"}
    params["signature"] = documented_signature(params, "not-the-secret")
    refused((await cloudstack.send(params)).json(), "listzonesresponse")
    other = {"command": "listZones", "apiKey": "someone-else", "response": "json"}
    other["signature"] = documented_signature(other, SECRET_KEY)
    response = await cloudstack.send(other)
    assert response.status_code == 401
    refused(response.json(), "listzonesresponse")


async def test_missing_signature_or_api_key_is_refused(cloudstack: CloudStackLab) -> None:
    no_signature = await cloudstack.send({"command": "listVolumes", "apiKey": API_KEY, "response": "json"})
    assert no_signature.status_code == 401
    refused(no_signature.json(), "listvolumesresponse")
    params = {"command": "listVolumes", "response": "json"}
    params["signature"] = documented_signature(params, SECRET_KEY)
    no_key = await cloudstack.send(params)
    assert no_key.status_code == 401
    refused(no_key.json(), "listvolumesresponse")


async def test_signature_covers_every_parameter(cloudstack: CloudStackLab) -> None:
    params = cloudstack.signed("listVolumes")
    params["zoneid"] = ZONE1  # added after signing
    assert (await cloudstack.send(params)).status_code == 401


async def test_signature_version_3_expires(cloudstack: CloudStackLab) -> None:
    live = await cloudstack.call("listZones", signatureVersion="3", expires=expires_in(60))
    assert live.status_code == 200, live.text
    for expires in (expires_in(-1), "2020-01-01T00:00:00+0000", "tomorrow", "2099-13-01T00:00:00+0000"):
        response = await cloudstack.call("listZones", signatureVersion="3", expires=expires)
        assert response.status_code == 401, expires
        refused(response.json(), "listzonesresponse")
    without = await cloudstack.call("listZones", signatureVersion="3")
    assert without.status_code == 401
    # another signature version: expires is signed but not checked
    stale = await cloudstack.call("listZones", signatureVersion="2", expires="2020-01-01T00:00:00+0000")
    assert stale.status_code == 200, stale.text


def test_expires_formats_cloudstack_parses() -> None:
    utc = UTC
    assert parse_expires("2030-05-06T07:08:09+0000") == datetime(2030, 5, 6, 7, 8, 9, tzinfo=utc)
    assert parse_expires("2030-05-06T07:08:09Z") == datetime(2030, 5, 6, 7, 8, 9, tzinfo=utc)
    assert parse_expires("2030-05-06T09:08:09+02:00") == datetime(2030, 5, 6, 7, 8, 9, tzinfo=utc)
    assert parse_expires("2030-05-06T07:08:09.123456+0000") == datetime(
        2030, 5, 6, 7, 8, 9, 123456, tzinfo=utc
    )
    assert parse_expires("2030-05-06T07:08:09Z+0000") == datetime(2030, 5, 6, 7, 8, 9, tzinfo=utc)
    for bad in ("2030-05-06T07:08:09", "2030-05-06 07:08:09+0000", "2030-05-06T07:08:09+2:00", ""):
        assert parse_expires(bad) is None, bad


async def test_tilde_signed_the_cs_way_is_refused_and_the_cloudstack_way_accepted(
    cloudstack: CloudStackLab,
) -> None:
    """CloudStack's server encodes ``~`` as ``%7E`` before signing; the cs library's quote() keeps
    it, so its signature of such a value never matches (a real CloudStack refuses it too)."""
    params = {"command": "listVolumes", "apiKey": API_KEY, "response": "json", "name": "backup~1"}
    assert cs_encode("backup~1") == "backup~1"  # what makes cs sign differently
    cs_string = "&".join(f"{k}={cs_encode(v)}" for k, v in sorted(params.items())).lower()
    cs_signature = base64.b64encode(hmac.new(SECRET_KEY.encode(), cs_string.encode(), hashlib.sha1).digest())
    response = await cloudstack.send({**params, "signature": cs_signature.decode()})
    assert response.status_code == 401
    refused(response.json(), "listvolumesresponse")
    accepted = await cloudstack.call("listVolumes", name="backup~1")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"listvolumesresponse": {}}


async def test_values_with_spaces_and_unicode_sign_as_documented(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume(name="data disk é/1+2=3&*")
    assert volume["name"] == "data disk é/1+2=3&*"
    listed = await cloudstack.api("listVolumes", name="data disk é/1+2=3&*")
    assert [v["id"] for v in listed["volume"]] == [volume["id"]]


async def test_unknown_command_is_refused_like_a_bad_signature(cloudstack: CloudStackLab) -> None:
    """verifyRequest refuses a command it does not know before looking at the signature."""
    response = await cloudstack.call("listFlyingSaucers")
    assert response.status_code == 401
    refused(response.json(), "errorresponse")
    response = await cloudstack.call("listHosts")  # CloudStack's, but not the double's
    assert response.status_code == 401


async def test_no_command(cloudstack: CloudStackLab) -> None:
    params = {"apiKey": API_KEY, "response": "json"}
    params["signature"] = documented_signature(params, SECRET_KEY)
    response = await cloudstack.send(params)
    assert response.status_code == 401
    refused(response.json(), "null")  # CloudStack appends the null response name as is


async def test_only_json_answers(cloudstack: CloudStackLab) -> None:
    params = {"command": "listZones", "apiKey": API_KEY}
    params["signature"] = documented_signature(params, SECRET_KEY)
    response = await cloudstack.send(params)
    assert response.status_code == 432
    assert response.json()["errorresponse"]["errorcode"] == 432


async def test_missing_parameter_is_431(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    response = await cloudstack.call("attachVolume", id=volume["id"])
    assert response.status_code == 431
    assert response.json() == {
        "attachvolumeresponse": {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 9999,
            "errortext": "Unable to execute API command attachvolume due to missing parameter"
            " virtualmachineid",
        }
    }
    assert response.headers["x-description"].startswith("Unable to execute API command attachvolume")
    templates = await cloudstack.call("listTemplates")
    assert templates.status_code == 431
    assert "missing parameter templatefilter" in templates.json()["listtemplatesresponse"]["errortext"]


async def test_uuid_that_names_nothing_is_431(cloudstack: CloudStackLab) -> None:
    for value in ("2c2c77d4-9f1f-4c3e-8bd8-1b5ec1c5b4a1", "not-a-uuid"):
        response = await cloudstack.call("listVolumes", id=value)
        assert response.status_code == 431
        error = response.json()["listvolumesresponse"]
        assert error["errorcode"] == 431
        assert error["errortext"].startswith(
            "Unable to execute API command listvolumes due to invalid value."
            f" Invalid parameter id value={value}"
        )
    job = await cloudstack.call("queryAsyncJobResult", jobid="2c2c77d4-9f1f-4c3e-8bd8-1b5ec1c5b4a1")
    assert job.status_code == 431


async def test_malformed_numbers_and_control_characters_are_431(cloudstack: CloudStackLab) -> None:
    response = await cloudstack.call("createVolume", zoneid=ZONE1, diskofferingid=SMALL, size="ten")
    assert response.status_code == 431
    assert response.json()["createvolumeresponse"]["errortext"] == (
        "Unable to execute API command createvolume due to invalid value ten for parameter size"
    )
    response = await cloudstack.call("listVolumes", name="a\x01b")
    assert response.status_code == 431
    assert response.json()["listvolumesresponse"]["errortext"] == (
        "Received value containing illegal ASCII non-printable characters for parameter name"
    )
    long_name = await cloudstack.call("createVolume", zoneid=ZONE1, diskofferingid=SMALL, name="x" * 256)
    assert long_name.status_code == 431


async def test_service_layer_refusal_is_431_with_its_cserrorcode(cloudstack: CloudStackLab) -> None:
    response = await cloudstack.call("createVolume", zoneid=ZONE1, diskofferingid=SMALL, size="20")
    assert response.status_code == 431
    assert response.json() == {
        "createvolumeresponse": {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 4350,
            "errortext": "This disk offering does not allow custom size",
        }
    }


async def test_list_shapes(cloudstack: CloudStackLab) -> None:
    assert await cloudstack.api("listSnapshots") == {}
    vms = await cloudstack.api("listVirtualMachines")
    assert vms["count"] == 1 and len(vms["virtualmachine"]) == 1
    capability = await cloudstack.api("listCapabilities")
    assert capability["capability"]["kvmsnapshotenabled"] is False
    assert capability["capability"]["cloudstackversion"]
    domains = await cloudstack.api("listDomains")
    assert domains["domain"][0]["name"] == "ROOT"
    accounts = await cloudstack.api("listAccounts")
    assert accounts["account"][0]["name"] == "admin"
    templates = await cloudstack.api("listTemplates", templatefilter="executable", zoneid=ZONE1)
    assert templates["count"] == 1 and templates["template"][0]["zoneid"] == ZONE1
    networks = await cloudstack.api("listNetworks", zoneid=ZONE1)
    assert {n["type"] for n in networks["network"]} == {"Isolated", "Shared"}
    offerings = await cloudstack.api("listServiceOfferings")
    assert all({"cpunumber", "memory", "cpuspeed"} <= set(o) for o in offerings["serviceoffering"])
    disks = await cloudstack.api("listDiskOfferings")
    assert any(o["iscustomized"] and o["disksize"] == 0 for o in disks["diskoffering"])


async def test_paging_counts_all_and_shows_a_page(cloudstack: CloudStackLab) -> None:
    for i in range(5):
        await cloudstack.new_volume(name=f"page-{i}")
    first = await cloudstack.api("listVolumes", type="DATADISK", page="1", pagesize="2")
    third = await cloudstack.api("listVolumes", type="DATADISK", page="3", pagesize="2")
    beyond = await cloudstack.api("listVolumes", type="DATADISK", page="4", pagesize="2")
    assert first["count"] == 5 and [v["name"] for v in first["volume"]] == ["page-0", "page-1"]
    assert third["count"] == 5 and [v["name"] for v in third["volume"]] == ["page-4"]
    assert beyond == {"count": 5}  # a page past the end: the count alone, no list


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_keyword_and_exact_filters(cloudstack: CloudStackLab, method: str) -> None:
    await cloudstack.new_volume(name="alpha")
    await cloudstack.new_volume(name="beta")
    response = await cloudstack.call("listVolumes", method=method, keyword="ALP")
    assert [v["name"] for v in response.json()["listvolumesresponse"]["volume"]] == ["alpha"]
    exact = await cloudstack.api("listVolumes", name="alph")
    assert exact == {}
