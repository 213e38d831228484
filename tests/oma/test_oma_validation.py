"""Bad requests answer 400/404/413/415/422 with the error envelope, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from oma_harness import Oma
from test_oma_auth import assert_envelope

GOOD = {"source_vm": {"name": "vm1", "path": "/DC/vm/vm1", "disks": [{"id": "disk-2000"}]}}


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ({"source_vm": {"name": 5, "path": "/DC/vm/vm1"}}, "wrong type"),
        ({"source_vm": {"name": "vm1"}}, "missing field"),
        ({}, "empty object"),
        ([1, 2, 3], "not an object"),
        ({"source_vm": {"name": "x" * 300_000, "path": "/DC/vm/x"}}, "huge string"),
        ({**GOOD, "replication_type": "sometimes"}, "bad enum"),
        ({"source_vm": {**GOOD["source_vm"], "disks": [{"id": "d", "capacity_bytes": -1}]}}, "negative"),
    ],
)
async def test_schema_errors_are_422(oma: Oma, body: object, what: str) -> None:
    r = await oma.post("/replications", json=body)
    assert r.status_code == 422, (what, r.text)
    assert_envelope(r.json(), "VALIDATION_FAILED")
    assert "x" * 1000 not in r.text  # the offending input is not echoed back


async def test_non_json_bodies_are_400(oma: Oma) -> None:
    cases = [
        ({"content": b"{not json", "headers": {**oma.auth, "Content-Type": "application/json"}}),
        ({"content": b"", "headers": {**oma.auth, "Content-Type": "application/json"}}),
        ({"content": b"\xff\xfe garbage", "headers": {**oma.auth, "Content-Type": "application/json"}}),
    ]
    for kwargs in cases:
        r = await oma.client.post(oma.url("/replications"), **kwargs)
        assert r.status_code == 400, (kwargs, r.text)
        assert_envelope(r.json(), "INVALID_REQUEST")


async def test_oversized_body_is_refused_with_envelope(oma: Oma) -> None:
    r = await oma.post(
        "/vmware-credentials",
        content=b'{"a":"' + b"x" * (2 << 20) + b'"}',
        headers={**oma.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert_envelope(r.json(), "PAYLOAD_TOO_LARGE")


async def test_bad_query_strings_are_400(oma: Oma) -> None:
    for query in ("limit=abc", "limit=0", "limit=100000", "offset=-1", "status=weird"):
        r = await oma.get(f"/replications?{query}")
        assert r.status_code == 400, query
        assert_envelope(r.json(), "INVALID_REQUEST")
    r = await oma.get("/replications/changeid?vm_path=/DC/vm/x")
    assert r.status_code == 400


async def test_unknown_paths_and_methods(oma: Oma) -> None:
    r = await oma.get("/no-such-thing")
    assert r.status_code == 404
    assert_envelope(r.json(), "NOT_FOUND")
    r = await oma.client.patch(oma.url("/replications"), headers=oma.auth)
    assert r.status_code == 405
    assert_envelope(r.json(), "METHOD_NOT_ALLOWED")
    r = await oma.get("/vmware-credentials/not-a-number")
    assert r.status_code == 404
    r = await oma.get("/replications/repl-unknown")
    assert r.status_code == 404
    assert_envelope(r.json(), "JOB_NOT_FOUND")


async def test_other_content_types_are_415(oma: Oma) -> None:
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**oma.auth, **({"Content-Type": content_type} if content_type else {})}
        r = await oma.client.post(oma.url("/replications"), content=b"vm_name=vm1", headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert_envelope(r.json(), "UNSUPPORTED_MEDIA_TYPE")


async def test_unknown_fields_are_422_naming_the_field(oma: Oma) -> None:
    r = await oma.post("/replications", json={**GOOD, "priority": "high"})
    assert r.status_code == 422, r.text
    assert_envelope(r.json(), "VALIDATION_FAILED")
    assert "priority" in r.json()["error"]
    assert r.json()["details"][0]["loc"] == ["priority"]
    nested = {"source_vm": {**GOOD["source_vm"], "disks": [{"id": "disk-2000", "sizee": 1}]}}
    r = await oma.post("/replications", json=nested)
    assert r.status_code == 422, r.text
    assert "source_vm.disks.0.sizee" in r.json()["error"]
    r = await oma.client.post(
        oma.url("/auth/login"), json={"username": "admin", "password": "x", "remember_me": True}
    )
    assert r.status_code == 422 and "remember_me" in r.json()["error"], r.text


def _raw(oma: Oma, body: bytes) -> dict[str, object]:
    return {"content": body, "headers": {**oma.auth, "Content-Type": "application/json"}}


async def test_nul_characters_are_refused(oma: Oma) -> None:
    # PostgreSQL cannot store NUL in text: before, each of these reached the database (500)
    r = await oma.client.post(
        oma.url("/auth/login"), json={"username": "admin\u0000", "password": "correct-horse-battery"}
    )
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "INVALID_REQUEST")
    assert "$.username" in r.json()["error"]
    r = await oma.client.post(oma.url("/replications"), **_raw(oma, b'{"source_vm": {"\\u0000": 1}}'))
    assert r.status_code == 400, r.text
    for path in ("/replications/repl-%00", "/vms/%00", "/policies/x%00y", "/vm-contexts/a%00"):
        r = await oma.get(path)
        assert r.status_code == 400, (path, r.text)
        assert_envelope(r.json(), "INVALID_REQUEST")
    r = await oma.get("/replications?vm_name=a%00b")
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "INVALID_REQUEST")


async def test_integers_beyond_the_database_are_refused(oma: Oma) -> None:
    huge = 1 << 70
    body = b'{"source_vm": {"name": "vm1", "path": "/DC/vm/vm1"}, "credential_id": %d}' % huge
    r = await oma.client.post(oma.url("/replications"), **_raw(oma, body))
    assert r.status_code == 400, r.text
    assert "64 bits" in r.json()["error"] and "$.credential_id" in r.json()["error"]
    # within 64 bits but beyond a serial id: the model refuses it (it used to reach the database)
    for field_body in ({**GOOD, "credential_id": 1 << 40}, {"credential_id": 1 << 40}):
        path = "/replications" if "source_vm" in field_body else "/discovery/preview"
        r = await oma.post(path, json=field_body)
        assert r.status_code == 422, (path, r.text)
        assert "credential_id" in r.json()["error"]
    for path in ("/vmware-credentials/99999999999999999999", "/vmware-credentials/4294967296"):
        r = await oma.get(path)
        assert r.status_code == 404, (path, r.text)
        assert_envelope(r.json(), "NOT_FOUND")


async def test_deep_and_non_finite_json_is_400(oma: Oma) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    for body in (deep, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, b"[" * 100 + b"]" * 100):
        r = await oma.client.post(oma.url("/replications"), **_raw(oma, body))
        assert r.status_code == 400, r.text[:300]
        assert_envelope(r.json(), "INVALID_REQUEST")
        assert "nested deeper" in r.json()["error"]
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        body = b'{"source_vm": {"name": "vm1", "path": "/DC/vm/vm1"}, "x": ' + literal + b"}"
        r = await oma.client.post(oma.url("/replications"), **_raw(oma, body))
        assert r.status_code == 400, (literal, r.text)
        assert_envelope(r.json(), "INVALID_REQUEST")
    r = await oma.put("/replications/repl-x", **_raw(oma, b'{"progress_percent": 1e400}'))
    assert r.status_code == 400, r.text


async def test_oversized_body_with_wrong_content_length_header(oma: Oma) -> None:
    # declared small, sent big (chunked): still 413, not a 500
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a":"'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = await oma.client.post(
        oma.url("/vmware-credentials"),
        content=chunks(),
        headers={**oma.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert_envelope(r.json(), "PAYLOAD_TOO_LARGE")


async def test_unknown_credential_is_422_not_a_database_error(oma: Oma) -> None:
    # found by schemathesis: the job's foreign key to its credential failed as a 500
    r = await oma.post("/replications", json={**GOOD, "credential_id": 4242})
    assert r.status_code == 422, r.text
    assert_envelope(r.json(), "VALIDATION_FAILED")
    assert "credential_id 4242" in r.json()["error"]


async def test_inventory_memory_beyond_the_column_is_422(oma: Oma) -> None:
    # found by schemathesis: memory_mb 2^31 passed the model and overflowed the int column (500)
    vm = {"id": "vm-1", "name": "vm1", "path": "/DC/vm/vm1", "memory_mb": 1 << 31, "disks": []}
    r = await oma.post("/vms/inventory", json={"vcenter": {"host": "vc", "datacenter": "DC"}, "vms": [vm]})
    assert r.status_code == 422, r.text
    assert "memory_mb" in r.json()["error"]
