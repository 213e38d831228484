"""VMA enrollment end to end: pairing code, ed25519 proof, approval, login, revocation."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from oma_harness import Oma
from test_oma_auth import assert_envelope

from pyapp.db import open_database


class FakeVmaKeys:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    @property
    def public_openssh(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    def sign(self, challenge: str) -> str:
        return base64.b64encode(self.key.sign(challenge.encode())).decode()


async def pairing_code(oma: Oma, **body: Any) -> str:
    r = await oma.post("/admin/vma/pairing-code", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["pairing_code"])


async def enroll(oma: Oma, keys: FakeVmaKeys, code: str, name: str = "vma-site-a") -> dict[str, Any]:
    r = await oma.client.post(
        oma.url("/vma/enroll"),
        json={
            "pairing_code": code,
            "vma_public_key": keys.public_openssh,
            "vma_name": name,
            "vma_version": "0.1.0",
            "vma_fingerprint": "SHA256:abc",
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def enrolled_vma(oma: Oma) -> tuple[FakeVmaKeys, str, str, str]:
    """A fully enrolled VMA: (keys, enrollment id, appliance id, secret)."""
    keys = FakeVmaKeys()
    e = await enroll(oma, keys, await pairing_code(oma))
    r = await oma.client.post(
        oma.url("/vma/enroll/verify"),
        json={"enrollment_id": e["enrollment_id"], "signature": keys.sign(e["challenge"])},
    )
    assert r.json()["status"] == "awaiting_approval"
    assert (await oma.post(f"/admin/vma/approve/{e['enrollment_id']}", json={})).status_code == 200
    r = await oma.client.get(
        oma.url("/vma/enroll/result"),
        params={"enrollment_id": e["enrollment_id"], "signature": keys.sign(e["challenge"])},
    )
    body = r.json()
    assert body["status"] == "approved" and body["secret"]
    return keys, e["enrollment_id"], body["appliance_id"], body["secret"]


async def test_full_enrollment_login_and_immediate_revocation(oma: Oma) -> None:
    _keys, enrollment_id, appliance_id, secret = await enrolled_vma(oma)
    # the secret is delivered once
    again = await oma.client.get(
        oma.url("/vma/enroll/result"), params={"enrollment_id": enrollment_id, "signature": "AAAA"}
    )
    assert again.status_code == 401

    token = await oma.login(appliance_id, secret)
    vma_auth = {"Authorization": f"Bearer {token}"}
    inv = {"vcenter": {"host": "vc"}, "vms": [{"id": "vm-1", "name": "a", "path": "/DC/vm/a"}]}
    assert (await oma.post("/vms/inventory", json=inv, headers=vma_auth)).status_code == 200
    assert (await oma.get("/replications", headers=vma_auth)).status_code == 200
    r = await oma.get("/vmware-credentials", headers=vma_auth)
    assert r.status_code == 403
    assert_envelope(r.json(), "FORBIDDEN")
    assert (await oma.get("/admin/vma/active", headers=vma_auth)).status_code == 403

    active = (await oma.get("/admin/vma/active")).json()
    assert [v["appliance_id"] for v in active["vmas"]] == [appliance_id]

    r = await oma.delete(f"/admin/vma/revoke/{enrollment_id}")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = await oma.get("/replications", headers=vma_auth)
    assert r.status_code == 401  # at once
    assert_envelope(r.json(), "UNAUTHORIZED")
    r = await oma.client.post(oma.url("/auth/login"), json={"username": appliance_id, "password": secret})
    assert r.status_code == 401
    assert (await oma.delete(f"/admin/vma/revoke/{enrollment_id}")).status_code == 409

    events = [e["event_type"] for e in (await oma.get("/admin/vma/audit")).json()["events"]]
    assert events[:6] == [
        "revoked",
        "credentials_delivered",
        "approved",
        "verified",
        "enrolled",
        "pairing_code_created",
    ]
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        dump = await db.fetchval("SELECT string_agg(t::text, '|') FROM vma_enrollments t")
        assert secret not in dump


async def test_pairing_codes_are_single_use_and_expire(oma: Oma) -> None:
    code = await pairing_code(oma)
    await enroll(oma, FakeVmaKeys(), code.lower().replace("-", ""))  # normalised
    r = await oma.client.post(
        oma.url("/vma/enroll"),
        json={
            "pairing_code": code,
            "vma_public_key": FakeVmaKeys().public_openssh,
            "vma_name": "b",
            "vma_version": "1",
            "vma_fingerprint": "f",
        },
    )
    assert r.status_code == 401
    assert_envelope(r.json(), "UNAUTHORIZED")

    expired = await pairing_code(oma, ttl_seconds=60)
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute(
            "UPDATE vma_pairing_codes SET expires_at = now() - interval '1 second' WHERE used_at IS NULL"
        )
    r = await oma.client.post(
        oma.url("/vma/enroll"),
        json={
            "pairing_code": expired,
            "vma_public_key": FakeVmaKeys().public_openssh,
            "vma_name": "c",
            "vma_version": "1",
            "vma_fingerprint": "f",
        },
    )
    assert r.status_code == 401


async def test_bad_signature_reject_and_state_rules(oma: Oma) -> None:
    keys = FakeVmaKeys()
    e = await enroll(oma, keys, await pairing_code(oma))
    r = await oma.client.post(
        oma.url("/vma/enroll/verify"),
        json={"enrollment_id": e["enrollment_id"], "signature": FakeVmaKeys().sign(e["challenge"])},
    )
    assert r.status_code == 401
    # cannot approve before the key is proven
    assert (await oma.post(f"/admin/vma/approve/{e['enrollment_id']}", json={})).status_code == 409
    pending = (await oma.get("/admin/vma/pending")).json()
    assert [p["id"] for p in pending["enrollments"]] == [e["enrollment_id"]]
    r = await oma.post(f"/admin/vma/reject/{e['enrollment_id']}", json={"reason": "unknown site"})
    assert r.json()["status"] == "rejected"
    r = await oma.client.get(
        oma.url("/vma/enroll/result"),
        params={"enrollment_id": e["enrollment_id"], "signature": keys.sign(e["challenge"])},
    )
    assert r.json() == {"enrollment_id": e["enrollment_id"], "status": "rejected", "reason": "unknown site"}
    assert (await oma.post("/admin/vma/approve/enr-nope", json={})).status_code == 404
    r = await oma.client.post(
        oma.url("/vma/enroll"),
        json={
            "pairing_code": await pairing_code(oma),
            "vma_public_key": "ssh-rsa AAAAB3Nza",
            "vma_name": "c",
            "vma_version": "1",
            "vma_fingerprint": "f",
        },
    )
    assert r.status_code == 422
