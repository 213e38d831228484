"""Authentication over real HTTP: login, bearer tokens, expiry, envelope on 401."""

from __future__ import annotations

from pathlib import Path

import httpx
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


# --- login throttling (docs/oma.md, "Login throttling") ----------------------------------------

USER_FREE_FAILURES = 5  # failed logins of one user name before its first lock (docs/oma.md)
ADDRESS_FREE_FAILURES = 20  # failed logins from one client address before its first lock


async def attempt(oma: Oma, username: str, password: str) -> httpx.Response:
    return await oma.client.post(oma.url("/auth/login"), json={"username": username, "password": password})


async def auth_audit(dsn: str) -> list[dict[str, object]]:
    async with open_database(dsn, min_size=1, max_size=1) as db:
        rows = await db.fetch(
            "SELECT event_type, actor, client_ip, details::text AS details FROM auth_audit_log ORDER BY id"
        )
    return [dict(r.items()) for r in rows]


def assert_throttled(r: httpx.Response, retry_after: int) -> None:
    assert r.status_code == 429, r.text
    assert_envelope(r.json(), "TOO_MANY_REQUESTS")
    assert int(r.headers["Retry-After"]) == retry_after, r.headers


async def test_failed_logins_per_user_are_slowed_then_refused_and_a_success_resets(oma: Oma) -> None:
    for _ in range(USER_FREE_FAILURES):
        assert (await attempt(oma, ADMIN_USER, "wrong-password")).status_code == 401
    # locked for 1 s: even the right password is refused, without being checked
    assert_throttled(await attempt(oma, ADMIN_USER, ADMIN_PASSWORD), 1)
    await trio.sleep(1.1)
    # each further failure doubles the lock
    assert (await attempt(oma, ADMIN_USER, "wrong-password")).status_code == 401
    assert_throttled(await attempt(oma, ADMIN_USER, "wrong-password"), 2)
    await trio.sleep(2.1)
    assert (await attempt(oma, ADMIN_USER, ADMIN_PASSWORD)).status_code == 200
    # the success reset the count: the free failures are free again
    for _ in range(USER_FREE_FAILURES - 1):
        assert (await attempt(oma, ADMIN_USER, "wrong-password")).status_code == 401
    assert (await attempt(oma, ADMIN_USER, ADMIN_PASSWORD)).status_code == 200
    events = await auth_audit(oma.config.database_url or "")
    kinds = [e["event_type"] for e in events if e["actor"] == ADMIN_USER]
    assert kinds.count("login_failed") == 2 * USER_FREE_FAILURES
    assert kinds.count("login_throttled") == 2
    assert kinds.count("login_succeeded") >= 3  # the harness's login and the two above
    throttled = [e for e in events if e["event_type"] == "login_throttled"]
    assert all('"scope": "user"' in str(e["details"]) and e["client_ip"] == "127.0.0.1" for e in throttled)
    assert all(ADMIN_PASSWORD not in str(e) and "wrong-password" not in str(e) for e in events)


async def test_failed_logins_per_address_are_refused_for_every_user(oma: Oma) -> None:
    for i in range(ADDRESS_FREE_FAILURES):
        assert (await attempt(oma, f"nobody-{i}", "wrong-password")).status_code == 401
    # the address is locked: a user with no failure of its own is refused from it too
    assert_throttled(await attempt(oma, ADMIN_USER, ADMIN_PASSWORD), 1)
    await trio.sleep(1.1)
    assert (await attempt(oma, ADMIN_USER, ADMIN_PASSWORD)).status_code == 200
    events = await auth_audit(oma.config.database_url or "")
    assert any(
        e["event_type"] == "login_throttled" and '"scope": "address"' in str(e["details"]) for e in events
    )


async def test_throttling_is_shared_by_every_oma_on_the_database(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    async with (
        run_oma(make_config(tmp_path / "a", oma_dsn, vma.base_url)) as first,
        run_oma(make_config(tmp_path / "b", oma_dsn, vma.base_url)) as second,
    ):
        for _ in range(USER_FREE_FAILURES):
            assert (await attempt(first, ADMIN_USER, "wrong-password")).status_code == 401
        assert_throttled(await attempt(second, ADMIN_USER, ADMIN_PASSWORD), 1)


async def test_concurrent_guesses_do_not_slip_past_the_lock(oma: Oma) -> None:
    statuses: list[int] = []

    async def guess(i: int) -> None:
        statuses.append((await attempt(oma, ADMIN_USER, f"guess-{i}")).status_code)

    async with trio.open_nursery() as nursery:
        for i in range(3 * USER_FREE_FAILURES):
            nursery.start_soon(guess, i)
    # every attempt was counted before its password was checked: at most the free ones were checked
    assert statuses.count(401) <= USER_FREE_FAILURES, statuses
    assert statuses.count(429) >= 2 * USER_FREE_FAILURES, statuses


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    from oma.access.throttle import address_key

    assert (
        address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    )
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") != address_key("192.0.2.8")
