"""The replication engine's claim and failure paths, against a real PostgreSQL (the copy itself is
tested against the real VMA in tests/e2e)."""

from __future__ import annotations

import socket
from pathlib import Path

import trio
from oma_harness import Oma, make_config, run_oma
from test_oma_replications import job_body
from vma_double import VmaDouble

from oma.engine import ReplicationEngine, finish_job, prepare_volume, safe_name, volume_path
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

    engines = [ReplicationEngine(oma.config, st.db, st.vma, no_login) for _ in range(2)]  # type: ignore[arg-type]
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
    assert await finish_job(st.db, ids[0], "completed", None)
    assert not await finish_job(st.db, ids[0], "failed", "late")
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


def test_volumes(tmp_path: Path) -> None:
    config = make_config(tmp_path, "postgresql://unused", "http://127.0.0.1:9")
    path = volume_path(config, "web/01 ..x", "disk-2000")
    assert path == config.data_dir / "volumes" / "web_01_..x" / "disk-2000.raw"
    assert safe_name("..") == "_"
    prepare_volume(path, 1 << 20, fresh=True)
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks == 0  # sparse, zeroed
    path.write_bytes(b"x" * 4096)
    prepare_volume(path, 2 << 20, fresh=False)  # the disk grew
    assert path.stat().st_size == 2 << 20 and path.read_bytes()[:1] == b"x"
    prepare_volume(path, 2 << 20, fresh=True)  # a new initial pass starts from zeroes
    assert path.read_bytes()[:1] == b"\0"
    path.unlink()
    try:
        prepare_volume(path, 1 << 20, fresh=False)
    except Exception as e:
        assert "initial replication" in str(e)
    else:
        raise AssertionError("a missing volume must fail an incremental pass")


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
