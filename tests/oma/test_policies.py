"""Backup policies and their copy rules over the real API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backup_fixtures import create_local_repository, db_of, run_backup_oma
from oma_harness import Oma
from vma_double import VmaDouble


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url) as handle:
        yield handle


@pytest.fixture
async def repos(oma: Oma, tmp_path: Path) -> list[str]:
    return [await create_local_repository(oma, name, tmp_path / name) for name in ("r1", "r2", "r3")]


def policy(primary: str, *destinations: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": "daily",
        "primary_repository_id": primary,
        "retention_days": 30,
        "copy_rules": [{"destination_repository_id": d} for d in destinations],
        **fields,
    }


async def test_policy_crud(oma: Oma, repos: list[str]) -> None:
    body = policy(repos[0], repos[1])
    body["copy_rules"].append(
        {"destination_repository_id": repos[2], "copy_mode": "scheduled", "verify_after_copy": False}
    )
    r = await oma.post("/policies", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("pol-")
    assert (created["name"], created["enabled"], created["retention_days"]) == ("daily", True, 30)
    assert created["primary_repository_id"] == repos[0]
    rules = created["copy_rules"]
    assert [
        (x["destination_repository_id"], x["copy_mode"], x["verify_after_copy"], x["enabled"]) for x in rules
    ] == [
        (repos[1], "immediate", True, True),
        (repos[2], "scheduled", False, True),
    ]
    assert all(x["id"].startswith("rule-") for x in rules)

    assert (await oma.get(f"/policies/{created['id']}")).json() == created
    r = await oma.post("/policies", json=policy(repos[1], name="weekly", retention_days=90))
    assert r.status_code == 201
    listed = (await oma.get("/policies")).json()
    assert listed["count"] == 2
    assert [p["name"] for p in listed["policies"]] == ["daily", "weekly"]
    assert listed["policies"][0] == created and listed["policies"][1]["copy_rules"] == []

    assert (await oma.post("/policies", json=policy(repos[2]))).status_code == 409  # same name
    assert (await oma.get("/policies/pol-nope")).status_code == 404
    assert (await oma.client.get(oma.url("/policies"))).status_code == 401


async def test_delete_policy_keeps_backups(oma: Oma, repos: list[str]) -> None:
    created = (await oma.post("/policies", json=policy(repos[0], repos[1]))).json()
    db = db_of(oma)
    await db.execute(
        "INSERT INTO backup_jobs (id, vm_name, vm_key, vm_path, disk_id, backup_type, requested_type,"
        " repository_id, policy_id, chain_id, status) VALUES ('backup-1', 'vm', 'moref:vc/vm-1', '/DC/vm/vm',"
        " 'disk-1', 'full', 'full', $1, $2, 'backup-1', 'completed')",
        repos[0],
        created["id"],
    )
    r = await oma.delete(f"/policies/{created['id']}")
    assert r.status_code == 200 and r.json()["id"] == created["id"]
    assert await db.fetchval("SELECT count(*) FROM backup_copy_rules") == 0
    assert await db.fetchval("SELECT policy_id FROM backup_jobs WHERE id = 'backup-1'") is None
    assert (await oma.delete(f"/policies/{created['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        (lambda r: policy(r[0], r[0]), 422, "copy_rules[0]: the destination is the primary repository"),
        (lambda r: policy(r[0], r[1], r[1]), 422, "copy_rules[1]: repository"),
        (lambda r: policy(r[0], "repo-missing"), 422, "unknown repositories: repo-missing"),
        (lambda r: policy("repo-missing"), 422, "unknown repositories: repo-missing"),
        (lambda r: policy(r[0], retention_days=0), 422, "retention_days"),
        (lambda r: policy(r[0], name=""), 422, "name"),
        (
            lambda r: {
                **policy(r[0]),
                "copy_rules": [{"destination_repository_id": r[1], "copy_mode": "hourly"}],
            },
            422,
            "copy_mode",
        ),
        (lambda r: {"name": "x", "retention_days": 3}, 422, "primary_repository_id"),
    ],
)
async def test_policy_validation(oma: Oma, repos: list[str], change: Any, status: int, needle: str) -> None:
    r = await oma.post("/policies", json=change(repos))
    assert r.status_code == status, r.text
    assert needle in r.text
    assert (await oma.get("/policies")).json()["count"] == 0  # nothing half-written


async def test_repository_in_a_policy_cannot_go(oma: Oma, repos: list[str]) -> None:
    created = (await oma.post("/policies", json=policy(repos[0], repos[1]))).json()
    for repo in repos[:2]:
        r = await oma.delete(f"/repositories/{repo}")
        assert r.status_code == 409 and "policies daily" in r.json()["error"]
    assert (await oma.delete(f"/repositories/{repos[2]}")).status_code == 200
    assert (await oma.delete(f"/policies/{created['id']}")).status_code == 200
    assert (await oma.delete(f"/repositories/{repos[1]}")).status_code == 200


async def test_retention_status_without_service(oma: Oma) -> None:
    r = await oma.get("/policies/retention-status")
    assert r.status_code == 200
    assert r.json() == {
        "running": False,
        "interval_seconds": None,
        "last_run_at": None,
        "next_run_at": None,
        "last_run": None,
    }
