"""Users managed through the API (docs/oma.md, "Users and roles"), over real HTTP and PostgreSQL.

Administrators create, list, disable, delete users and reset their passwords; every user changes
their own password, logs out, lists and revokes their own tokens. Disabling, deleting or resetting
a user cuts its tokens off at once; the last enabled administrator stays.
"""

from __future__ import annotations

from typing import Any

from oma_harness import ADMIN_PASSWORD, ADMIN_USER, Oma

from pyapp.db import open_database


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_user(oma: Oma, username: str, role: str, password: str | None = None) -> dict[str, Any]:
    r = await oma.post(
        "/users", json={"username": username, "password": password or f"{username}-pw-123", "role": role}
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def try_login(oma: Oma, username: str, password: str) -> int:
    r = await oma.client.post(oma.url("/auth/login"), json={"username": username, "password": password})
    return r.status_code


async def audit_events(oma: Oma) -> list[dict[str, Any]]:
    r = await oma.get("/users/audit", params={"limit": 1000})
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


async def test_admin_creates_lists_and_reads_users(oma: Oma) -> None:
    created = await create_user(oma, "vera", "viewer")
    assert created["username"] == "vera" and created["role"] == "viewer" and created["enabled"] is True
    assert (
        created["created_by"] == ADMIN_USER and "password" not in created and "password_hash" not in created
    )
    assert "vera-pw-123" not in str(created)
    r = await oma.get("/users")
    assert r.status_code == 200
    body = r.json()
    assert {u["username"] for u in body["users"]} == {ADMIN_USER, "vera"} and body["total"] == 2
    assert all("password_hash" not in u for u in body["users"])
    one = (await oma.get(f"/users/{created['id']}")).json()
    assert one["username"] == "vera"
    token = await oma.login("vera", "vera-pw-123")
    me = (await oma.get("/auth/me", headers=bearer(token))).json()
    assert me["username"] == "vera" and me["role"] == "viewer"
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        stored = await db.fetchval("SELECT password_hash FROM users WHERE username = 'vera'")
        assert stored.startswith("$argon2id$")
    assert any(e["event_type"] == "user_created" and e["subject"] == "vera" for e in await audit_events(oma))


async def test_bad_user_input_is_refused_cleanly(oma: Oma) -> None:
    await create_user(oma, "olga", "operator")
    cases: list[tuple[dict[str, Any], int]] = [
        ({"username": "olga", "password": "another-pw-123", "role": "viewer"}, 409),
        ({"username": "vma-fake", "password": "another-pw-123", "role": "viewer"}, 422),
        ({"username": "short", "password": "1234567", "role": "viewer"}, 422),
        ({"username": "badrole", "password": "another-pw-123", "role": "root"}, 422),
        ({"username": "extra", "password": "another-pw-123", "role": "viewer", "is_admin": True}, 422),
        ({"username": "", "password": "another-pw-123"}, 422),
    ]
    for body, status in cases:
        r = await oma.post("/users", json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) >= {"error", "code", "timestamp"}
        assert "another-pw-123" not in r.text
    for path in ("/users/999999", "/users/99999999999999999999999"):
        r = await oma.get(path)
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND", r.text


async def test_disabling_a_user_cuts_its_tokens_and_its_login(oma: Oma) -> None:
    user = await create_user(oma, "olga", "operator")
    token = await oma.login("olga", "olga-pw-123")
    assert (await oma.get("/replications", headers=bearer(token))).status_code == 200
    r = await oma.put(f"/users/{user['id']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False, r.text
    assert (await oma.get("/replications", headers=bearer(token))).status_code == 401
    assert await try_login(oma, "olga", "olga-pw-123") == 401
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        live = await db.fetchval(
            "SELECT count(*) FROM auth_tokens t JOIN users u ON u.id = t.user_id"
            " WHERE u.username = 'olga' AND t.revoked_at IS NULL"
        )
        assert live == 0
    r = await oma.put(f"/users/{user['id']}", json={"enabled": True})
    assert r.status_code == 200 and r.json()["enabled"] is True
    assert (await oma.get("/replications", headers=bearer(token))).status_code == 401  # stays revoked
    assert await try_login(oma, "olga", "olga-pw-123") == 200
    events = {e["event_type"] for e in await audit_events(oma) if e["subject"] == "olga"}
    assert {"user_disabled", "user_enabled"} <= events


async def test_deleting_a_user_cuts_its_tokens(oma: Oma) -> None:
    user = await create_user(oma, "dora", "operator")
    token = await oma.login("dora", "dora-pw-123")
    r = await oma.delete(f"/users/{user['id']}")
    assert r.status_code == 200, r.text
    assert (await oma.get("/vms", headers=bearer(token))).status_code == 401
    assert await try_login(oma, "dora", "dora-pw-123") == 401
    assert (await oma.get(f"/users/{user['id']}")).status_code == 404
    assert (await oma.delete(f"/users/{user['id']}")).status_code == 404


async def test_a_demoted_user_loses_the_role_on_tokens_it_already_holds(oma: Oma) -> None:
    user = await create_user(oma, "pete", "operator")
    token = await oma.login("pete", "pete-pw-123")
    body = {"name": "r", "repository_type": "local", "config": {"path": "/nonexistent"}}
    assert (await oma.post("/repositories/test", json=body, headers=bearer(token))).status_code != 403
    r = await oma.put(f"/users/{user['id']}", json={"role": "viewer"})
    assert r.status_code == 200 and r.json()["role"] == "viewer"
    assert (await oma.post("/repositories/test", json=body, headers=bearer(token))).status_code == 403
    assert (await oma.get("/replications", headers=bearer(token))).status_code == 200


async def test_admin_resets_a_password(oma: Oma) -> None:
    user = await create_user(oma, "rita", "viewer")
    token = await oma.login("rita", "rita-pw-123")
    r = await oma.post(f"/users/{user['id']}/password", json={"password": "brand-new-pw"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens_revoked"] == 1 and "brand-new-pw" not in r.text
    assert (await oma.get("/vms", headers=bearer(token))).status_code == 401
    assert await try_login(oma, "rita", "rita-pw-123") == 401
    assert await try_login(oma, "rita", "brand-new-pw") == 200
    assert (await oma.post(f"/users/{user['id']}/password", json={"password": "short"})).status_code == 422


async def test_the_last_enabled_admin_stays(oma: Oma) -> None:
    me = next(u for u in (await oma.get("/users")).json()["users"] if u["username"] == ADMIN_USER)
    for method, body in (("put", {"enabled": False}), ("put", {"role": "operator"}), ("delete", None)):
        kw = {"json": body} if body is not None else {}
        r = await getattr(oma, method)(f"/users/{me['id']}", **kw)
        assert r.status_code == 409 and r.json()["code"] == "CONFLICT", (method, body, r.text)
    # a disabled second administrator does not count
    second = await create_user(oma, "ada", "admin")
    assert (await oma.put(f"/users/{second['id']}", json={"enabled": False})).status_code == 200
    assert (await oma.delete(f"/users/{me['id']}")).status_code == 409
    # an enabled one does: then the first may step down
    assert (await oma.put(f"/users/{second['id']}", json={"enabled": True})).status_code == 200
    r = await oma.put(f"/users/{me['id']}", json={"role": "operator"})
    assert r.status_code == 200 and r.json()["role"] == "operator"
    ada = await oma.login("ada", "ada-pw-123")
    assert (
        await oma.put(f"/users/{second['id']}", json={"enabled": False}, headers=bearer(ada))
    ).status_code == 409
    assert (await oma.delete(f"/users/{second['id']}", headers=bearer(ada))).status_code == 409


async def test_own_password_change(oma: Oma) -> None:
    await create_user(oma, "carl", "operator")
    first = await oma.login("carl", "carl-pw-123")
    second = await oma.login("carl", "carl-pw-123")
    r = await oma.post(
        "/auth/password",
        json={"current_password": "wrong-password", "new_password": "carl-new-pw"},
        headers=bearer(first),
    )
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN"
    r = await oma.post(
        "/auth/password",
        json={"current_password": "carl-pw-123", "new_password": "carl-new-pw"},
        headers=bearer(first),
    )
    assert r.status_code == 200, r.text
    assert "carl-new-pw" not in r.text and "carl-pw-123" not in r.text
    assert (await oma.get("/vms", headers=bearer(first))).status_code == 200  # the session that changed it
    assert (await oma.get("/vms", headers=bearer(second))).status_code == 401  # every other session
    assert await try_login(oma, "carl", "carl-pw-123") == 401
    assert await try_login(oma, "carl", "carl-new-pw") == 200
    assert any(
        e["event_type"] == "password_changed" and e["actor"] == "carl" for e in await audit_events(oma)
    )


async def test_logout_and_own_tokens(oma: Oma) -> None:
    await create_user(oma, "lena", "viewer")
    await create_user(oma, "otto", "viewer")
    one = await oma.login("lena", "lena-pw-123")
    two = await oma.login("lena", "lena-pw-123")
    three = await oma.login("lena", "lena-pw-123")
    otto = await oma.login("otto", "otto-pw-123")
    r = await oma.get("/auth/tokens", headers=bearer(one))
    assert r.status_code == 200, r.text
    listed = r.json()["tokens"]
    assert len(listed) == 3 and sum(t["current"] for t in listed) == 1
    for secret in (one, two, three, otto):
        assert secret not in r.text
    others = [t["id"] for t in listed if not t["current"]]
    # revoke one of my other sessions
    r = await oma.delete(f"/auth/tokens/{others[0]}", headers=bearer(one))
    assert r.status_code == 200, r.text
    still = [t for t in (two, three) if (await oma.get("/vms", headers=bearer(t))).status_code == 200]
    assert len(still) == 1
    # another user's token is not mine to revoke (and not found, to not reveal it exists)
    otto_ids = [t["id"] for t in (await oma.get("/auth/tokens", headers=bearer(otto))).json()["tokens"]]
    assert (await oma.delete(f"/auth/tokens/{otto_ids[0]}", headers=bearer(one))).status_code == 404
    assert (await oma.delete("/auth/tokens/not-a-uuid", headers=bearer(one))).status_code == 404
    assert (await oma.get("/vms", headers=bearer(otto))).status_code == 200
    # log out: this token only
    r = await oma.post("/auth/logout", headers=bearer(one))
    assert r.status_code == 200, r.text
    assert (await oma.get("/vms", headers=bearer(one))).status_code == 401
    assert (await oma.get("/vms", headers=bearer(still[0]))).status_code == 200
    events = [e for e in await audit_events(oma) if e["actor"] == "lena"]
    assert {"logout", "token_revoked"} <= {e["event_type"] for e in events}


async def test_the_configured_admin_can_still_log_in_after_users_were_added(oma: Oma) -> None:
    await create_user(oma, "zed", "viewer")
    assert await try_login(oma, ADMIN_USER, ADMIN_PASSWORD) == 200


async def test_two_admins_disabling_each_other_at_once_leave_one(oma: Oma) -> None:
    import trio

    me = next(u for u in (await oma.get("/users")).json()["users"] if u["username"] == ADMIN_USER)
    other = await create_user(oma, "ada", "admin")
    ada = await oma.login("ada", "ada-pw-123")
    statuses: dict[str, int] = {}

    async def disable(who: str, target: int, token: str) -> None:
        r = await oma.put(f"/users/{target}", json={"enabled": False}, headers=bearer(token))
        statuses[who] = r.status_code

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disable, "admin", other["id"], oma.token)
        nursery.start_soon(disable, "ada", me["id"], ada)
    assert sorted(statuses.values()) in ([200, 401], [200, 409]), statuses
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        enabled = await db.fetchval("SELECT count(*) FROM users WHERE role = 'admin' AND disabled_at IS NULL")
        assert enabled == 1
