"""VMware credentials: encrypted at rest, never returned, never logged, really tested."""

from __future__ import annotations

import io
import os
import stat
import uuid
from pathlib import Path

import trio
from oma_harness import Oma, make_config, run_oma
from test_oma_auth import assert_envelope
from vma_double import VmaDouble

from pyapp.db import open_database


def cred_body(
    vma: VmaDouble, name: str = "lab", password: str | None = None, **extra: object
) -> dict[str, object]:
    return {
        "credential_name": name,
        "vcenter_host": vma.vcenter_host,
        "username": vma.username,
        "password": password if password is not None else vma.password,
        "datacenter": vma.datacenter,
        **extra,
    }


async def test_password_never_in_database_answers_or_logs(
    oma: Oma, vma: VmaDouble, log_capture: io.StringIO
) -> None:
    secret = f"Zq-{uuid.uuid4().hex}-pw"
    vma.password = secret
    r = await oma.post("/vmware-credentials", json=cred_body(vma, password=secret, is_default=True))
    assert r.status_code == 201, r.text
    cred = r.json()
    assert "password" not in cred and "password_ciphertext" not in cred
    cred_id = cred["id"]

    answers = [
        await oma.get("/vmware-credentials"),
        await oma.get(f"/vmware-credentials/{cred_id}"),
        await oma.get("/vmware-credentials/default"),
        await oma.put(f"/vmware-credentials/{cred_id}", json={"datacenter": vma.datacenter}),
        await oma.post(f"/vmware-credentials/{cred_id}/test"),
        await oma.post("/discovery/preview", json={}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert secret not in answer.text
    assert answers[4].json()["success"] is True
    # the VMA did receive the right password: it was decrypted, not lost
    assert vma.requests[-1][2]["password"] == secret

    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        # every row of every table, as text
        tables = [
            r["tablename"]
            for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        for table in tables:
            dump = await db.fetchval(f"SELECT coalesce(string_agg(t::text, chr(10)), '') FROM \"{table}\" t")
            assert secret not in dump, table
        blob = await db.fetchval("SELECT password_ciphertext FROM vmware_credentials WHERE id = $1", cred_id)
        assert secret.encode() not in blob and blob[0] == 1 and len(blob) > len(secret)

    logs = log_capture.getvalue()
    assert "VMware credential created" in logs
    assert secret not in logs

    key = oma.config.key_file
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and key.stat().st_size == 32


async def test_crud_default_and_conflicts(oma: Oma, vma: VmaDouble) -> None:
    assert (await oma.get("/vmware-credentials/default")).status_code == 404
    a = (await oma.post("/vmware-credentials", json=cred_body(vma, "a", is_default=True))).json()
    b = (await oma.post("/vmware-credentials", json=cred_body(vma, "b"))).json()
    r = await oma.post("/vmware-credentials", json=cred_body(vma, "a"))
    assert r.status_code == 409
    assert_envelope(r.json(), "CONFLICT")
    assert (await oma.get("/vmware-credentials/default")).json()["id"] == a["id"]
    r = await oma.put(f"/vmware-credentials/{b['id']}/set-default")
    assert r.status_code == 200 and r.json()["is_default"] is True
    listing = (await oma.get("/vmware-credentials")).json()
    assert [c["is_default"] for c in listing["credentials"]] == [False, True]
    r = await oma.put(f"/vmware-credentials/{a['id']}", json={"password": "new-one", "username": "u2"})
    assert r.json()["username"] == "u2"
    assert (await oma.put(f"/vmware-credentials/{a['id']}", json={})).status_code == 422
    assert (await oma.delete(f"/vmware-credentials/{a['id']}")).status_code == 200
    assert (await oma.get(f"/vmware-credentials/{a['id']}")).status_code == 404
    assert (await oma.put("/vmware-credentials/999/set-default")).status_code == 404


async def test_test_endpoint_reports_why_it_failed(oma: Oma, vma: VmaDouble) -> None:
    wrong = (await oma.post("/vmware-credentials", json=cred_body(vma, "wrong", password="nope"))).json()
    r = await oma.post(f"/vmware-credentials/{wrong['id']}/test")
    assert r.status_code == 200
    assert r.json()["success"] is False and "refused the login" in r.json()["message"]
    assert (await oma.get(f"/vmware-credentials/{wrong['id']}")).json()["last_test_ok"] is False

    good = (await oma.post("/vmware-credentials", json=cred_body(vma, "good"))).json()
    vma.add_vm("vm-1", "alpha")
    r = await oma.post(f"/vmware-credentials/{good['id']}/test")
    assert r.json()["success"] is True and r.json()["vm_count"] == 1


async def test_test_endpoint_when_the_vma_is_down(tmp_path: Path, oma_dsn: str) -> None:
    with trio.socket.socket() as s:  # a loopback port with nobody listening
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with run_oma(make_config(tmp_path, oma_dsn, f"http://127.0.0.1:{port}")) as oma:
        body = {"credential_name": "x", "vcenter_host": "vc", "username": "u", "password": "p"}
        cred = (await oma.post("/vmware-credentials", json=body)).json()
        r = await oma.post(f"/vmware-credentials/{cred['id']}/test")
        assert r.status_code == 200
        assert r.json()["success"] is False and "could not reach the VMA" in r.json()["message"]


async def test_operators_and_vmas_cannot_manage_credentials(oma: Oma, vma: VmaDouble) -> None:
    from oma.crypto import hash_password

    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute(
            "INSERT INTO users (username, password_hash, role) VALUES ('op', $1, 'operator')",
            await hash_password("operator-pass"),
        )
    token = await oma.login("op", "operator-pass")
    r = await oma.get("/vmware-credentials", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert_envelope(r.json(), "FORBIDDEN")
    assert (await oma.get("/replications", headers={"Authorization": f"Bearer {token}"})).status_code == 200


def test_key_file_is_created_0600_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    import pytest

    from oma.crypto import SecretBox, SecretBoxError, load_or_create_key

    path = tmp_path / "secrets" / "credentials.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and load_or_create_key(path) == key
    box = SecretBox(key)
    blob = box.encrypt("pw", b"vmware-credential")
    assert box.decrypt(blob, b"vmware-credential") == "pw"
    with pytest.raises(SecretBoxError):
        box.decrypt(blob, b"vma-secret")  # bound to its purpose
    with pytest.raises(SecretBoxError):
        SecretBox(os.urandom(32)).decrypt(blob, b"vmware-credential")
    path.chmod(0o644)
    with pytest.raises(SecretBoxError, match="readable by others"):
        load_or_create_key(path)


async def test_a_vcenter_host_carrying_a_login_is_refused_without_echoing_it(
    oma: Oma, vma: VmaDouble
) -> None:
    """``https://user:password@host`` would keep a password in a field every answer shows: it is
    refused (422) on create and update, and the refusal does not repeat it."""
    secret = f"Zq-{uuid.uuid4().hex}-pw"
    for host in (f"https://admin:{secret}@vc.example", f"admin:{secret}@vc.example", f"{secret}@vc.example"):
        r = await oma.post("/vmware-credentials", json=cred_body(vma, "userinfo", vcenter_host=host))
        assert r.status_code == 422, r.text
        assert_envelope(r.json(), "VALIDATION_FAILED")
        assert secret not in r.text
    ok = (await oma.post("/vmware-credentials", json=cred_body(vma, "plain"))).json()
    r = await oma.put(f"/vmware-credentials/{ok['id']}", json={"vcenter_host": f"https://a:{secret}@vc"})
    assert r.status_code == 422 and secret not in r.text


def test_logins_do_not_show_their_password_in_repr() -> None:
    from oma.api.credentials import VCenterLogin
    from oma.backups.repositories import RepositorySpec

    secret = f"Zq-{uuid.uuid4().hex}-pw"
    assert secret not in repr(VCenterLogin(1, "vc", "u", secret, "DC0"))
    assert secret not in repr(RepositorySpec("repo-1", "cifs", {}, secret))


SHA256 = ":".join(f"{b:02X}" for b in range(32))


async def test_tls_mode_is_verify_by_default_and_goes_to_the_vma(oma: Oma, vma: VmaDouble) -> None:
    cred = (await oma.post("/vmware-credentials", json=cred_body(vma, "plain", is_default=True))).json()
    assert (cred["tls_mode"], cred["tls_thumbprint"]) == ("verify", "")
    assert (await oma.post(f"/vmware-credentials/{cred['id']}/test")).json()["success"] is True
    sent = vma.requests[-1][2]
    assert sent["tls_mode"] == "verify" and "tls_thumbprint" not in sent
    # discovery sends it too
    assert (await oma.post("/discovery/preview", json={})).status_code == 200
    assert vma.requests[-1][2]["tls_mode"] == "verify"


async def test_a_pinned_thumbprint_is_normalized_shown_and_sent(oma: Oma, vma: VmaDouble) -> None:
    body = cred_body(vma, "pinned", tls_mode="thumbprint", tls_thumbprint=SHA256.replace(":", "").lower())
    r = await oma.post("/vmware-credentials", json=body)
    assert r.status_code == 201, r.text
    cred = r.json()
    assert (cred["tls_mode"], cred["tls_thumbprint"]) == ("thumbprint", SHA256)
    assert (await oma.get(f"/vmware-credentials/{cred['id']}")).json()["tls_thumbprint"] == SHA256
    await oma.post(f"/vmware-credentials/{cred['id']}/test")
    sent = vma.requests[-1][2]
    assert (sent["tls_mode"], sent["tls_thumbprint"]) == ("thumbprint", SHA256)
    # a SHA-1 thumbprint (20 bytes) is accepted too
    sha1 = ":".join(["AB"] * 20)
    r = await oma.put(f"/vmware-credentials/{cred['id']}", json={"tls_thumbprint": sha1})
    assert r.status_code == 200 and r.json()["tls_thumbprint"] == sha1
    # another mode clears the pin
    r = await oma.put(f"/vmware-credentials/{cred['id']}", json={"tls_mode": "verify"})
    assert r.status_code == 200 and (r.json()["tls_mode"], r.json()["tls_thumbprint"]) == ("verify", "")


async def test_tls_settings_are_validated(oma: Oma, vma: VmaDouble) -> None:
    for extra in (
        {"tls_mode": "thumbprint"},  # no thumbprint
        {"tls_mode": "thumbprint", "tls_thumbprint": "AB:CD:EF"},  # too short
        {"tls_mode": "thumbprint", "tls_thumbprint": "ZZ" * 32},  # not hex
        {"tls_thumbprint": SHA256},  # a thumbprint without the mode that uses it
        {"tls_mode": "off"},
        {"tls_mode": True},
    ):
        r = await oma.post("/vmware-credentials", json=cred_body(vma, "bad", **extra))
        assert r.status_code == 422, (extra, r.text)
        assert_envelope(r.json(), "VALIDATION_FAILED")
    cred = (await oma.post("/vmware-credentials", json=cred_body(vma, "ok"))).json()
    r = await oma.put(f"/vmware-credentials/{cred['id']}", json={"tls_mode": "thumbprint"})
    assert r.status_code == 422, r.text
    r = await oma.put(f"/vmware-credentials/{cred['id']}", json={"tls_thumbprint": SHA256})
    assert r.status_code == 422, r.text
    assert (await oma.get(f"/vmware-credentials/{cred['id']}")).json()["tls_mode"] == "verify"


async def test_insecure_is_explicit_and_shows_in_answers_and_logs(
    oma: Oma, vma: VmaDouble, log_capture: io.StringIO
) -> None:
    r = await oma.post("/vmware-credentials", json=cred_body(vma, "lax", tls_mode="insecure"))
    assert r.status_code == 201, r.text
    cred = r.json()
    assert cred["tls_mode"] == "insecure"
    listing = (await oma.get("/vmware-credentials")).json()["credentials"]
    assert [c["tls_mode"] for c in listing if c["id"] == cred["id"]] == ["insecure"]
    await oma.post(f"/vmware-credentials/{cred['id']}/test")
    assert vma.requests[-1][2]["tls_mode"] == "insecure"
    warnings = [
        line for line in log_capture.getvalue().splitlines() if "without TLS verification" in line
    ]
    assert len(warnings) >= 2  # on create and on each use
    assert all(vma.vcenter_host in line and "warning" in line.lower() for line in warnings)
