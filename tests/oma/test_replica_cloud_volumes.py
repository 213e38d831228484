"""The replication engine with cloud volumes (the replication domain's ``CloudVolumes``), against a
real PostgreSQL and the VMA double, the cloud a recording fake: a generation's row is written
with its name before the volume is created; an incremental pass reuses the volume (attached
again, never created again); a file volume is replaced by a cloud volume once the cloud is
configured (its file removed); a create that fails after the cloud allocated the volume deletes
it (found by name) and fails the job. The real CloudStack path is tested end to end in
tests/e2e/test_cloudstack_replication.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oma_harness import Oma, make_config, run_oma
from test_oma_credentials import cred_body
from test_oma_engine import wait_for
from test_oma_replications import job_body
from vma_double import VmaDouble

from oma.replication.volumes import cloud_volume_name
from oma.state import STATE_KEY, OmaState
from pyapp.api import ApiError
from pyapp.db import Database


@dataclass
class FakeCloud:
    """Volumes as files under ``root``; devices as links under ``root/dev``; every call logged."""

    root: Path
    db: Database
    is_configured: bool = True
    fail_create: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)
    volumes: dict[str, str] = field(default_factory=dict)  # id -> name
    rows_at_create: list[dict[str, Any]] = field(default_factory=list)

    async def configured(self) -> bool:
        return self.is_configured

    async def create(self, name: str, size_bytes: int) -> str:
        self.calls.append(("create", name))
        row = await self.db.fetchrow("SELECT * FROM replica_volumes WHERE cloudstack_volume_name = $1", name)
        self.rows_at_create.append(dict(row) if row is not None else {})
        volume_id = str(uuid.uuid4())
        with (self.root / volume_id).open("wb") as f:
            f.truncate(size_bytes)
        self.volumes[volume_id] = name  # allocated, as CloudStack does before its job runs
        if self.fail_create:
            raise ApiError(530, "CLOUDSTACK_ERROR", "CloudStack createVolume failed: no capacity")
        return volume_id

    async def find(self, name: str) -> str | None:
        self.calls.append(("find", name))
        return next((i for i, n in self.volumes.items() if n == name), None)

    async def size(self, volume_id: str) -> int | None:
        path = self.root / volume_id
        return path.stat().st_size if volume_id in self.volumes else None

    async def attach(self, volume_id: str) -> Path:
        self.calls.append(("attach", volume_id))
        device = self.root / "dev" / volume_id
        device.parent.mkdir(exist_ok=True)
        if not device.is_symlink():
            device.symlink_to(self.root / volume_id)
        return device

    async def delete(self, volume_id: str) -> bool:
        self.calls.append(("delete", volume_id))
        if self.volumes.pop(volume_id, None) is None:
            return False
        (self.root / "dev" / volume_id).unlink(missing_ok=True)
        (self.root / volume_id).unlink()
        return True


async def run(oma: Oma, vma: VmaDouble, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create a job of app01 and wait until the VMA was told to copy: the job and its target."""
    job = (await oma.post("/replications", json=job_body("app01", **extra))).json()

    async def sent() -> Any:
        return vma.replications.get(job["id"])

    body = (await wait_for(sent))["body"]
    return (await oma.get(f"/replications/{job['id']}")).json(), body["targets"]["/DC/vm/app01"]["disk-2000"]


async def complete(oma: Oma, st: OmaState, job_id: str, change_id: str) -> None:
    r = await oma.post(
        f"/replications/{job_id}/changeid", json={"disk_id": "disk-2000", "change_id": change_id}
    )
    assert r.status_code == 201, r.text
    assert (await oma.put(f"/replications/{job_id}", json={"status": "completed"})).status_code == 200
    assert st.engine is not None
    engine = st.engine

    async def released() -> bool:
        return job_id not in engine.jobs

    await wait_for(released)


async def volume_row(st: OmaState) -> dict[str, Any]:
    row = await st.db.fetchrow("SELECT * FROM replica_volumes WHERE vm_id = 'vm-app01'")
    assert row is not None
    return dict(row)


@asynccontextmanager
async def oma_with_cloud(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble, **cloud: Any
) -> AsyncIterator[tuple[Oma, OmaState, FakeCloud]]:
    """The OMA with its engine on, a default credential, and a :class:`FakeCloud` as the cloud
    volumes of both the engine and the API."""
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_replications=True, engine_poll_interval=0.1)
    async with run_oma(config) as oma:
        r = await oma.post("/vmware-credentials", json=cred_body(vma, is_default=True))
        assert r.status_code == 201, r.text
        st: OmaState = oma.extra["app"].extensions[STATE_KEY]
        assert st.engine is not None
        (tmp_path / "cloud").mkdir()
        fake = FakeCloud(tmp_path / "cloud", st.db, **cloud)
        st.engine.cloud = st.replica_volumes = fake
        yield oma, st, fake


async def test_cloud_volumes_recorded_before_creation_reused_and_replacing_files(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    async with oma_with_cloud(tmp_path, oma_dsn, vma, is_configured=False) as (oma, st, cloud):
        # 1. not configured: a file volume, as without a cloud
        job, _ = await run(oma, vma)
        file_path = Path(job["disks"][0]["volume_path"])
        assert file_path.is_file() and job["disks"][0]["cloudstack_volume_id"] is None and cloud.calls == []
        await complete(oma, st, job["id"], "52 3c/1")

        # 2. configured: the file's base is not applied to a new cloud volume: a full pass into a
        #    new generation, recorded (name, creating) before the volume was created; the file goes
        cloud.is_configured = True
        job, target = await run(oma, vma)
        name = cloud_volume_name((await volume_row(st))["id"], 2)
        assert target["base_change_id"] is None and cloud.calls[0] == ("create", name)
        assert cloud.rows_at_create[0]["state"] == "creating"
        assert cloud.rows_at_create[0]["cloudstack_volume_id"] is None
        cloud_id = job["disks"][0]["cloudstack_volume_id"]
        assert cloud_id in cloud.volumes and job["disks"][0]["volume_path"] == str(
            cloud.root / "dev" / cloud_id
        )
        row = await volume_row(st)
        assert (row["backend"], row["cloudstack_volume_id"], row["device_path"]) == (
            "cloudstack",
            cloud_id,
            str(cloud.root / "dev" / cloud_id),
        )
        assert not file_path.exists()
        await complete(oma, st, job["id"], "52 3c/2")

        # 3. incremental: the same volume, attached again (as it is), never created again
        cloud.calls.clear()
        job, target = await run(oma, vma)
        assert target["base_change_id"] == "52 3c/2" and job["disks"][0]["cloudstack_volume_id"] == cloud_id
        assert cloud.calls == [("attach", cloud_id)]
        await complete(oma, st, job["id"], "52 3c/3")

        # 4. deleting the replication with its volumes deletes the cloud volume and the row
        r = await oma.delete(f"/replications/{job['id']}", params={"delete_volumes": "true"})
        assert r.status_code == 200, r.text
        assert [v["cloudstack_volume_id"] for v in r.json()["volumes_deleted"]] == [cloud_id]
        assert cloud.volumes == {} and await st.db.fetchval("SELECT count(*) FROM replica_volumes") == 0


async def test_a_failed_create_deletes_what_the_cloud_allocated_and_fails_the_job(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    async with oma_with_cloud(tmp_path, oma_dsn, vma, fail_create=True) as (oma, st, cloud):
        engine = st.engine
        assert engine is not None

        job = (await oma.post("/replications", json=job_body("app01"))).json()

        async def ended() -> Any:
            body = (await oma.get(f"/replications/{job['id']}")).json()
            return body if body["status"] == "failed" and job["id"] not in engine.jobs else None

        failed = await wait_for(ended)
        assert "createVolume failed: no capacity" in failed["error_message"]
        assert job["id"] not in vma.replications  # the VMA was never asked to copy
        # deleted at once by name; the end of the job looks for it again (by name: no id recorded)
        assert cloud.volumes == {} and [c[0] for c in cloud.calls] == ["create", "find", "delete", "find"]
        row = await volume_row(st)
        assert row["state"] == "failed" and row["cloudstack_volume_id"] is None

        # the retry succeeds
        cloud.fail_create = False
        job, target = await run(oma, vma)
        assert target["base_change_id"] is None and job["disks"][0]["cloudstack_volume_id"] in cloud.volumes
