"""The OMA's CloudStack client against the lab CloudStack (its own process): signing by ``cs``,
lists, jobs, retries, deadlines, and every failure in the error envelope with the right status."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from cloudstack_lab import CUSTOM_DISK, OMA_VM, ZONE1, LabCloudStack, run_cloudstack_lab
from cs import CloudStack, CloudStackApiException

from oma.cloudstack import resources
from oma.cloudstack.client import (
    CLOUDSTACK_AUTH_FAILED,
    CLOUDSTACK_INVALID_PARAMETER,
    CLOUDSTACK_PERMISSION_DENIED,
    CLOUDSTACK_UNSIGNABLE_VALUE,
    UPSTREAM_TIMEOUT,
    ClientOptions,
    CloudStackClient,
    Login,
    map_error,
)
from oma.cloudstack.settings import api_url_of
from pyapp.api import CONFLICT, OPERATION_FAILED, UPSTREAM_UNAVAILABLE, ApiError
from pyapp.nbd_export import free_tcp_port

FAST = ClientOptions(backoff_initial=0.01, backoff_max=0.05, poll_initial=0.02, poll_max=0.05)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    async with run_cloudstack_lab(tmp_path / "cloudstack") as started:
        yield started


def client(lab: LabCloudStack, options: ClientOptions = FAST, **login: str) -> CloudStackClient:
    values = {"api_url": lab.url, "api_key": lab.api_key, "secret_key": lab.secret_key, **login}
    return CloudStackClient(Login(**values), options)  # type: ignore[arg-type]


async def volume_count(lab: LabCloudStack) -> int:
    return sum(1 for v in (await lab.state())["volumes"] if v["type"] == "DATADISK")


async def test_lists_come_in_the_omas_field_names(lab: LabCloudStack) -> None:
    with client(lab) as c:
        found = await resources.discover(c)
        vms = await resources.virtual_machines(c)
    assert {z["name"] for z in found["zones"]} == {"lab-zone-1", "lab-zone-2"}
    assert {n["name"] for n in found["networks"]} >= {"lab-isolated", "lab-shared", "lab-test"}
    custom = next(o for o in found["disk_offerings"] if o["id"] == CUSTOM_DISK)
    assert custom["is_customized"] is True
    assert [d["name"] for d in found["domains"]] == ["ROOT"]
    assert all(t["is_ready"] for t in found["templates"])
    (oma,) = vms
    assert (
        oma["id"] == OMA_VM
        and oma["state"] == "Running"
        and oma["nics"][0]["mac_address"] == "02:00:4f:4d:41:01"
    )


async def test_cloudstack_refuses_what_cs_signs_with_a_tilde_so_the_client_never_sends_it(
    lab: LabCloudStack,
) -> None:
    # Why: cs leaves '~' unencoded when it signs, CloudStack encodes it (%7E): refused as unsigned.
    raw = CloudStack(endpoint=lab.url, key=lab.api_key, secret=lab.secret_key, method="post")
    with pytest.raises(CloudStackApiException) as refused:
        await trio.to_thread.run_sync(lambda: raw.listZones(name="a~b"))
    assert refused.value.response.status_code == 401
    assert (await trio.to_thread.run_sync(lambda: raw.listZones(name="a-b"))) == {}  # the same, without '~'
    # The OMA's client refuses it up front, with a 422 naming the parameter ...
    with client(lab) as c, pytest.raises(ApiError) as caught:
        await c.list("listZones", name="a~b")
    assert (caught.value.status, caught.value.code) == (422, CLOUDSTACK_UNSIGNABLE_VALUE)
    assert caught.value.details == {"parameter": "name"} and "~" in caught.value.message
    # ... before anything is sent (a URL where nothing listens gives the same answer) ...
    closed = f"http://127.0.0.1:{free_tcp_port()}/client/api"
    with client(lab, api_url=closed) as c, pytest.raises(ApiError) as caught:
        await c.job("createVolume", name="x~y", zoneid=ZONE1, diskofferingid=CUSTOM_DISK, size=1)
    assert caught.value.code == CLOUDSTACK_UNSIGNABLE_VALUE
    # ... and an API key with '~' (a signed parameter too) is refused as the client is made.
    with pytest.raises(ApiError) as caught:
        client(lab, api_key="abc~def")
    assert caught.value.code == CLOUDSTACK_UNSIGNABLE_VALUE


async def test_a_wrong_secret_is_a_clear_4xx(lab: LabCloudStack) -> None:
    with client(lab, secret_key="not-the-secret") as c, pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (422, CLOUDSTACK_AUTH_FAILED)
    assert "refused the given API key and secret key" in caught.value.message
    assert caught.value.details["cloudstack_errorcode"] == 401
    stored = Login(lab.url, lab.api_key, "not-the-secret", source="stored")
    with CloudStackClient(stored, FAST) as c, pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (409, CLOUDSTACK_AUTH_FAILED)
    assert "POST /ossea/config" in caught.value.message


async def test_a_5xx_on_a_read_is_retried_then_succeeds(lab: LabCloudStack) -> None:
    await lab.fault(command="listZones", mode="error", errorcode=530, times=2)
    with client(lab) as c:
        zones = await c.list("listZones")
    assert len(zones) == 2 and await lab.pending_faults() == []


async def test_a_read_failing_every_attempt_ends_in_the_envelope(lab: LabCloudStack) -> None:
    await lab.fault(command="listZones", mode="error", errorcode=530, times=10, errortext="db down")
    with client(lab) as c, pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (502, OPERATION_FAILED)
    assert "db down" in caught.value.message and caught.value.details["cloudstack_errorcode"] == 530
    (left,) = await lab.pending_faults()
    assert left["times"] == 10 - FAST.attempts


async def test_a_change_is_not_sent_twice_after_cloudstack_failed_it(lab: LabCloudStack) -> None:
    await lab.fault(command="createVolume", mode="error", errorcode=530, times=1)
    with client(lab) as c:
        with pytest.raises(ApiError) as caught:
            await c.job("createVolume", name="once", zoneid=ZONE1, diskofferingid=CUSTOM_DISK, size=1)
        assert caught.value.status == 502
        assert await volume_count(lab) == 0
        # a proxy's 503 means CloudStack did not run it: sent again, made once
        await lab.fault(command="createVolume", mode="error", errorcode=503, times=1)
        result = await c.job("createVolume", name="again", zoneid=ZONE1, diskofferingid=CUSTOM_DISK, size=1)
    assert result["volume"]["name"] == "again" and await volume_count(lab) == 1


async def test_failed_jobs_are_mapped_by_their_errorcode(lab: LabCloudStack) -> None:
    with client(lab) as c:
        volume = (await c.job("createVolume", name="v", zoneid=ZONE1, diskofferingid=CUSTOM_DISK, size=1))[
            "volume"
        ]
        await lab.fault(command="attachVolume", mode="job_failure", errorcode=530, errortext="hot-plug")
        with pytest.raises(ApiError) as caught:
            await c.job("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
        assert (caught.value.status, caught.value.code) == (502, OPERATION_FAILED)
        assert caught.value.details["job_id"] and "hot-plug" in caught.value.message
        await lab.fault(command="attachVolume", mode="job_failure", errorcode=536, errortext="in use")
        with pytest.raises(ApiError) as caught:
            await c.job("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
        assert (caught.value.status, caught.value.code) == (409, CONFLICT)
        # refused before any job: a volume id naming nothing is CloudStack's 431
        with pytest.raises(ApiError) as caught:
            await c.job("attachVolume", id="00000000-0000-4000-8000-000000000000", virtualmachineid=OMA_VM)
        assert (caught.value.status, caught.value.code) == (422, CLOUDSTACK_INVALID_PARAMETER)
        attached = await c.job("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    assert attached["volume"]["virtualmachineid"] == OMA_VM


async def test_a_job_past_its_deadline_is_a_504_naming_the_job(lab: LabCloudStack) -> None:
    await lab.fault(command="createVolume", mode="delay", seconds=5)
    options = ClientOptions(job_timeout=0.5, poll_initial=0.05, poll_max=0.1)
    with client(lab, options) as c, pytest.raises(ApiError) as caught:
        await c.job("createVolume", name="slow", zoneid=ZONE1, diskofferingid=CUSTOM_DISK, size=1)
    assert (caught.value.status, caught.value.code) == (504, UPSTREAM_TIMEOUT)
    assert caught.value.details["job_id"] in caught.value.message


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


async def test_unreachable_and_silent_cloudstacks(lab: LabCloudStack, silent_server: int) -> None:
    closed = f"http://127.0.0.1:{free_tcp_port()}/client/api"
    with client(lab, api_url=closed) as c, pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (502, UPSTREAM_UNAVAILABLE)
    assert "refused" in caught.value.message
    options = ClientOptions(timeout=1, attempts=2, backoff_initial=0.01, backoff_max=0.01)
    silent = f"http://127.0.0.1:{silent_server}/client/api"
    with client(lab, options, api_url=silent) as c, trio.fail_after(10), pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (504, UPSTREAM_TIMEOUT)
    with client(lab, api_url=f"{lab.base}/not/the/api") as c, pytest.raises(ApiError) as caught:
        await c.list("listZones")
    assert (caught.value.status, caught.value.code) == (502, UPSTREAM_UNAVAILABLE)
    assert "/client/api" in caught.value.message


@pytest.mark.parametrize(
    ("errorcode", "source", "status", "code"),
    [
        (401, "request", 422, CLOUDSTACK_AUTH_FAILED),
        (401, "stored", 409, CLOUDSTACK_AUTH_FAILED),
        (432, "request", 422, CLOUDSTACK_PERMISSION_DENIED),
        (431, "stored", 422, CLOUDSTACK_INVALID_PARAMETER),
        (430, "stored", 422, CLOUDSTACK_INVALID_PARAMETER),
        (532, "stored", 409, CONFLICT),
        (536, "stored", 409, CONFLICT),
        (429, "stored", 503, UPSTREAM_UNAVAILABLE),
        (530, "stored", 502, OPERATION_FAILED),
        (534, "stored", 502, OPERATION_FAILED),
        (404, "stored", 502, OPERATION_FAILED),
    ],
)
def test_the_error_table(errorcode: int, source: str, status: int, code: str) -> None:
    error = map_error("listZones", errorcode, "text", source)  # type: ignore[arg-type]
    assert (error.status, error.code) == (status, code)
    assert error.details["cloudstack_errorcode"] == errorcode


@pytest.mark.parametrize(
    ("typed", "endpoint"),
    [
        ("cloudstack:8080", "http://cloudstack:8080/client/api"),
        ("https://cs.example.org", "https://cs.example.org/client/api"),
        ("http://10.0.0.5:8080/client/api/", "http://10.0.0.5:8080/client/api"),
        ("http://[fd00::5]:8080/cs", "http://[fd00::5]:8080/cs/client/api"),
        ("ftp://cs", None),
        ("http://user:pw@cs", None),
        ("http://cs/?a=1", None),
        ("http://cs:99999", None),
        ("http://a..b", None),
        ("x" * 300, None),
        ("http://cs/a b", None),
        ("http://c\x7fs", None),
        ("http://[::1", None),
        ("::", None),
    ],
)
def test_api_urls_as_operators_type_them(typed: str, endpoint: str | None) -> None:
    if endpoint is None:
        with pytest.raises(ValueError):
            api_url_of(typed)
    else:
        assert api_url_of(typed) == endpoint
