"""Every route of the OMA against the endpoint → role table of docs/oma.md ("Users and roles").

The table is the contract: each route of the app's ``url_map`` has exactly one row, and the running
OMA answers each route as the row says — a principal below the route's role gets 403, one at or
above it gets past the access check (any answer but 401/403), an enrolled VMA gets through only the
rows marked for it. Requests carry placeholder ids and empty bodies, so the views refuse them
after the access check (404, 422, ...) and change nothing.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from oma_harness import Oma

from oma.access.tokens import issue_token
from pyapp.db import open_database

DOC = Path(__file__).resolve().parents[2] / "docs" / "oma.md"
ROLES = ("viewer", "operator", "admin")
LEVELS = ("public", *ROLES)
IGNORED_METHODS = {"HEAD", "OPTIONS"}
ROW = re.compile(
    r"^\|\s*`(?P<method>[A-Z]+)`\s*\|\s*`(?P<path>/[^`]*)`\s*\|\s*(?P<role>\w+)\s*\|\s*(?P<vma>\w*)\s*\|"
)


def role_table() -> dict[tuple[str, str], tuple[str, bool]]:
    """``(method, path) -> (role, vma allowed)`` from the "Users and roles" section."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## Users and roles")
    end = text.find("\n## ", start + 1)
    table: dict[tuple[str, str], tuple[str, bool]] = {}
    for line in text[start : end if end > 0 else None].splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        key = (match["method"], match["path"])
        assert key not in table, f"{key} is listed twice in docs/oma.md"
        assert match["role"] in LEVELS, line
        assert match["vma"] in ("yes", "no"), line
        table[key] = (match["role"], match["vma"] == "yes")
    return table


def doc_path(rule: str) -> str:
    """``/api/v1/vmware-credentials/<int:cred_id>`` -> ``/api/v1/vmware-credentials/{cred_id}``."""
    return re.sub(r"<(?:[a-z_]+:)?([a-z_]+)>", r"{\1}", rule)


def app_routes(oma: Oma) -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()
    for rule in oma.extra["app"].url_map.iter_rules():
        for method in set(rule.methods or ()) - IGNORED_METHODS:
            routes.add((method, doc_path(rule.rule)))
    return routes


def concrete(path: str) -> str:
    """A request path for a route: placeholder ids that name nothing."""

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name in ("cred_id", "user_id"):
            return "999999"
        if name == "filename":
            return "nothing.txt"
        return str(uuid.uuid4())

    return re.sub(r"\{([a-z_]+)\}", value, path)


async def vma_token(oma: Oma) -> str:
    """A token of an approved VMA enrollment, made as the enrollment flow's approval makes it."""
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        code_id = await db.fetchval(
            "INSERT INTO vma_pairing_codes (code_hash, created_by, expires_at)"
            " VALUES ($1, 'test', now() + interval '1 hour') RETURNING id",
            uuid.uuid4().bytes,
        )
        await db.execute(
            "INSERT INTO vma_enrollments (id, pairing_code_id, vma_name, vma_version, vma_fingerprint,"
            " public_key, challenge, status, appliance_id) VALUES ('enr-roles', $1, 'vma', '1', 'fp',"
            " 'ssh-ed25519 AAAA', 'c', 'approved', 'vma-roles')",
            code_id,
        )
        token, _ = await issue_token(
            db, role="vma", subject="vma-roles", ttl_seconds=3600, vma_id="enr-roles"
        )
    return token


async def user_tokens(oma: Oma) -> dict[str, str]:
    tokens = {"admin": oma.token}
    for role in ("viewer", "operator"):
        r = await oma.post(
            "/users", json={"username": f"a-{role}", "password": f"{role}-password", "role": role}
        )
        assert r.status_code == 201, r.text
        tokens[role] = await oma.login(f"a-{role}", f"{role}-password")
    return tokens


async def test_the_table_lists_every_route_of_the_app_once(oma: Oma) -> None:
    table, routes = role_table(), app_routes(oma)
    assert routes - set(table) == set(), "routes missing from docs/oma.md 'Users and roles'"
    assert set(table) - routes == set(), "rows of docs/oma.md naming no route of the app"


async def test_every_route_answers_as_the_table_says(oma: Oma) -> None:
    table = role_table()
    tokens = {**await user_tokens(oma), "vma": await vma_token(oma)}
    # Logging out revokes the token it is sent with: walk it last.
    order = sorted(table, key=lambda key: (key[1] == "/api/v1/auth/logout", key))
    wrong: list[str] = []
    for method, path in order:
        role, vma_allowed = table[(method, path)]
        url = oma.base_url + concrete(path)
        kw: dict[str, object] = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
        anonymous = await oma.client.request(method, url, **kw)  # type: ignore[arg-type]
        if role == "public":
            if anonymous.status_code in (401, 403):
                wrong.append(f"{method} {path}: public, anonymous got {anonymous.status_code}")
            continue
        if anonymous.status_code != 401:
            wrong.append(f"{method} {path}: anonymous got {anonymous.status_code}, not 401")
        for principal in (*ROLES, "vma"):
            headers = {"Authorization": f"Bearer {tokens[principal]}"}
            r = await oma.client.request(method, url, headers=headers, **kw)  # type: ignore[arg-type]
            allowed = vma_allowed if principal == "vma" else ROLES.index(principal) >= ROLES.index(role)
            if allowed and r.status_code in (401, 403):
                wrong.append(f"{method} {path}: {principal} refused ({r.status_code}), table says {role}")
            if not allowed and r.status_code != 403:
                wrong.append(f"{method} {path}: {principal} got {r.status_code}, not 403 (table: {role})")
            if r.status_code == 403:
                assert r.json()["code"] == "FORBIDDEN", r.text
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_a_role_below_admin_cannot_manage_users(oma: Oma, role: str) -> None:
    tokens = await user_tokens(oma)
    headers = {"Authorization": f"Bearer {tokens[role]}"}
    r = await oma.post(
        "/users", json={"username": "x", "password": "long-enough", "role": "admin"}, headers=headers
    )
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN"
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM users WHERE username = 'x'") == 0
