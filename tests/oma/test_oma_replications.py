"""Replications, change IDs and progress over real HTTP against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from oma_harness import Oma
from test_oma_auth import assert_envelope
from vma_double import VmaDouble

from pyapp.db import open_database


def job_body(name: str, disks: tuple[str, ...] = ("disk-2000",), **extra: Any) -> dict[str, Any]:
    return {
        "source_vm": {
            "id": f"vm-{name}",
            "name": name,
            "path": f"/DC/vm/{name}",
            "disks": [{"id": d, "capacity_bytes": 1 << 30} for d in disks],
        },
        "vcenter_host": "vcsim.lab.local",
        **extra,
    }


async def test_create_get_update_delete(oma: Oma) -> None:
    r = await oma.post("/replications", json=job_body("web01", ("disk-2000", "disk-2001")))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "pending" and job["replication_type"] == "initial"
    assert job["total_bytes"] == 2 << 30
    assert [d["disk_id"] for d in job["disks"]] == ["disk-2000", "disk-2001"]
    job_id = job["id"]

    r = await oma.get(f"/replications/{job_id}")
    assert r.json()["vm_name"] == "web01"

    r = await oma.put(
        f"/replications/{job_id}",
        json={
            "status": "replicating",
            "progress_percent": 12.5,
            "bytes_transferred": 1234,
            "current_operation": "copying",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["started_at"] is not None and r.json()["progress_percent"] == 12.5

    r = await oma.delete(f"/replications/{job_id}")
    assert r.status_code == 409  # active jobs must be cancelled first
    assert_envelope(r.json(), "CONFLICT")

    r = await oma.put(f"/replications/{job_id}", json={"status": "completed"})
    assert r.json()["status"] == "completed" and r.json()["progress_percent"] == 100
    assert all(not d["active"] for d in r.json()["disks"])
    r = await oma.put(f"/replications/{job_id}", json={"status": "replicating"})
    assert r.status_code == 409  # terminal states never change

    ctx = (await oma.get("/vm-contexts/web01")).json()
    assert ctx["context"]["current_status"] == "replicated"
    assert ctx["context"]["successful_jobs"] == 1 and ctx["context"]["total_jobs"] == 1

    r = await oma.delete(f"/replications/{job_id}")
    assert r.status_code == 200
    assert (await oma.get(f"/replications/{job_id}")).status_code == 404


async def test_concurrent_creations_for_one_disk_give_one_job_and_one_409(oma: Oma) -> None:
    for round_ in range(5):
        results: list[httpx.Response] = []

        async def create(name: str, into: list[httpx.Response]) -> None:
            into.append(await oma.post("/replications", json=job_body(name)))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(create, f"race{round_}", results)
        assert sorted(r.status_code for r in results) == [201, 409], [r.text for r in results]
        conflict = next(r for r in results if r.status_code == 409)
        assert_envelope(conflict.json(), "CONFLICT")

    # many at once: still exactly one
    results = []

    async def create_many() -> None:
        results.append(await oma.post("/replications", json=job_body("crowd")))

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(create_many)
    assert sorted(r.status_code for r in results) == [201] + [409] * 11
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM replication_jobs WHERE vm_name = 'crowd'") == 1


async def test_disjoint_disks_of_one_vm_may_run_together(oma: Oma) -> None:
    assert (await oma.post("/replications", json=job_body("db01", ("disk-2000",)))).status_code == 201
    assert (await oma.post("/replications", json=job_body("db01", ("disk-2001",)))).status_code == 201
    assert (
        await oma.post("/replications", json=job_body("db01", ("disk-2001", "disk-2002")))
    ).status_code == 409


async def test_list_paginates_and_filters(oma: Oma) -> None:
    ids = []
    for i in range(7):
        r = await oma.post("/replications", json=job_body(f"list{i}"))
        ids.append(r.json()["id"])
    await oma.put(f"/replications/{ids[0]}", json={"status": "failed", "error_message": "boom"})
    page = (await oma.get("/replications?limit=3&offset=0")).json()
    assert page["total"] == 7 and page["count"] == 3 and page["limit"] == 3
    assert [j["id"] for j in page["replications"]] == ids[::-1][:3]  # newest first
    last = (await oma.get("/replications?limit=3&offset=6")).json()
    assert [j["id"] for j in last["replications"]] == [ids[0]]
    assert (await oma.get("/replications?limit=3&offset=60")).json()["total"] == 7
    failed = (await oma.get("/replications?status=failed")).json()
    assert failed["total"] == 1 and failed["replications"][0]["error_message"] == "boom"
    assert (await oma.get("/replications?vm_name=list3")).json()["total"] == 1
    assert (await oma.get("/replications")).json()["limit"] == 100  # the default page


async def test_change_ids_and_incremental_detection(oma: Oma) -> None:
    q = "/replications/changeid?vm_path=/DC/vm/app01&disk_id=disk-2000"
    assert (await oma.get(q)).json()["change_id"] is None

    r = await oma.post("/replications", json=job_body("app01", replication_type="incremental"))
    assert r.status_code == 409  # no base yet

    job_id = (await oma.post("/replications", json=job_body("app01"))).json()["id"]
    await oma.put(f"/replications/{job_id}", json={"status": "replicating"})
    r = await oma.post(
        f"/replications/{job_id}/changeid", json={"disk_id": "disk-2000", "change_id": "52 3c/11"}
    )
    assert r.status_code == 201, r.text
    r = await oma.post(f"/replications/{job_id}/changeid", json={"disk_id": "disk-9999", "change_id": "x"})
    assert r.status_code == 404
    await oma.put(f"/replications/{job_id}", json={"status": "completed"})

    got = (await oma.get(q)).json()
    assert got["change_id"] == "52 3c/11" and got["job_id"] == job_id

    second = (await oma.post("/replications", json=job_body("app01"))).json()
    assert second["replication_type"] == "incremental"
    assert second["disks"][0]["base_change_id"] == "52 3c/11"
    await oma.put(f"/replications/{second['id']}", json={"status": "failed"})
    r = await oma.post(
        f"/replications/{second['id']}/changeid", json={"disk_id": "disk-2000", "change_id": "bad"}
    )
    assert r.status_code == 409  # a failed pass never becomes a base
    assert (await oma.get(q)).json()["change_id"] == "52 3c/11"
    r = await oma.post("/replications/repl-nope/changeid", json={"disk_id": "disk-2000", "change_id": "x"})
    assert r.status_code == 404
    assert_envelope(r.json(), "JOB_NOT_FOUND")


async def test_progress_proxy_and_merged_progress(oma: Oma, vma: VmaDouble) -> None:
    job = (await oma.post("/replications", json=job_body("prog01"))).json()
    job_id = job["id"]
    r = await oma.get(f"/progress/{job_id}")
    assert r.status_code == 404
    assert_envelope(r.json(), "JOB_NOT_FOUND")

    live = {
        "job_id": job_id,
        "status": "running",
        "progress_percent": 42.5,
        "current_operation": "Copying VM data",
        "bytes_transferred": 456_000_000,
        "total_bytes": 1 << 30,
        "throughput_bps": 123_000_000,
    }
    vma.progress[job_id] = live
    r = await oma.get(f"/progress/{job_id}")
    assert r.status_code == 200 and r.json() == live

    merged = (await oma.get(f"/replications/{job_id}/progress")).json()
    assert merged["source"] == "vma" and merged["status"] == "pending"
    assert merged["progress_percent"] == 42.5 and merged["throughput_bps"] == 123_000_000
    assert merged["vma"] == live


async def test_progress_when_the_vma_is_unreachable(tmp_path: Any, oma_dsn: str) -> None:
    from oma_harness import make_config, run_oma

    with trio.socket.socket() as s:  # a loopback port with nobody listening
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with run_oma(make_config(tmp_path, oma_dsn, f"http://127.0.0.1:{port}")) as oma:
        job_id = (await oma.post("/replications", json=job_body("lost01"))).json()["id"]
        r = await oma.get(f"/progress/{job_id}")
        assert r.status_code == 502
        assert_envelope(r.json(), "UPSTREAM_UNAVAILABLE")
        assert f"127.0.0.1:{port}" in r.json()["error"]
        merged = (await oma.get(f"/replications/{job_id}/progress")).json()
        assert merged["source"] == "database" and "unreachable" in merged["vma_error"]
