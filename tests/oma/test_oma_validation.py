"""Bad requests answer 400/422 with the error envelope."""

from __future__ import annotations

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
        (
            {
                "content": b"vm_name=vm1",
                "headers": {**oma.auth, "Content-Type": "application/x-www-form-urlencoded"},
            }
        ),
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
