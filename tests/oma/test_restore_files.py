"""File-level and full restore over real HTTP, on QCOW2 chains written by the mover.

The disks are built by the lab without mounting anything: a GPT disk with ext4, XFS, FAT and
NTFS partitions holding known trees (nested directories, symlinks inside the file system and
pointing outside it), an MBR disk, a disk with an LVM2 volume, a disk without a partition table.
Each becomes a backup chain with the mover: a full, then (for the GPT disk) the guest rewrites
its ext4 partition (:func:`lab.guest.rewrite_partition`) and an incremental copies the
changed blocks onto an overlay. The points are rows of ``backup_jobs`` in the OMA's database.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import subprocess
import tarfile
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from oma_harness import Oma, make_config, run_oma
from test_oma_auth import assert_envelope
from vma_double import VmaDouble

from lab import MiB, Partition, build_disk
from lab.disks import build_dos_disk_with_logicals
from lab.filesystems import build_partition
from lab.guest import rewrite_partition
from oma.restore.full import accept_job, check_target, fail_orphaned_jobs, run_full_restore
from pyapp import mover
from pyapp.db import open_database
from pyapp.nbd_export import NbdExport

_rng = random.Random(20261122)

EXT4_V1: dict[str, bytes] = {
    "etc/hostname": b"web01\n",
    "docs/readme.txt": b"Read me first.\n" * 40,
    "docs/nested/deeper/data.bin": _rng.randbytes(300 * 1024 + 5),
    "config.json": b'{"service": "web", "port": 8080}\n',
    "big.bin": _rng.randbytes(3 * MiB + 17),
}
EXT4_V2: dict[str, bytes] = {
    **EXT4_V1,
    "etc/hostname": b"web01-v2\n",
    "docs/new.txt": b"added after the full\n",
}
EXT4_LINKS = {
    "docs/link-to-readme": "readme.txt",
    "docs/nested/up": "../../etc/hostname",
    "docs/dirlink": "nested",
    "evil-relative": "../../etc/passwd",
    "docs/evil-deep": "../../../../../etc/passwd",
    "evil-absolute": "/etc/passwd",
}
XFS_FILES = {"srv/www/index.html": b"<html>hello</html>\n", "srv/www/app.js": b"console.log(1);\n" * 100}
XFS_LINKS = {"current": "srv/www"}
FAT_FILES = {"EFI/Boot/BootX64.efi": b"MZ" + _rng.randbytes(70_000), "Notes/ReadMe.txt": b"fat notes\n"}
NTFS_FILES = {"Report.docx": _rng.randbytes(200_000), "data.csv": b"a,b\n1,2\n"}


@dataclass(frozen=True)
class Chain:
    full: Path
    incremental: Path
    full_digest: str
    incremental_digest: str
    raw_v2: Path


@dataclass(frozen=True)
class Disks:
    gpt: Chain
    mbr: Path
    lvm: Path
    bare: Path
    bare_fat: Path
    #: MBR with an extended partition: primary 1, logicals 5 and 6; and the raw disk.
    mbr_logical: Path
    mbr_logical_raw: Path


def _image_of(raw: Path) -> Path:
    """A standalone QCOW2 backup of ``raw`` written by the mover."""
    out = raw.with_suffix(".qcow2")
    trio.run(lambda: mover.copy(str(raw), str(out), allocated_only=True))
    return out


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Disks:
    base = tmp_path_factory.mktemp("restore-disks")
    raw = base / "gpt.raw"
    layout = build_disk(
        raw,
        400 * MiB,
        [
            Partition(32 * MiB, "ext4", "root", EXT4_V1, symlinks=EXT4_LINKS),
            Partition(300 * MiB, "xfs", "srv", XFS_FILES, symlinks=XFS_LINKS),
            Partition(32 * MiB, "fat", "EFI", FAT_FILES),
            Partition(32 * MiB, "ntfs", "DATA", NTFS_FILES),
        ],
    )
    repo = base / "repo" / "web01" / "disk-2000"
    repo.mkdir(parents=True)
    full, inc = repo / "backup-full.qcow2", repo / "backup-inc.qcow2"

    async def chain() -> tuple[str, str]:
        first = await mover.copy(str(raw), str(full), allocated_only=True)
        extents = rewrite_partition(raw, layout, 1, EXT4_V2, EXT4_LINKS)
        second = await mover.copy(str(raw), str(inc), extents=extents, backing=full)
        assert first.disk_digest and second.disk_digest
        return first.disk_digest, second.disk_digest

    full_digest, inc_digest = trio.run(chain)
    legacy = base / "legacy-names"  # a file name that is not UTF-8 (Latin-1, as old guests wrote)
    (legacy / "only").mkdir(parents=True)
    with open(os.fsencode(legacy / "only") + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 name\n")
    mbr_part = Partition(32 * MiB, "ext4", "", {"only/file.txt": b"mbr\n"}, source=legacy)
    mbr = build_disk(base / "mbr.raw", 48 * MiB, [mbr_part], table="dos").path
    lvm = build_disk(
        base / "lvm.raw",
        96 * MiB,
        [Partition(16 * MiB, "ext4", "boot", {"vmlinuz": b"kernel"}),
         Partition(64 * MiB, "lvm", files={"home/alice/notes.txt": b"alice\n"},
                   symlinks={"latest": "home/alice"})],
    ).path  # fmt: skip
    bare = base / "bare.raw"
    build_partition(Partition(16 * MiB, "ext4", "bare", {"whole/disk.txt": b"no table\n"}), 1, bare, base)
    bare_fat = base / "bare-fat.raw"  # mkfs.fat's boot sector passes for an MBR
    build_partition(
        Partition(64 * MiB, "fat", "STICK", {"Photos/Cat.jpg": b"\xff\xd8cat"}), 1, bare_fat, base
    )
    mbr_logical = build_dos_disk_with_logicals(
        base / "mbr-logical.raw",
        64 * MiB,
        [Partition(8 * MiB, "ext4", "one", {"one.txt": b"primary 1\n"})],
        [
            Partition(16 * MiB, "ext4", "five", {"five.txt": b"logical 5\n"}),
            Partition(16 * MiB, "fat", "SIX", {"six.txt": b"logical 6\n"}),
        ],
    ).path
    return Disks(
        gpt=Chain(full, inc, full_digest, inc_digest, raw),
        mbr=_image_of(mbr),
        lvm=_image_of(lvm),
        bare=_image_of(bare),
        bare_fat=_image_of(bare_fat),
        mbr_logical=_image_of(mbr_logical),
        mbr_logical_raw=mbr_logical,
    )


async def insert_backup(
    oma: Oma, file_path: Path, *, status: str = "completed", digest: str | None = None, vm: str = "web01"
) -> str:
    """A backup point row (and its repository) in the OMA's database."""
    backup_id = f"backup-{uuid.uuid4().hex}"
    repo_id = f"repo-{uuid.uuid4().hex}"
    assert oma.config.database_url
    async with open_database(oma.config.database_url, min_size=1, max_size=1) as db:
        await db.execute(
            "INSERT INTO backup_repositories (id, name, type, config) VALUES ($1, $2, 'local', $3::jsonb)",
            repo_id,
            repo_id,
            json.dumps({"disk_path": str(file_path.parent)}),
        )
        await db.execute(
            "INSERT INTO backup_jobs (id, vm_name, vm_key, vm_path, disk_id, backup_type, requested_type,"
            " repository_id, chain_id, status, file_path, disk_digest, completed_at)"
            " VALUES ($1, $2, 'moref:vcsim/' || $1, $3, 'disk-2000', 'full', 'full', $4, $1, $5, $6, $7,"
            " now())",
            backup_id,
            vm,
            f"/DC/vm/{vm}",
            repo_id,
            status,
            str(file_path),
            digest,
        )
    return backup_id


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    """The OMA with the test's directory (and ``/dev``, for block devices) as restore roots: a
    full restore writes host paths only under a root an administrator configured."""
    config = make_config(tmp_path, oma_dsn, vma.base_url, restore_roots=(tmp_path, Path("/dev")))
    async with run_oma(config) as handle:
        yield handle


async def mount(oma: Oma, backup_id: str, volume: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"backup_id": backup_id}
    if volume is not None:
        body["volume"] = volume
    r = await oma.post("/restore/mount", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def files(oma: Oma, mount_id: str, path: str, recursive: bool = False) -> dict[str, dict[str, Any]]:
    r = await oma.get(
        f"/restore/{mount_id}/files", params={"path": path, "recursive": str(recursive).lower()}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_count"] == len(body["files"]) and body["truncated"] is False
    return {f["path"]: f for f in body["files"]}


async def download(oma: Oma, mount_id: str, path: str) -> httpx.Response:
    return await oma.get(f"/restore/{mount_id}/download", params={"path": path})


def tree(prefix: str, content: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{prefix}/{k}": v for k, v in content.items()}


async def test_browse_and_download_a_gpt_chain(oma: Oma, disks: Disks) -> None:
    backup_id = await insert_backup(oma, disks.gpt.incremental, digest=disks.gpt.incremental_digest)
    m = await mount(oma, backup_id)
    mount_id = m["mount_id"]
    assert "mount_path" not in m and "nbd_device" not in m  # no kernel mount, no NBD device
    assert m["status"] == "mounted" and m["backup_id"] == backup_id
    assert [(v["name"], v["filesystem_type"]) for v in m["volumes"]] == [
        ("part1", "ext4"), ("part2", "xfs"), ("part3", "fat"), ("part4", "ntfs")
    ]  # fmt: skip
    assert m["filesystem_type"] == "ext4,fat,ntfs,xfs"

    r = await oma.get("/restore/mounts")
    assert r.json()["count"] == 1 and r.json()["mounts"][0]["mount_id"] == mount_id

    root = await files(oma, mount_id, "/")
    assert sorted(root) == ["/part1", "/part2", "/part3", "/part4"]
    assert all(f["type"] == "directory" for f in root.values())

    # ext4: the incremental point's tree (v2), recursively, with the links as links.
    listing = await files(oma, mount_id, "/part1", recursive=True)
    regular = {p: f for p, f in listing.items() if f["type"] == "file"}
    assert set(regular) == set(tree("/part1", EXT4_V2))
    assert all(regular[p]["size"] == len(data) for p, data in tree("/part1", EXT4_V2).items())
    links = {p: f["symlink_target"] for p, f in listing.items() if f["type"] == "symlink"}
    assert links == {f"/part1/{k}": v for k, v in EXT4_LINKS.items()}
    assert "/part1/docs/nested/deeper" in listing and "/part1/lost+found" in listing
    assert len(await files(oma, mount_id, "/part1")) < len(listing)

    info = (await oma.get(f"/restore/{mount_id}/file-info", params={"path": "/part1/docs/readme.txt"})).json()
    assert (
        info["name"] == "readme.txt" and info["path"] == "/part1/docs/readme.txt" and info["type"] == "file"
    )
    assert info["size"] == len(EXT4_V1["docs/readme.txt"])
    assert (
        info["mode"] == "0644"
        and info["permissions"] == "-rw-r--r--"
        and (info["uid"], info["gid"]) == (0, 0)
    )
    assert info["modified"] == "2023-11-14T22:13:20Z"  # the lab's fixed file time
    assert info["volume"] == "part1" and info["filesystem_type"] == "ext4"
    link = (await oma.get(f"/restore/{mount_id}/file-info", params={"path": "part1/evil-absolute"})).json()
    assert link["type"] == "symlink" and link["symlink_target"] == "/etc/passwd"

    # Downloads: every file system, exact bytes, length and type.
    expected = {
        **tree("/part1", EXT4_V2),
        **tree("/part2", XFS_FILES),
        "/part3/EFI/Boot/BootX64.efi": FAT_FILES["EFI/Boot/BootX64.efi"],
        "/part3/notes/readme.txt": FAT_FILES["Notes/ReadMe.txt"],  # FAT matches names without case
        **tree("/part4", NTFS_FILES),
    }
    for path, data in expected.items():
        r = await download(oma, mount_id, path)
        assert r.status_code == 200, (path, r.text)
        assert r.content == data, path
        assert r.headers["content-length"] == str(len(data))
        name = path.rsplit("/", 1)[1]
        assert f'filename="{name}"' in r.headers["content-disposition"].lower().replace(name.lower(), name)
    r = await download(oma, mount_id, "/part1/config.json")
    assert r.headers["content-type"].startswith("application/json")
    r = await download(oma, mount_id, "/part2/srv/www/index.html")
    assert r.headers["content-type"].startswith("text/html")
    r = await download(oma, mount_id, "/part1/big.bin")
    assert r.headers["content-type"] == "application/octet-stream" and r.content == EXT4_V1["big.bin"]

    # Symlinks inside the file system are followed, also through '..' that stays inside.
    assert (await download(oma, mount_id, "/part1/docs/link-to-readme")).content == EXT4_V1["docs/readme.txt"]
    assert (await download(oma, mount_id, "/part1/docs/nested/up")).content == b"web01-v2\n"
    assert (await download(oma, mount_id, "/part1/docs/dirlink/deeper/data.bin")).status_code == 200
    assert (await download(oma, mount_id, "/part2/current/app.js")).content == XFS_FILES["srv/www/app.js"]
    # Listing through a link to a directory answers with canonical paths (the link resolved).
    assert "/part1/docs/nested/deeper" in await files(oma, mount_id, "/part1/docs/dirlink")

    r = await download(oma, mount_id, "/part1/docs")
    assert r.status_code == 400 and r.json()["code"] == "IS_A_DIRECTORY"
    r = await download(oma, mount_id, "/part1/docs/missing.txt")
    assert r.status_code == 404
    assert_envelope(r.json(), "PATH_NOT_FOUND")

    # The full (older) point still shows the first version.
    older = await mount(oma, await insert_backup(oma, disks.gpt.full, vm="web01-full"), volume="part1")
    assert (await download(oma, older["mount_id"], "/etc/hostname")).content == b"web01\n"
    assert "/docs/new.txt" not in await files(oma, older["mount_id"], "/docs")

    r = await oma.delete(f"/restore/{mount_id}")
    assert r.status_code == 200 and r.json()["message"] == "backup unmounted successfully"
    r = await oma.get(f"/restore/{mount_id}/files", params={"path": "/"})
    assert r.status_code == 410
    assert_envelope(r.json(), "MOUNT_GONE")
    assert (await oma.delete(f"/restore/{mount_id}")).status_code == 410
    r = await oma.get("/restore/mount-unknown/files")
    assert r.status_code == 404 and r.json()["code"] == "MOUNT_NOT_FOUND"
    assert (await oma.get("/restore/mounts")).json()["count"] == 1


async def test_traversal_is_refused(oma: Oma, disks: Disks) -> None:
    mount_id = (await mount(oma, await insert_backup(oma, disks.gpt.incremental)))["mount_id"]
    refused = [
        "../etc/passwd",
        "/part1/../../etc/passwd",
        "/part1/docs/../../../etc/passwd",
        "/part1/evil-relative",
        "/part1/docs/evil-deep",
        "/part1/evil-absolute",
        "..\\..\\etc\\passwd",
        "/part1/docs\\..\\..\\etc",
        "/part1/etc/hostname\x00.txt",
    ]
    for path in refused:
        for view in ("download", "files", "download-directory"):
            r = await oma.get(f"/restore/{mount_id}/{view}", params={"path": path})
            assert r.status_code == 400, (view, path, r.text)
            assert_envelope(r.json(), "PATH_TRAVERSAL")
    base = oma.url(f"/restore/{mount_id}/download")
    encoded = ("..%2F..%2Fetc%2Fpasswd", "%2Fpart1%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
               "/part1/%2e%2e/%2e%2e/x", "/part1/etc%00", "%5C..%5C..%5Cetc")  # fmt: skip
    for raw in encoded:
        r = await oma.client.get(f"{base}?path={raw}", headers=oma.auth)
        assert r.status_code == 400 and r.json()["code"] == "PATH_TRAVERSAL", raw
    # Encoded twice: a literal name, which does not exist (never decoded again).
    r = await oma.client.get(f"{base}?path=/part1/%252e%252e/%252e%252e/etc/passwd", headers=oma.auth)
    assert r.status_code == 404
    # file-info describes an outside link without following it; the listing shows it too.
    r = await oma.get(f"/restore/{mount_id}/file-info", params={"path": "/part1/evil-relative"})
    assert r.status_code == 200 and r.json()["symlink_target"] == "../../etc/passwd"
    r = await oma.get(f"/restore/{mount_id}/file-info", params={"path": "/part1/evil-relative/x"})
    assert r.status_code == 400 and r.json()["code"] == "PATH_TRAVERSAL"


def _tree_of_zip(data: bytes) -> tuple[dict[str, bytes], dict[str, str], set[str]]:
    files_: dict[str, bytes] = {}
    links: dict[str, str] = {}
    dirs: set[str] = set()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        for info in zf.infolist():
            assert info.flag_bits & 0x08  # streamed: sizes in a data descriptor
            mode = info.external_attr >> 16
            if info.is_dir():
                dirs.add(info.filename.rstrip("/"))
            elif (mode & 0o170000) == 0o120000:
                links[info.filename] = zf.read(info).decode()
            else:
                files_[info.filename] = zf.read(info)
    return files_, links, dirs


def _tree_of_tar(data: bytes) -> tuple[dict[str, bytes], dict[str, str], set[str]]:
    files_: dict[str, bytes] = {}
    links: dict[str, str] = {}
    dirs: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isdir():
                dirs.add(member.name)
            elif member.issym():
                links[member.name] = member.linkname
            else:
                f = tar.extractfile(member)
                assert f is not None
                files_[member.name] = f.read()
    return files_, links, dirs


def _check_unpacked_by_the_tool(fmt: str, data: bytes, tmp_path: Path) -> None:
    archive = tmp_path / f"part1.{fmt}"
    archive.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    tool = (
        ["unzip", "-q", str(archive), "-d", str(out)]
        if fmt == "zip"
        else ["tar", "-xzf", str(archive), "-C", str(out)]
    )
    subprocess.run(tool, check=True, capture_output=True)
    unpacked = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert unpacked == tree("part1", EXT4_V2)
    assert {k: os.readlink(out / "part1" / k) for k in EXT4_LINKS} == EXT4_LINKS
    assert (out / "part1" / "docs" / "readme.txt").stat().st_mode & 0o777 == 0o644
    assert (out / "part1" / "docs" / "nested").stat().st_mode & 0o777 == 0o755


def _modes_of_zip(data: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename.rstrip("/"): (i.external_attr >> 16) & 0o7777 for i in zf.infolist()}


def _modes_of_tar(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m.mode for m in tar.getmembers()}


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
async def test_download_directory(oma: Oma, disks: Disks, fmt: str, tmp_path: Path) -> None:
    mount_id = (await mount(oma, await insert_backup(oma, disks.gpt.incremental)))["mount_id"]
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/part1", "format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ("application/zip" if fmt == "zip" else "application/gzip")
    assert f'filename="part1.{fmt}"' in r.headers["content-disposition"]
    got_files, got_links, got_dirs = (_tree_of_zip if fmt == "zip" else _tree_of_tar)(r.content)
    assert got_files == tree("part1", EXT4_V2)
    # Links are stored as links, never followed (the outside ones too: no host file comes back).
    assert got_links == {f"part1/{k}": v for k, v in EXT4_LINKS.items()}
    assert {"part1/docs", "part1/docs/nested", "part1/docs/nested/deeper", "part1/etc"} <= got_dirs

    # The usual tools unpack it: files with their bytes and modes, links as links.
    _check_unpacked_by_the_tool(fmt, r.content, tmp_path)  # unzip and tar: bootstrap.sh installs both

    # FAT has no modes: directories come out traversable, files readable.
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/part3", "format": fmt})
    modes = _modes_of_zip(r.content) if fmt == "zip" else _modes_of_tar(r.content)
    assert modes["part3/EFI/Boot"] == 0o755 and modes["part3/EFI/Boot/BootX64.efi"] == 0o644

    # A subdirectory; a symlink to a directory as the start is followed (it stays inside).
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/part1/docs/dirlink"})
    got_files, _, _ = _tree_of_zip(r.content)
    assert got_files == {"nested/deeper/data.bin": EXT4_V1["docs/nested/deeper/data.bin"]}
    # The whole mount: one directory per volume.
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/", "format": fmt})
    got_files, _, _ = (_tree_of_zip if fmt == "zip" else _tree_of_tar)(r.content)
    root = f"restore-{mount_id}"
    assert got_files[f"{root}/part4/data.csv"] == NTFS_FILES["data.csv"]
    assert got_files[f"{root}/part2/srv/www/index.html"] == XFS_FILES["srv/www/index.html"]
    assert got_files[f"{root}/part3/EFI/Boot/BootX64.efi"] == FAT_FILES["EFI/Boot/BootX64.efi"]
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/part1/big.bin"})
    assert r.status_code == 400 and r.json()["code"] == "NOT_A_DIRECTORY"
    r = await oma.get(f"/restore/{mount_id}/download-directory", params={"path": "/part1", "format": "rar"})
    assert r.status_code == 400


async def test_root_semantics_mbr_lvm_and_bare_disks(oma: Oma, disks: Disks) -> None:
    # One file system (MBR, one partition): the mount's root is its root.
    m = await mount(oma, await insert_backup(oma, disks.mbr, vm="mbr"))
    assert [v["name"] for v in m["volumes"]] == ["part1"]
    assert (await download(oma, m["mount_id"], "/only/file.txt")).content == b"mbr\n"
    assert "/lost+found" in await files(oma, m["mount_id"], "/")
    # A name that is not UTF-8 is listed (shown with U+FFFD) and archived.
    assert "/only/caf\ufffd.txt" in await files(oma, m["mount_id"], "/only")
    r = await oma.get(
        f"/restore/{m['mount_id']}/download-directory", params={"path": "/only", "format": "tar.gz"}
    )
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert sorted(os.fsencode(n) for n in tar.getnames()) == [b"only/caf\xe9.txt", b"only/file.txt"]
    r = await oma.get(f"/restore/{m['mount_id']}/download-directory", params={"path": "/only"})
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.read("only/caf\ufffd.txt") == b"latin-1 name\n"

    # A disk without a partition table, the file system on the whole disk.
    m = await mount(oma, await insert_backup(oma, disks.bare, vm="bare"))
    assert [(v["name"], v["source"]) for v in m["volumes"]] == [("disk", "disk")]
    assert (await download(oma, m["mount_id"], "whole/disk.txt")).content == b"no table\n"
    m = await mount(oma, await insert_backup(oma, disks.bare_fat, vm="stick"))
    assert [(v["name"], v["filesystem_type"]) for v in m["volumes"]] == [("disk", "fat")]
    r = await download(oma, m["mount_id"], "/photos/cat.jpg")
    assert r.content == b"\xff\xd8cat" and r.headers["content-type"] == "image/jpeg"

    # LVM2 inside a partition: volumes part1 and lvm-<vg>-<lv>; or just the logical volume.
    backup_id = await insert_backup(oma, disks.lvm, vm="lvm")
    m = await mount(oma, backup_id)
    assert [(v["name"], v["source"]) for v in m["volumes"]] == [
        ("part1", "partition"),
        ("lvm-labvg-data", "lvm"),
    ]
    listing = await files(oma, m["mount_id"], "/lvm-labvg-data", recursive=True)
    assert listing["/lvm-labvg-data/latest"]["symlink_target"] == "home/alice"
    assert (await download(oma, m["mount_id"], "/lvm-labvg-data/latest/notes.txt")).content == b"alice\n"
    m = await mount(oma, backup_id, volume="lvm-labvg-data")
    assert (await download(oma, m["mount_id"], "/home/alice/notes.txt")).content == b"alice\n"
    r = await oma.post("/restore/mount", json={"backup_id": backup_id, "volume": "part7"})
    assert (
        r.status_code == 404
        and r.json()["code"] == "VOLUME_NOT_FOUND"
        and "lvm-labvg-data" in r.json()["error"]
    )


async def test_mbr_logical_partitions_are_numbered_as_linux_does(oma: Oma, disks: Disks) -> None:
    """An MBR disk with an extended partition: its logical partitions are part5 and part6, the
    numbers Linux (and sfdisk) give them, not dissect's 2 and 3."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disks.mbr_logical_raw)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    linux = [
        f"part{p['node'].removeprefix(str(disks.mbr_logical_raw))}"
        for p in table["partitions"]
        if p["type"] != "5"
    ]
    assert linux == ["part1", "part5", "part6"]
    backup_id = await insert_backup(oma, disks.mbr_logical, vm="logical")
    m = await mount(oma, backup_id)
    assert [(v["name"], v["filesystem_type"]) for v in m["volumes"]] == [
        ("part1", "ext4"),
        ("part5", "ext4"),
        ("part6", "fat"),
    ]
    assert set(await files(oma, m["mount_id"], "/")) >= {"/part1", "/part5", "/part6"}
    assert (await download(oma, m["mount_id"], "/part1/one.txt")).content == b"primary 1\n"
    assert (await download(oma, m["mount_id"], "/part5/five.txt")).content == b"logical 5\n"
    assert (await download(oma, m["mount_id"], "/part6/six.txt")).content == b"logical 6\n"
    only = await mount(oma, backup_id, volume="part6")
    assert [v["name"] for v in only["volumes"]] == ["part6"]
    assert (await download(oma, only["mount_id"], "/six.txt")).content == b"logical 6\n"
    r = await oma.post("/restore/mount", json={"backup_id": backup_id, "volume": "part3"})
    assert r.status_code == 404 and r.json()["code"] == "VOLUME_NOT_FOUND", r.text


async def test_mount_refusals(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    r = await oma.post("/restore/mount", json={"backup_id": "backup-nope"})
    assert r.status_code == 404
    assert_envelope(r.json(), "BACKUP_NOT_FOUND")
    running = await insert_backup(oma, disks.mbr, status="running", vm="busy")
    r = await oma.post("/restore/mount", json={"backup_id": running})
    assert r.status_code == 409 and r.json()["code"] == "BACKUP_NOT_COMPLETED"
    gone = await insert_backup(oma, tmp_path / "missing.qcow2", vm="gone")
    r = await oma.post("/restore/mount", json={"backup_id": gone})
    assert r.status_code == 409 and r.json()["code"] == "BACKUP_UNREADABLE"
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"\0" * MiB)
    r = await oma.post("/restore/mount", json={"backup_id": await insert_backup(oma, empty, vm="empty")})
    assert r.status_code == 422 and r.json()["code"] == "NO_FILESYSTEM"
    r = await oma.post("/restore/mount", json={})
    assert r.status_code == 422
    r = await oma.get("/restore/mounts", headers={})
    assert r.status_code == 401


@pytest.fixture
async def small_oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    config = make_config(
        tmp_path,
        oma_dsn,
        vma.base_url,
        restore_idle_timeout=1.0,
        restore_cleanup_interval=0.2,
        max_restore_mounts=2,
    )
    async with run_oma(config) as handle:
        yield handle


async def test_limits_idle_expiry_and_figures(small_oma: Oma, disks: Disks) -> None:
    oma = small_oma
    backup_id = await insert_backup(oma, disks.mbr, vm="mbr")
    first = (await mount(oma, backup_id))["mount_id"]
    second = (await mount(oma, backup_id))["mount_id"]
    r = await oma.post("/restore/mount", json={"backup_id": backup_id})
    assert r.status_code == 503
    assert_envelope(r.json(), "MOUNT_LIMIT_REACHED")
    assert "2 restore mount slots" in r.json()["error"]
    r = await oma.get("/restore/resources")
    assert r.json() == {
        "active_mounts": 2, "max_mounts": 2, "available_slots": 0, "allocated_devices": 2,
        "device_utilization": 100.0,
    }  # fmt: skip

    # Requests keep the first mount alive; the second one, idle, expires.
    for _ in range(8):
        await trio.sleep(0.25)
        assert (await oma.get(f"/restore/{first}/files", params={"path": "/"})).status_code == 200
    r = await oma.get(f"/restore/{second}/file-info", params={"path": "/only"})
    assert r.status_code == 410 and "expired" in r.json()["error"]
    status = (await oma.get("/restore/cleanup-status")).json()
    assert status["running"] is True and status["cleanup_interval"] == 0.2 and status["idle_timeout"] == 1.0
    assert status["active_mount_count"] == 1 and status["expired_mount_count"] == 1
    assert status["last_run_at"] is not None
    r = await oma.get("/restore/resources")
    assert r.json()["active_mounts"] == 1 and r.json()["allocated_devices"] == 1
    await trio.sleep(1.8)
    assert (await oma.get("/restore/mounts")).json()["count"] == 0
    assert (await oma.get("/restore/resources")).json()["allocated_devices"] == 0


def _qemu_compare(a: Path, b: Path) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _wait_restore(oma: Oma, restore_id: str) -> dict[str, Any]:
    with trio.fail_after(60):
        while True:
            r = await oma.get(f"/restore/full/{restore_id}")
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("completed", "failed"):
                return dict(r.json())
            await trio.sleep(0.1)


@pytest.mark.interop
async def test_full_restore_to_raw_qcow2_and_nbd(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    chain = disks.gpt
    backup_id = await insert_backup(oma, chain.incremental, digest=chain.incremental_digest)

    raw = tmp_path / "restored.raw"
    r = await oma.post(
        "/restore/full", json={"backup_id": backup_id, "target_type": "raw", "target": str(raw)}
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending" and r.json()["restore_id"].startswith("restore-")
    job = await _wait_restore(oma, r.json()["restore_id"])
    assert job["status"] == "completed", job
    assert job["disk_digest"] == chain.incremental_digest and job["progress_percent"] == 100
    assert job["bytes_total"] == raw.stat().st_size == 400 * MiB
    assert raw.stat().st_blocks * 512 < 100 * MiB  # sparse: only the data was written
    _qemu_compare(raw, chain.incremental)
    assert raw.read_bytes() == chain.raw_v2.read_bytes()

    qcow = tmp_path / "restored.qcow2"
    r = await oma.post(
        "/restore/full", json={"backup_id": backup_id, "target_type": "qcow2", "target": str(qcow)}
    )
    job = await _wait_restore(oma, r.json()["restore_id"])
    assert job["status"] == "completed" and job["disk_digest"] == chain.incremental_digest, job
    _qemu_compare(qcow, chain.incremental)
    assert Path(str(qcow) + ".manifest").exists()
    assert (await mover.info(qcow))["layers"][0].get("backing_file") is None  # standalone

    nbd_file = tmp_path / "volume.raw"
    nbd_file.write_bytes(b"")
    with nbd_file.open("r+b") as f:
        f.truncate(400 * MiB)
        f.seek(5 * MiB)
        f.write(b"stale data the restore must zero" * 1000)
    with NbdExport(nbd_file, socket_path=tmp_path / "nbd.sock") as export:
        r = await oma.post(
            "/restore/full", json={"backup_id": backup_id, "target_type": "nbd", "target": export.uri}
        )
        job = await _wait_restore(oma, r.json()["restore_id"])
    assert job["status"] == "completed" and job["disk_digest"] == chain.incremental_digest, job
    _qemu_compare(nbd_file, chain.incremental)

    r = await oma.get("/restore/full", params={"backup_id": backup_id})
    assert r.json()["total"] == 3 and {j["target_type"] for j in r.json()["restores"]} == {
        "raw",
        "qcow2",
        "nbd",
    }
    assert all(j["restore_id"].startswith("restore-") for j in r.json()["restores"])


async def test_full_restore_refusals_and_digest_check(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    backup_id = await insert_backup(oma, disks.mbr, vm="mbr")
    existing = tmp_path / "existing.raw"
    existing.write_bytes(b"keep me")
    cases: list[tuple[str, str, str, int, str]] = [
        (backup_id, "raw", str(existing), 409, "TARGET_EXISTS"),
        (backup_id, "qcow2", str(tmp_path / "x.img"), 422, "INVALID_TARGET"),
        (backup_id, "raw", "relative.raw", 422, "INVALID_TARGET"),
        (backup_id, "raw", str(tmp_path / "no" / "x.raw"), 422, "INVALID_TARGET"),
        (backup_id, "nbd", "/dev/nbd0", 422, "INVALID_TARGET"),
        ("backup-nope", "raw", str(tmp_path / "y.raw"), 404, "BACKUP_NOT_FOUND"),
    ]
    for point, target_type, target, status, code in cases:
        body = {"backup_id": point, "target_type": target_type, "target": target}
        r = await oma.post("/restore/full", json=body)
        assert r.status_code == status, (body, r.text)
        assert_envelope(r.json(), code)
    assert existing.read_bytes() == b"keep me"
    assert (await oma.get("/restore/full/restore-nope")).status_code == 404

    # A point whose recorded digest does not match what it reads back as: the job fails, and the
    # file it created is removed.
    wrong = await insert_backup(oma, disks.mbr, digest="0" * 64, vm="wrong")
    target = tmp_path / "wrong.raw"
    r = await oma.post(
        "/restore/full", json={"backup_id": wrong, "target_type": "raw", "target": str(target)}
    )
    job = await _wait_restore(oma, r.json()["restore_id"])
    assert job["status"] == "failed" and "differs from the backup's" in job["error_message"]
    assert not target.exists()


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_full_restore_never_writes_into_a_repository(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    """A full restore never creates or overwrites a file of any repository, nor a backup's
    manifest: targets are resolved through symlinks and refused inside any repository (422
    ``TARGET_IN_REPOSITORY``); a QCOW2 target whose manifest path exists is refused (409)."""
    repo = tmp_path / "repo"
    point_dir = repo / "vm-0" / "disk-2000"
    point_dir.mkdir(parents=True)
    image = point_dir / "backup-a.qcow2"
    shutil.copy(disks.mbr, image)
    shutil.copy(str(disks.mbr) + ".manifest", str(image) + ".manifest")
    backup_id = await insert_backup(oma, image, vm="inrepo")  # its repository: point_dir
    other_repo = tmp_path / "other-repo"
    r = await oma.post(
        "/repositories", json={"name": "other", "type": "local", "config": {"disk_path": str(other_repo)}}
    )
    assert r.status_code == 201, r.text
    (other_repo / "keep.bin").write_bytes(b"other repository's file")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "to-new-file.raw").symlink_to(point_dir / "new.raw")  # dangling, into a repository
    (outside / "to-other-repo").symlink_to(other_repo)  # a directory link into a repository
    (outside / "to-manifest.qcow2.manifest").symlink_to(str(image) + ".manifest")
    (outside / "someones.qcow2.manifest").write_bytes(b"a manifest that is not the restore's")
    moved = tmp_path / "moved" / "backup-m.qcow2"  # recorded by a point, outside every root now
    moved.parent.mkdir()
    recorded = await insert_backup(oma, image, vm="moved")
    assert oma.config.database_url
    async with open_database(oma.config.database_url, min_size=1, max_size=1) as db:
        await db.execute(
            "UPDATE backup_jobs SET status = 'deleting', file_path = $2 WHERE id = $1", recorded, str(moved)
        )
    repo_before, other_before = _snapshot(repo), _snapshot(other_repo)
    outside_before = _snapshot(outside)

    cases: list[tuple[str, str, int, str]] = [
        ("qcow2", str(point_dir / "restored.qcow2"), 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(point_dir / "new.raw"), 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(image), 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(image) + ".manifest", 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(other_repo / "sub" / ".." / "x.raw"), 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(outside / "to-new-file.raw"), 422, "TARGET_IN_REPOSITORY"),
        ("raw", str(outside / "to-other-repo" / "x.raw"), 422, "TARGET_IN_REPOSITORY"),
        ("qcow2", str(outside / "to-manifest.qcow2"), 422, "TARGET_IN_REPOSITORY"),
        ("qcow2", str(outside / "someones.qcow2"), 409, "TARGET_EXISTS"),
        ("raw", str(moved), 422, "TARGET_IN_REPOSITORY"),
    ]
    accepted = []
    for target_type, target, status, code in cases:
        body = {"backup_id": backup_id, "target_type": target_type, "target": target}
        r = await oma.post("/restore/full", json=body)
        if r.status_code == 202:
            accepted.append(r.json()["restore_id"])
        assert r.status_code == status, (body, r.text)
        assert_envelope(r.json(), code)
    for restore_id in accepted:  # (on a defective build) let what was accepted end first
        await _wait_restore(oma, restore_id)
    assert _snapshot(repo) == repo_before and _snapshot(other_repo) == other_before
    assert _snapshot(outside) == outside_before and not moved.exists()

    # A raw target next to a file named like a manifest: a failed restore removes its own file
    # only, never that one.
    wrong = await insert_backup(oma, disks.mbr, digest="0" * 64, vm="wrong-digest")
    target = outside / "disk.raw"
    (outside / "disk.raw.manifest").write_bytes(b"not the restore's")
    r = await oma.post(
        "/restore/full", json={"backup_id": wrong, "target_type": "raw", "target": str(target)}
    )
    assert r.status_code == 202, r.text
    job = await _wait_restore(oma, r.json()["restore_id"])
    assert job["status"] == "failed" and not target.exists()
    assert (outside / "disk.raw.manifest").read_bytes() == b"not the restore's"


async def test_a_target_that_changes_after_acceptance_is_left_alone(
    oma: Oma, disks: Disks, tmp_path: Path
) -> None:
    """Between acceptance and the copy, a symlink into a repository planted at the target, or
    a file that appeared there: the job fails, writes nothing through the link and removes
    nothing that is not its own."""
    repo = tmp_path / "repo"
    r = await oma.post(
        "/repositories", json={"name": "r", "type": "local", "config": {"disk_path": str(repo)}}
    )
    assert r.status_code == 201, r.text
    backup_id = await insert_backup(oma, disks.mbr, vm="late")
    assert oma.config.database_url
    async with open_database(oma.config.database_url, min_size=1, max_size=2) as db:
        link = tmp_path / "late.raw"
        plan = check_target("raw", str(link), [repo])
        job = await accept_job(db, backup_id, plan, "test", "test-worker")
        link.symlink_to(repo / "planted.raw")  # planted after the job was accepted
        await run_full_restore(db, job["id"], str(disks.mbr), plan, None, repository_roots=[repo])
        ended = await db.fetchrow("SELECT status, error_message FROM restore_jobs WHERE id = $1", job["id"])
        assert ended["status"] == "failed", ended
        assert "changed after the restore was accepted" in ended["error_message"], ended
        assert list(repo.iterdir()) == [] and link.is_symlink()

        appeared = tmp_path / "appeared.raw"
        plan = check_target("raw", str(appeared), [repo])
        job = await accept_job(db, backup_id, plan, "test", "test-worker")
        appeared.write_bytes(b"someone else's file")
        await run_full_restore(db, job["id"], str(disks.mbr), plan, None, repository_roots=[repo])
        ended = await db.fetchrow("SELECT status, error_message FROM restore_jobs WHERE id = $1", job["id"])
        assert ended["status"] == "failed" and "appeared after" in ended["error_message"], ended
        assert appeared.read_bytes() == b"someone else's file"


async def test_concurrent_downloads_and_a_second_process(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    """Readers of one mount run in parallel threads over one image; another OMA process on the
    same database serves the same mount (opening the image itself) and sees it end."""
    backup_id = await insert_backup(oma, disks.gpt.incremental)
    mount_id = (await mount(oma, backup_id))["mount_id"]
    wanted = {
        "/part1/big.bin": EXT4_V1["big.bin"],
        "/part1/docs/nested/deeper/data.bin": EXT4_V1["docs/nested/deeper/data.bin"],
        "/part2/srv/www/app.js": XFS_FILES["srv/www/app.js"],
        "/part4/Report.docx": NTFS_FILES["Report.docx"],
    }
    got: dict[tuple[str, int], bytes] = {}

    async def fetch(path: str, i: int) -> None:
        r = await download(oma, mount_id, path)
        assert r.status_code == 200
        got[(path, i)] = r.content

    async with trio.open_nursery() as nursery:
        for i in range(3):
            for path in wanted:
                nursery.start_soon(fetch, path, i)
    assert all(data == wanted[path] for (path, _), data in got.items()) and len(got) == 12

    assert oma.config.database_url
    other_config = make_config(tmp_path / "second", oma.config.database_url, oma.config.vma_url)
    async with run_oma(other_config) as other:
        assert (await other.get("/restore/resources")).json()["allocated_devices"] == 0
        r = await download(other, mount_id, "/part3/Notes/ReadMe.txt")
        assert r.status_code == 200 and r.content == FAT_FILES["Notes/ReadMe.txt"]
        assert (await other.get("/restore/resources")).json()["allocated_devices"] == 1
        assert (await oma.delete(f"/restore/{mount_id}")).status_code == 200
        r = await other.get(f"/restore/{mount_id}/files")
        assert r.status_code == 410 and "unmounted" in r.json()["error"]
        assert (await other.get("/restore/resources")).json()["allocated_devices"] == 0


async def test_a_client_leaving_an_archive_stops_its_producer(oma: Oma, disks: Disks) -> None:
    mount_id = (await mount(oma, await insert_backup(oma, disks.gpt.incremental)))["mount_id"]
    service = oma.extra["app"].extensions["oma.restore"]
    url = oma.url(f"/restore/{mount_id}/download-directory")
    async with oma.client.stream("GET", url, params={"path": "/", "format": "tar.gz"}, headers=oma.auth) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_raw():
            assert chunk
            break
        assert service.archive_producers.borrowed_tokens == 1
    with trio.fail_after(10):
        while service.archive_producers.borrowed_tokens:
            await trio.sleep(0.05)
    # The mount still serves.
    assert (await download(oma, mount_id, "/part4/data.csv")).content == NTFS_FILES["data.csv"]


@pytest.mark.interop
async def test_full_restore_to_a_block_device(oma: Oma, disks: Disks, tmp_path: Path) -> None:
    """A raw target that is a block device (a loop device here) is written whole: stale data
    where the point has none is zeroed. Fails where loop devices cannot be attached."""
    backing = tmp_path / "device.raw"
    with backing.open("wb") as f:
        f.truncate(48 * MiB)
        f.seek(40 * MiB)
        f.write(b"stale" * 100_000)
    attach = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.fail(f"no loop device here (this test needs one): {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        backup_id = await insert_backup(oma, disks.mbr, vm="mbr")
        body = {"backup_id": backup_id, "target_type": "raw", "target": device}
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)  # as a mounted file system holds it
        try:
            r = await oma.post("/restore/full", json=body)
            assert r.status_code == 409 and "in use" in r.json()["error"], r.text
        finally:
            os.close(holder)
        r = await oma.post("/restore/full", json=body)
        assert r.status_code == 202, r.text
        job = await _wait_restore(oma, r.json()["restore_id"])
        assert job["status"] == "completed", job
        assert job["disk_digest"] == (await mover.checksum(str(disks.mbr))).disk_digest
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
    _qemu_compare(backing, disks.mbr)
    assert Path(device).exists()  # a device is never removed, whatever happens


async def test_restores_of_a_dead_process_are_failed_and_their_partial_targets_removed(
    oma: Oma, disks: Disks, tmp_path: Path
) -> None:
    """A full restore whose OMA process died stays 'running' no more: the next start of the
    restore service fails it and removes the file it had begun (never a device or another
    process's job)."""
    backup_id = await insert_backup(oma, disks.mbr, vm="mbr")
    partial = tmp_path / "half.qcow2"
    partial.write_bytes(b"QFI\xfb partial")
    Path(f"{partial}.manifest").write_bytes(b"partial")
    host = socket.gethostname()
    assert oma.config.database_url
    async with open_database(oma.config.database_url, min_size=1, max_size=1) as db:
        for restore_id, target, owner in (
            ("restore-dead", str(partial), f"{host}:999999999:x"),
            ("restore-alive", str(tmp_path / "other.raw"), f"{host}:{os.getpid()}:y"),
        ):
            await db.execute(
                "INSERT INTO restore_jobs (id, backup_id, target_type, target, status, claimed_by)"
                " VALUES ($1, $2, $3, $4, 'running', $5)",
                restore_id,
                backup_id,
                "qcow2" if target.endswith(".qcow2") else "raw",
                target,
                owner,
            )
        assert await fail_orphaned_jobs(db) == ["restore-dead"]
        rows = {r["id"]: r for r in await db.fetch("SELECT id, status, error_message FROM restore_jobs")}
    assert rows["restore-dead"]["status"] == "failed" and "stopped" in rows["restore-dead"]["error_message"]
    assert rows["restore-alive"]["status"] == "running"
    assert not partial.exists() and not Path(f"{partial}.manifest").exists()


async def test_full_restore_writes_host_paths_only_under_a_restore_root(
    oma_dsn: str, vma: VmaDouble, disks: Disks, tmp_path: Path
) -> None:
    """Without restore roots (the default) a raw or QCOW2 target is refused (403
    ``TARGET_NOT_ALLOWED``) and only NBD targets are written; with one, a path outside it —
    given as it is, through ``..`` or through a symlink planted under the root — is refused
    too. Nothing is created anywhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"host file")
    async with run_oma(make_config(tmp_path / "no-roots", oma_dsn, vma.base_url)) as oma:
        backup_id = await insert_backup(oma, disks.mbr, vm="mbr")
        for target_type, target in (
            ("raw", str(outside / "x.raw")),
            ("qcow2", str(outside / "x.qcow2")),
            ("raw", "/etc/oma-restore-test.raw"),
        ):
            body = {"backup_id": backup_id, "target_type": target_type, "target": target}
            r = await oma.post("/restore/full", json=body)
            assert r.status_code == 403, (body, r.text)
            assert_envelope(r.json(), "TARGET_NOT_ALLOWED")
            assert "OMA_RESTORE_ROOTS" in r.json()["error"]
        file = tmp_path / "volume.raw"
        with file.open("wb") as f:
            f.truncate(48 * MiB)
        with NbdExport(file, socket_path=tmp_path / "nbd.sock") as export:
            body = {"backup_id": backup_id, "target_type": "nbd", "target": export.uri}
            r = await oma.post("/restore/full", json=body)
            assert r.status_code == 202, r.text
            job = await _wait_restore(oma, r.json()["restore_id"])
        assert job["status"] == "completed", job

    root = tmp_path / "restores"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "escape.raw").symlink_to(outside / "planted.raw")
    config = make_config(tmp_path / "with-roots", oma_dsn, vma.base_url, restore_roots=(root,))
    async with run_oma(config) as oma:
        backup_id = await insert_backup(oma, disks.mbr, vm="mbr2")
        for target_type, target in (
            ("raw", str(outside / "x.raw")),
            ("raw", str(root / ".." / "outside" / "x.raw")),
            ("raw", str(root / "escape" / "x.raw")),
            ("raw", str(root / "escape.raw")),
            ("qcow2", str(root / "escape" / "x.qcow2")),
        ):
            body = {"backup_id": backup_id, "target_type": target_type, "target": target}
            r = await oma.post("/restore/full", json=body)
            assert r.status_code == 403, (body, r.text)
            assert_envelope(r.json(), "TARGET_NOT_ALLOWED")
        body = {"backup_id": backup_id, "target_type": "raw", "target": str(root / "disk.raw")}
        r = await oma.post("/restore/full", json=body)
        assert r.status_code == 202, r.text
        job = await _wait_restore(oma, r.json()["restore_id"])
        assert job["status"] == "completed", job
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
