"""Replications, change IDs and progress over real HTTP against a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from oma_harness import Oma, make_config, run_oma
from test_oma_auth import assert_envelope
from vma_double import VmaDouble

from oma.store import MIGRATIONS_DIR
from pyapp.db import apply_migrations, load_migrations, open_database

#: Rounds of 20 creations racing 20 status changes (each round a fresh chance to interleave).
ROUNDS = 8


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
    """Jobs driven by hand (the engine is off; the VMA given its own targets, as in the seed): their
    change IDs belong to no volume of this OMA, and are bases only for such jobs. (The life of a
    volume and its change IDs under the engine: tests/oma/test_oma_engine.py.)"""
    q = "/replications/changeid?vm_path=/DC/vm/app01&disk_id=disk-2000"
    assert (await oma.get(q)).json()["change_id"] is None

    r = await oma.post("/replications", json=job_body("app01", replication_type="incremental"))
    assert r.status_code == 409  # no base yet
    assert "initial replication" in r.json()["error"]

    job_id = (await oma.post("/replications", json=job_body("app01"))).json()["id"]
    await oma.put(f"/replications/{job_id}", json={"status": "replicating"})
    r = await oma.post(
        f"/replications/{job_id}/changeid", json={"disk_id": "disk-2000", "change_id": "52 3c/11"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["volume_id"] is None  # no volume of this OMA received it
    r = await oma.post(f"/replications/{job_id}/changeid", json={"disk_id": "disk-9999", "change_id": "x"})
    assert r.status_code == 404
    await oma.put(f"/replications/{job_id}", json={"status": "completed"})

    got = (await oma.get(q)).json()
    assert got["change_id"] == "52 3c/11" and got["job_id"] == job_id

    second = (await oma.post("/replications", json=job_body("app01"))).json()
    assert second["replication_type"] == "incremental"
    assert second["disks"][0]["base_change_id"] == "52 3c/11" and second["disks"][0]["volume_id"] is None
    await oma.put(f"/replications/{second['id']}", json={"status": "failed"})
    r = await oma.post(
        f"/replications/{second['id']}/changeid", json={"disk_id": "disk-2000", "change_id": "bad"}
    )
    assert r.status_code == 409  # a failed pass never becomes a base
    assert (await oma.get(q)).json()["change_id"] == "52 3c/11"
    r = await oma.post("/replications/repl-nope/changeid", json={"disk_id": "disk-2000", "change_id": "x"})
    assert r.status_code == 404
    assert_envelope(r.json(), "JOB_NOT_FOUND")


async def test_vms_are_known_by_identity_not_by_name(oma: Oma) -> None:
    """Names that fold to one file name, one name in two folders, a renamed VM: the job lock and
    the context follow the VM's id within its vCenter."""
    bodies = [
        job_body("c2 vm") | {"source_vm": {**job_body("c2 vm")["source_vm"], "id": "vm-201"}},
        job_body("c2_vm") | {"source_vm": {**job_body("c2_vm")["source_vm"], "id": "vm-202"}},
        {"source_vm": {**job_body("dupa")["source_vm"], "id": "vm-203"}, "vcenter_host": "vcsim.lab.local"},
        {
            "source_vm": {**job_body("dupa")["source_vm"], "id": "vm-204", "path": "/DC/vm/f2/dupa"},
            "vcenter_host": "vcsim.lab.local",
        },
        # the same id in another vCenter is another VM
        {"source_vm": {**job_body("dupa")["source_vm"], "id": "vm-203"}, "vcenter_host": "vc2.lab.local"},
    ]
    jobs = []
    for body in bodies:
        r = await oma.post("/replications", json=body)
        assert r.status_code == 201, r.text
        jobs.append(r.json())
    assert len({j["vm_context_id"] for j in jobs}) == 5  # one context per VM
    r = await oma.get("/vm-contexts/dupa")
    assert r.status_code == 409 and "context id" in r.json()["error"]
    assert_envelope(r.json(), "CONFLICT")
    ctx = (await oma.get(f"/vm-contexts/{jobs[3]['vm_context_id']}")).json()["context"]
    assert ctx["vm_path"] == "/DC/vm/f2/dupa" and ctx["vmware_vm_id"] == "vm-204"
    assert (await oma.get("/vm-contexts/c2_vm")).json()["context"]["vmware_vm_id"] == "vm-202"

    # vm-201 renamed and moved: still the same VM, whose disk has an active job
    renamed = {"source_vm": {**bodies[0]["source_vm"], "name": "c3", "path": "/DC/vm/f9/c3"}}
    r = await oma.post("/replications", json=renamed | {"vcenter_host": "vcsim.lab.local"})
    assert r.status_code == 409 and jobs[0]["id"] in r.json()["error"], r.text
    await oma.put(f"/replications/{jobs[0]['id']}", json={"status": "completed"})
    r = await oma.post("/replications", json=renamed | {"vcenter_host": "vcsim.lab.local"})
    assert r.status_code == 201, r.text
    assert r.json()["vm_context_id"] == jobs[0]["vm_context_id"]  # the context follows the VM
    ctx = (await oma.get(f"/vm-contexts/{jobs[0]['vm_context_id']}")).json()["context"]
    assert (ctx["vm_name"], ctx["vm_path"], ctx["total_jobs"]) == ("c3", "/DC/vm/f9/c3", 2)

    # without an id, the inventory's VM at the path is the identity
    r = await oma.post(
        "/vms/inventory",
        json={
            "vcenter": {"host": "vcsim.lab.local"},
            "vms": [{"id": "vm-300", "name": "inv", "path": "/DC/vm/inv", "disks": [{"id": "disk-2000"}]}],
        },
    )
    assert r.status_code == 200, r.text
    r = await oma.post("/replications", json={"source_vm": {"name": "inv", "path": "/DC/vm/inv"}})
    assert r.status_code == 201, r.text
    assert r.json()["vm_id"] == "vm-300" and r.json()["vcenter_host"] == "vcsim.lab.local"
    bad = {"source_vm": {"name": "x", "path": "/DC/vm/x", "id": "path:/DC/vm/x"}}
    assert (await oma.post("/replications", json=bad)).status_code == 422  # ids are morefs


async def test_creations_while_jobs_finish_never_deadlock(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    """A creation locks the VM context, then inserts the job's disks (waiting for a finishing job
    of the same disk); a status change must take the same locks in the same order, or the two
    deadlock (PostgreSQL then aborts one: a 500)."""
    names = [f"dl{i:02d}" for i in range(20)]
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url, db_pool_size=45)) as oma:
        for _ in range(ROUNDS):
            active = {}
            for name in names:
                r = await oma.post("/replications", json=job_body(name))
                assert r.status_code == 201, r.text
                active[name] = r.json()["id"]
            finished: list[httpx.Response] = []
            created: list[httpx.Response] = []

            async def finish(job_id: str, into: list[httpx.Response]) -> None:
                into.append(await oma.put(f"/replications/{job_id}", json={"status": "completed"}))

            async def create(name: str, into: list[httpx.Response]) -> None:
                into.append(await oma.post("/replications", json=job_body(name)))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for name in names:
                        nursery.start_soon(finish, active[name], finished)
                        nursery.start_soon(create, name, created)
            assert {r.status_code for r in finished} == {200}, [
                r.text for r in finished if r.status_code != 200
            ]
            assert {r.status_code for r in created} <= {201, 409}, [
                r.text for r in created if r.status_code >= 500
            ]
            # end whatever the round created, so the next round starts from finished jobs only
            for r in created:
                if r.status_code == 201:
                    await oma.put(f"/replications/{r.json()['id']}", json={"status": "cancelled"})


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


async def test_migration_006_keys_existing_replicas_by_identity(oma_dsn: str) -> None:
    """Rows of a pre-006 OMA: a volume file two VMs wrote (names folding together), a trusted
    volume with its change ID, a volume whose 'initial' pass ran incrementally (bug 1), two
    contexts of one VM (renamed). After 006 only the trusted volume keeps a base."""
    migrations = load_migrations(MIGRATIONS_DIR)
    assert migrations[5].name == "006_replica_identity.sql"
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        await apply_migrations(db, migrations[:5])
        await db.execute(
            "INSERT INTO vms (id, name, path, vcenter_host) VALUES"
            " ('vm-1', 'c2 vm', '/DC/vm/c2 vm', 'vc'), ('vm-2', 'c2_vm', '/DC/vm/c2_vm', 'vc'),"
            " ('vm-3', 'new', '/DC/vm/new', 'vc'), ('vm-5', 'five', '/DC/vm/five', 'vc')"
        )
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, total_jobs, updated_at)"
            " VALUES ('ctx-a', 'c2 vm', NULL, '/DC/vm/c2 vm', 1, now()),"
            " ('ctx-b', 'c2_vm', 'vm-2', '/DC/vm/c2_vm', 1, now()),"
            " ('ctx-c', 'old', 'vm-3', '/DC/vm/old', 1, now() - interval '1 day'),"
            " ('ctx-d', 'new', 'vm-3', '/DC/vm/new', 1, now()),"
            " ('ctx-e', 'five', 'vm-5', '/DC/vm/five', 2, now())"
        )
        jobs = [  # id, context, vm id, path, type, created (minutes ago), disk volume, copy mode
            ("j1", "ctx-a", None, "/DC/vm/c2 vm", "initial", 50, "/v/c2_vm/disk-2000.raw", "full"),
            ("j2", "ctx-b", "vm-2", "/DC/vm/c2_vm", "initial", 40, "/v/c2_vm/disk-2000.raw", "full"),
            ("j3", "ctx-c", "vm-3", "/DC/vm/old", "initial", 30, "/v/old/disk-2000.raw", "full"),
            ("j4", "ctx-d", "vm-3", "/DC/vm/new", "incremental", 20, "/v/old/disk-2000.raw", "incremental"),
            ("j5", "ctx-e", "vm-5", "/DC/vm/five", "initial", 20, "/v/five/disk-2000.raw", "full"),
            ("j6", "ctx-e", "vm-5", "/DC/vm/five", "initial", 10, "/v/five/disk-2000.raw", "incremental"),
        ]
        for job_id, ctx, vm_id, path, kind, ago, volume, mode in jobs:
            await db.execute(
                "INSERT INTO replication_jobs (id, vm_context_id, vm_id, vm_name, vm_path, vcenter_host,"
                " replication_type, status, created_by, created_at)"
                " VALUES ($1, $2, $3, $4, $4, 'vc', $5, 'completed', 't', now() - make_interval(mins => $6))",
                job_id,
                ctx,
                vm_id,
                path,
                kind,
                ago,
            )
            await db.execute(
                "INSERT INTO replication_job_disks (job_id, disk_id, vm_path, active, volume_path, copy_mode)"
                " VALUES ($1, 'disk-2000', $2, false, $3, $4)",
                job_id,
                path,
                volume,
                mode,
            )
            await db.execute(
                "INSERT INTO vm_disk_changeids (vm_path, disk_id, change_id, job_id)"
                " VALUES ($1, 'disk-2000', $2, $3)",
                path,
                f"52 aa/{ago}",
                job_id,
            )
        await apply_migrations(db, migrations)
        volumes = {
            r["vm_id"]: dict(r)
            for r in await db.fetch(
                "SELECT vm_id, path, state, error_message, generation, node_id FROM replica_volumes"
            )
        }
        assert set(volumes) == {"vm-1", "vm-2", "vm-3", "vm-5"}
        assert volumes["vm-1"]["state"] == volumes["vm-2"]["state"] == "failed"
        assert "another VM" in volumes["vm-1"]["error_message"]
        assert volumes["vm-5"]["state"] == "failed" and "not a full pass" in volumes["vm-5"]["error_message"]
        assert (volumes["vm-3"]["state"], volumes["vm-3"]["generation"], volumes["vm-3"]["node_id"]) == (
            "ready",
            1,
            None,
        )
        attached = await db.fetch(
            "SELECT c.change_id FROM vm_disk_changeids c JOIN replica_volumes v ON v.id = c.volume_id"
            " ORDER BY c.id"
        )
        assert [r["change_id"] for r in attached] == ["52 aa/30", "52 aa/20"]  # vm-3's two passes only
        contexts = {r["context_id"]: dict(r) for r in await db.fetch("SELECT * FROM vm_contexts")}
        assert set(contexts) == {"ctx-a", "ctx-b", "ctx-d", "ctx-e"}  # vm-3's two contexts merged
        assert (contexts["ctx-a"]["vmware_vm_id"], contexts["ctx-a"]["vcenter_host"]) == ("vm-1", "vc")
        assert contexts["ctx-d"]["total_jobs"] == 2
        assert await db.fetchval("SELECT vm_context_id FROM replication_jobs WHERE id = 'j3'") == "ctx-d"
        assert await db.fetchval("SELECT vm_id FROM replication_jobs WHERE id = 'j1'") == "vm-1"
