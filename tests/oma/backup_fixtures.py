"""Real backup chains for the OMA tests: QCOW2 images written by the mover, rows as the backup
engine writes them.

(Imported as ``backup_fixtures``: pytest puts ``tests/oma`` on ``sys.path``.)

A chain is built from a sparse raw "disk": random 1 MiB chunks are written into it, the full is
``mover.copy(raw, <repo>/<vm>/<disk>/<id>.qcow2, allocated_only=True)``, and each incremental
writes more chunks and copies just those extents into an overlay on the previous point
(``backing=``). Each point's ``backup_jobs`` row is inserted completed, with the digest the copy
returned; with ``snapshots`` a sparse copy of the raw disk as it was at that point is kept, so a
test can compare a point (after a copy or a merge) with the data it must hold.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from oma.backups.layout import manifest_path, point_path, vm_key
from oma.state import STATE_KEY, OmaState
from pyapp import mover
from pyapp.db import Database
from tests.oma.oma_harness import Oma, make_config, run_oma

MIB = 1 << 20
DISK_SIZE = 64 * MIB


@dataclass(frozen=True)
class BackupPoint:
    backup_id: str
    path: Path
    disk_digest: str
    parent_id: str | None
    chain_id: str
    created_at: dt.datetime
    #: The raw disk as it was at this point (when the chain was built with ``snapshots``).
    snapshot: Path | None


def key_of(vm_name: str) -> str:
    """The identity :func:`build_chain` gives the VM ``vm_name`` by default."""
    return vm_key("vcsim.lab.local", f"vm-{vm_name}")


def state_of(oma: Oma) -> OmaState:
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]
    return st


def db_of(oma: Oma) -> Database:
    return state_of(oma).db


@asynccontextmanager
async def run_backup_oma(tmp_path: Path, dsn: str, vma_url: str, **overrides: Any) -> AsyncIterator[Oma]:
    """The OMA of the backup tests: the copy worker polls fast; ``run_backups`` as given (off by
    default, so a test drives the services itself)."""
    values: dict[str, Any] = {"run_backups": False, "mount_root": tmp_path / "mounts"}
    values.update(overrides)
    async with run_oma(make_config(tmp_path, dsn, vma_url, **values)) as oma:
        yield oma


async def create_local_repository(oma: Oma, name: str, root: Path, **fields: Any) -> str:
    r = await oma.post(
        "/repositories", json={"name": name, "type": "local", "config": {"disk_path": str(root)}, **fields}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def write_random_chunks(raw: Path, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Write ``count`` random 1 MiB chunks at random MiB-aligned offsets; returns the extents."""
    extents = []
    with raw.open("r+b") as f:
        for index in sorted(rng.sample(range(DISK_SIZE // MIB), count)):
            f.seek(index * MIB)
            f.write(rng.randbytes(MIB))
            extents.append((index * MIB, MIB))
    return extents


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


async def build_chain(
    db: Database,
    workdir: Path,
    repo_root: Path,
    repository_id: str,
    *,
    points: int = 3,
    vm_name: str = "web01",
    key: str | None = None,
    disk_id: str = "disk-2000",
    policy_id: str | None = None,
    created_at: list[dt.datetime] | None = None,
    snapshots: bool = False,
    seed: int = 1,
    full_chunks: int = 4,
) -> list[BackupPoint]:
    """A full (``full_chunks`` MiB of random data) and ``points - 1`` incrementals (2 MiB each)
    of one 64 MiB disk in one repository, oldest first. The VM's identity is ``key`` (by
    default a moref made from the name, one VM per name)."""
    key = key or key_of(vm_name)
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / f"{vm_name}-{disk_id}-{uuid.uuid4().hex[:6]}.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_SIZE)
    now = dt.datetime.now(dt.UTC)
    times = created_at or [now - dt.timedelta(minutes=points - i) for i in range(points)]
    chain: list[BackupPoint] = []
    for i in range(points):
        backup_id = f"backup-{uuid.uuid4().hex}"
        extents = write_random_chunks(raw, rng, full_chunks if i == 0 else 2)
        parent = chain[-1] if chain else None
        target = point_path(repo_root, key, disk_id, backup_id, parent.path if parent else None)
        target.parent.mkdir(parents=True, exist_ok=True)
        if parent is None:
            report = await mover.copy(str(raw), str(target), allocated_only=True)
        else:
            report = await mover.copy(str(raw), str(target), extents=extents, backing=parent.path)
        assert report.disk_digest is not None
        snapshot = None
        if snapshots:
            snapshot = workdir / f"{backup_id}.raw"
            sparse_copy(raw, snapshot)
        chain_id = parent.chain_id if parent else backup_id
        await db.execute(
            "INSERT INTO backup_jobs (id, vm_name, vm_key, vm_path, disk_id, backup_type, requested_type,"
            " repository_id, policy_id, parent_backup_id, chain_id, status, file_path, manifest_path,"
            " virtual_size_bytes, stored_bytes, disk_digest, progress_percent, created_at, started_at,"
            " completed_at)"
            " VALUES ($1, $2, $16, $3, $4, $5, $5, $6, $7, $8, $9, 'completed', $10, $11, $12, $13, $14, 100,"
            " $15, $15, $15)",
            backup_id,
            vm_name,
            f"/DC/vm/{vm_name}",
            disk_id,
            "incremental" if parent else "full",
            repository_id,
            policy_id,
            parent.backup_id if parent else None,
            chain_id,
            str(target),
            str(manifest_path(target)),
            DISK_SIZE,
            target.stat().st_size,
            report.disk_digest,
            times[i],
            key,
        )
        chain.append(
            BackupPoint(
                backup_id,
                target,
                report.disk_digest,
                parent.backup_id if parent else None,
                chain_id,
                times[i],
                snapshot,
            )
        )
    raw.unlink()
    return chain


@contextmanager
def mounted_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A real mount (a small tmpfs) at ``path``: a share that is already mounted, or a small
    disk that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", str(path)], check=True)


def qemu_img_compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare`` (exit 0: same logical disk), each file read through its own chain."""
    return subprocess.run(
        ["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False
    )


def data_cluster_offset(image: Path) -> int:
    """The host offset, in ``image`` itself, of its first data cluster (``qemu-img map``)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True, check=True
    ).stdout
    for entry in json.loads(out):
        if entry.get("data") and entry.get("depth") == 0 and "offset" in entry:
            return int(entry["offset"])
    raise AssertionError(f"{image} holds no data cluster of its own")


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


async def wait_for_copies(oma: Oma, backup_id: str, *, within: float = 60.0) -> list[dict[str, Any]]:
    """Poll ``GET /backups/{id}/copies`` until no copy of the point is queued or running."""
    with trio.fail_after(within):
        while True:
            r: httpx.Response = await oma.get(f"/backups/{backup_id}/copies")
            assert r.status_code == 200, r.text
            copies: list[dict[str, Any]] = r.json()
            if copies and all(c["status"] in ("completed", "failed") for c in copies):
                return copies
            await trio.sleep(0.2)
