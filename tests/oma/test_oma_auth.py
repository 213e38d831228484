"""Authentication over real HTTP: login, bearer tokens, expiry, envelope on 401."""

from __future__ import annotations

from pathlib import Path

import trio
from oma_harness import ADMIN_PASSWORD, ADMIN_USER, Oma, make_config, run_oma
from vma_double import VmaDouble

from oma.crypto import token_digest
from pyapp.db import open_database


def assert_envelope(body: dict[str, object], code: str) -> None:
    assert set(body) >= {"error", "code", "timestamp"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]


async def test_health_is_public_and_everything_else_needs_a_token(oma: Oma) -> None:
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 200 and r.json()["database"] == "ok"
    for path in ("/vms", "/replications", "/vm-contexts", "/vmware-credentials", "/debug/health"):
        r = await oma.client.get(oma.url(path))
        assert r.status_code == 401, path
        assert_envelope(r.json(), "UNAUTHORIZED")
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = await oma.client.get(oma.url("/vms"), headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    r = await oma.client.get(oma.url("/vms"), headers={"Authorization": "Basic YWRtaW46eA=="})
    assert r.status_code == 401


async def test_login_refuses_wrong_password_and_unknown_user(oma: Oma) -> None:
    for user, password in ((ADMIN_USER, "wrong-password"), ("nobody", ADMIN_PASSWORD)):
        r = await oma.client.post(oma.url("/auth/login"), json={"username": user, "password": password})
        assert r.status_code == 401
        assert_envelope(r.json(), "UNAUTHORIZED")


async def test_login_token_shape_and_storage(oma: Oma) -> None:
    r = await oma.client.post(
        oma.url("/auth/login"), json={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
    )
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 24 * 3600
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        stored = await db.fetch("SELECT token_hash FROM auth_tokens")
        assert token_digest(body["token"]) in {r["token_hash"] for r in stored}
        # the token itself is never stored
        dump = await db.fetchval("SELECT string_agg(t::text, '|') FROM auth_tokens t")
        assert body["token"] not in dump
        hashed = await db.fetchval("SELECT password_hash FROM users WHERE username = $1", ADMIN_USER)
        assert hashed.startswith("$argon2id$") and ADMIN_PASSWORD not in hashed


async def test_token_expires(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url, token_ttl_seconds=1)) as oma:
        token = await oma.login()
        r = await oma.get("/vms", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        await trio.sleep(1.3)
        r = await oma.get("/vms", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert_envelope(r.json(), "UNAUTHORIZED")


async def test_token_expiry_is_checked_against_the_database(oma: Oma) -> None:
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute(
            "UPDATE auth_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
            token_digest(oma.token),
        )
    r = await oma.get("/replications")
    assert r.status_code == 401


async def test_first_admin_only_when_no_user_exists(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url)) as oma:
        await oma.login()
    # a second start with another configured admin does not create it: users already exist
    config = make_config(tmp_path, oma_dsn, vma.base_url)
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM users") == 1
    assert config.admin_username == ADMIN_USER
