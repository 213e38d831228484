"""The replication engine's claim and failure paths, against a real PostgreSQL (the copy itself is
tested against the real VMA in tests/e2e)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from oma_harness import Oma, make_config, run_oma
from test_oma_credentials import cred_body
from test_oma_replications import job_body
from vma_double import VmaDouble

from oma.replication.engine import ReplicationEngine
from oma.replication.events import JobChange, JobEvents
from oma.replication.jobs import JobError, finish_job
from oma.replication.volumes import node_id, prepare_volume, safe_name, volume_path
from oma.state import STATE_KEY, OmaState


async def test_two_engines_on_one_database_never_claim_the_same_job(oma: Oma) -> None:
    ids = []
    for i in range(12):
        r = await oma.post("/replications", json=job_body(f"claim{i:02d}"))
        assert r.status_code == 201
        ids.append(r.json()["id"])
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]

    async def no_login(credential_id: int | None) -> None:
        raise AssertionError("not called")

    engines = [ReplicationEngine(oma.config, st.db, st.vma, no_login, st.job_events) for _ in range(2)]  # type: ignore[arg-type]
    claimed: list[list[str]] = [[], []]

    async def claim(n: int) -> None:
        for _ in range(4):
            claimed[n].extend(r["id"] for r in await engines[n].claim(2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, 0)
        nursery.start_soon(claim, 1)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # every job, once
    owners = {
        r["claimed_by"]
        for r in await st.db.fetch("SELECT claimed_by FROM replication_jobs WHERE id = ANY($1::text[])", ids)
    }
    assert owners == {engines[0].engine_id, engines[1].engine_id}
    # a finished job stays finished: the engine's end does not override the VMA's report
    assert await finish_job(st.db, st.job_events, ids[0], "completed", None)
    assert not await finish_job(st.db, st.job_events, ids[0], "failed", "late")
    assert (await oma.get(f"/replications/{ids[0]}")).json()["status"] == "completed"


async def test_engine_fails_a_job_it_cannot_size_and_releases_its_disks(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_replications=True, engine_poll_interval=0.1)
    async with run_oma(config) as oma:
        body = job_body("nosize")
        body["source_vm"]["disks"] = [{"id": "disk-2000"}]  # no capacity: no volume can be made
        job_id = (await oma.post("/replications", json=body)).json()["id"]
        with trio.fail_after(10):
            while (job := (await oma.get(f"/replications/{job_id}")).json())["status"] == "pending":
                await trio.sleep(0.05)
        assert job["status"] == "failed" and "capacity" in job["error_message"]
        assert not any(d["active"] for d in job["disks"])
        assert not any(path == "/api/v1/replicate" for _, path, _ in vma.requests)


def test_job_events_reach_every_listener_until_it_unsubscribes() -> None:
    events, heard = JobEvents(), []

    def broken(change: JobChange) -> None:
        raise RuntimeError("a listener that fails")

    stop_broken = events.subscribe(broken)
    stop = events.subscribe(heard.append)
    events.publish(JobChange("repl-1", None, "pending"))  # the broken listener does not stop the others
    stop()
    stop()  # twice: harmless
    events.publish(JobChange("repl-1", "pending", "cancelled"))
    stop_broken()
    assert heard == [JobChange("repl-1", None, "pending")]


async def test_a_job_created_here_wakes_the_engine_and_its_end_is_published(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    # A poll interval far longer than the test: only the creation's event can make the engine claim.
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_replications=True, engine_poll_interval=60)
    async with run_oma(config) as oma:
        st: OmaState = oma.extra["app"].extensions[STATE_KEY]
        heard: list[JobChange] = []
        stop = st.job_events.subscribe(heard.append)
        body = job_body("woken")
        body["source_vm"]["disks"] = [{"id": "disk-2000"}]  # no capacity: the engine fails it at once
        job_id = (await oma.post("/replications", json=body)).json()["id"]
        with trio.fail_after(10):
            while (await oma.get(f"/replications/{job_id}")).json()["status"] == "pending":
                await trio.sleep(0.05)
        stop()
        assert heard == [JobChange(job_id, None, "pending"), JobChange(job_id, "pending", "failed")]


def test_volumes(tmp_path: Path) -> None:
    config = make_config(tmp_path, "postgresql://unused", "http://127.0.0.1:9")
    path = volume_path(config, "vc 1", "vm-12", "disk-2000", "vol-ab")
    assert path == config.data_dir / "volumes" / "vc_1" / "vm-12" / "disk-2000-vol-ab.raw"
    assert volume_path(config, "", "path:/DC/vm/a b", "d", "vol-1").parent.name == "path__DC_vm_a_b"
    assert safe_name("..") == "_"
    prepare_volume(path, 1 << 20, fresh=True)
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks == 0  # sparse, zeroed
    path.write_bytes(b"x" * 4096)
    prepare_volume(path, 2 << 20, fresh=False)  # the disk grew
    assert path.stat().st_size == 2 << 20 and path.read_bytes()[:1] == b"x"
    prepare_volume(path, 2 << 20, fresh=True)  # a new generation starts from zeroes
    assert path.read_bytes()[:1] == b"\0"
    path.unlink()
    with pytest.raises(JobError, match="missing"):
        prepare_volume(path, 1 << 20, fresh=False)


def test_node_id_is_stable_per_volumes_directory(tmp_path: Path) -> None:
    first = node_id(tmp_path / "a")
    assert first.startswith("node-") and node_id(tmp_path / "a") == first
    assert node_id(tmp_path / "b") != first


async def wait_for(what: Any, within: float = 10.0) -> Any:
    with trio.fail_after(within):
        while not (value := await what()):
            await trio.sleep(0.02)
    return value


async def test_a_volume_owns_its_change_ids_and_a_new_volume_gets_a_full_pass(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    """What the engine tells the VMA: each disk's base is the change ID its target volume
    received; a new volume (first pass, an explicit initial pass) is a new generation and a full
    pass (base null); a lost volume file fails the automatic pass with what to do; a fresh pass
    that fails leaves its volume recorded as failed."""
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_replications=True, engine_poll_interval=0.1)
    async with run_oma(config) as oma:
        assert (
            await oma.post("/vmware-credentials", json=cred_body(vma, is_default=True))
        ).status_code == 201
        st: OmaState = oma.extra["app"].extensions[STATE_KEY]
        assert st.engine is not None
        engine = st.engine

        async def start(**extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            job = (await oma.post("/replications", json=job_body("app01", **extra))).json()

            async def sent() -> Any:
                return vma.replications.get(job["id"])

            body = (await wait_for(sent))["body"]
            assert body["vm_ids"] == {"/DC/vm/app01": "vm-app01"}
            return (await oma.get(f"/replications/{job['id']}")).json(), body["targets"]["/DC/vm/app01"][
                "disk-2000"
            ]

        async def complete(job_id: str, change_id: str) -> None:
            r = await oma.post(
                f"/replications/{job_id}/changeid", json={"disk_id": "disk-2000", "change_id": change_id}
            )
            assert r.status_code == 201, r.text
            assert (await oma.put(f"/replications/{job_id}", json={"status": "completed"})).status_code == 200

            async def released() -> bool:
                return job_id not in engine.jobs

            await wait_for(released)

        async def volume() -> dict[str, Any]:
            row = await st.db.fetchrow("SELECT * FROM replica_volumes WHERE vm_id = 'vm-app01'")
            assert row is not None
            return dict(row)

        async def base() -> str | None:
            q = "/replications/changeid?vm_path=/DC/vm/app01&disk_id=disk-2000"
            value: str | None = (await oma.get(q)).json()["change_id"]
            return value

        # 0. a change ID recorded by a job run outside the engine (no volume received it)
        await st.db.execute(
            "INSERT INTO vm_disk_changeids (vm_path, disk_id, change_id, vcenter_host, vm_id)"
            " VALUES ('/DC/vm/app01', 'disk-2000', '52 3c/5', 'vcsim.lab.local', 'vm-app01')"
        )
        # 1. no volume yet: a new one (recorded before its file was made), a full pass: the job
        #    was created incremental from that change ID, but no volume of this OMA holds it
        job, target = await start()
        assert job["replication_type"] == "incremental" and target["base_change_id"] is None
        assert job["disks"][0]["base_change_id"] is None
        assert target["uri"] == job["disks"][0]["nbd_uri"]
        vol = await volume()
        assert (vol["state"], vol["generation"], vol["node_id"]) == ("creating", 1, await engine.node_id())
        assert vol["path"] == job["disks"][0]["volume_path"] and Path(vol["path"]).stat().st_blocks == 0
        assert Path(vol["path"]).parent.name == "vm-app01"  # the identity, not the name
        assert await base() is None
        await complete(job["id"], "52 3c/11")
        assert (await volume())["state"] == "ready" and await base() == "52 3c/11"

        # 2. automatic: incremental into the same volume, from its change ID
        job, target = await start()
        assert job["replication_type"] == "incremental" and target["base_change_id"] == "52 3c/11"
        assert job["disks"][0]["volume_path"] == vol["path"] and job["disks"][0]["volume_generation"] == 1
        await complete(job["id"], "52 3c/12")

        # 3. an initial replication after earlier passes: a new generation, a full pass, and no
        #    earlier change ID is a base any more (also for the seed's GET /changeid)
        job, target = await start(replication_type="initial")
        assert target["base_change_id"] is None and job["disks"][0]["volume_generation"] == 2
        assert (await volume())["state"] == "creating" and await base() is None
        await complete(job["id"], "52 3c/13")

        # 4. the volume file is lost: the automatic job fails and says what to do; the explicit
        #    initial replication makes a new generation with a full pass
        Path(vol["path"]).unlink()
        job = (await oma.post("/replications", json=job_body("app01"))).json()
        assert job["replication_type"] == "incremental"

        async def ended() -> Any:
            body = (await oma.get(f"/replications/{job['id']}")).json()
            return body if body["status"] == "failed" and job["id"] not in engine.jobs else None

        failed_job = await wait_for(ended)
        assert "run an initial replication" in failed_job["error_message"]
        assert job["id"] not in vma.replications and not Path(vol["path"]).exists()
        job, target = await start(replication_type="initial")
        assert target["base_change_id"] is None and job["disks"][0]["base_change_id"] is None
        assert job["disks"][0]["volume_generation"] == 3 and Path(vol["path"]).exists()

        # 5. that fresh pass fails: its volume says so, with its path; the next pass starts anew
        assert (
            await oma.put(f"/replications/{job['id']}", json={"status": "failed", "error_message": "boom"})
        ).status_code == 200

        async def failed() -> bool:
            return (await volume())["state"] == "failed"

        await wait_for(failed)
        vol = await volume()
        assert job["id"] in vol["error_message"] and vol["path"] == job["disks"][0]["volume_path"]
        job, target = await start()
        assert job["replication_type"] == "initial" and target["base_change_id"] is None
        assert job["disks"][0]["volume_generation"] == 4


async def test_the_engine_claims_only_jobs_whose_volumes_are_on_its_node(oma: Oma) -> None:
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]
    ids = {}
    for name in ("here", "there", "legacy", "new"):
        ids[name] = (await oma.post("/replications", json=job_body(name))).json()["id"]

    async def no_login(credential_id: int | None) -> None:
        raise AssertionError("not called")

    engine = ReplicationEngine(oma.config, st.db, st.vma, no_login, st.job_events)  # type: ignore[arg-type]
    node = await engine.node_id()
    for name, volume_node in (("here", node), ("there", "node-elsewhere"), ("legacy", None)):
        await st.db.execute(
            "INSERT INTO replica_volumes (id, vcenter_host, vm_id, disk_id, path, node_id, state)"
            " VALUES ($1, 'vcsim.lab.local', $2, 'disk-2000', $3, $4, 'ready')",
            f"vol-{name}",
            f"vm-{name}",
            f"/volumes/{name}.raw",
            volume_node,
        )
    claimed = {r["id"] for r in await engine.claim(10)}
    assert claimed == {ids["here"], ids["legacy"], ids["new"]}  # never where the volume is not
    job = (await oma.get(f"/replications/{ids['there']}")).json()
    assert job["status"] == "pending" and job["current_operation"] == "queued"


async def test_jobs_of_a_dead_oma_process_on_this_host_are_failed_at_start(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url)  # engine off: create the jobs first
    async with run_oma(config) as oma:
        dead = (await oma.post("/replications", json=job_body("orphan"))).json()["id"]
        alive = (await oma.post("/replications", json=job_body("elsewhere"))).json()["id"]
        st: OmaState = oma.extra["app"].extensions[STATE_KEY]
        await st.db.execute(
            "UPDATE replication_jobs SET claimed_by = $2 WHERE id = $1",
            dead,
            f"{socket.gethostname()}:999999999:x",
        )
        await st.db.execute("UPDATE replication_jobs SET claimed_by = 'otherhost:1:x' WHERE id = $1", alive)
    async with run_oma(config.with_overrides(run_replications=True)) as oma:
        with trio.fail_after(10):
            while (job := (await oma.get(f"/replications/{dead}")).json())["status"] == "pending":
                await trio.sleep(0.05)
        assert job["status"] == "failed" and "stopped" in job["error_message"]
        assert not any(d["active"] for d in job["disks"])
        assert (await oma.get(f"/replications/{alive}")).json()["status"] == "pending"  # another host's
