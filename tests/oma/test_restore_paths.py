"""Path safety of file-level restore, without HTTP: request paths, then symlink resolution on a
real ext4 file system (built by the lab) read through the mover's image reader and dissect."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from lab import MiB, Partition
from lab.filesystems import build_partition
from oma.restore.mount import Mount
from oma.restore.paths import MAX_SYMLINKS, split_request_path
from oma.restore.service import mount_body
from pyapp.api import ApiError

LINKS = {
    "loop-a": "loop-b",
    "loop-b": "loop-a",
    "self": ".",
    "up": "..",
    "docs/back": "../docs/readme.txt",
    "docs/around": "../docs/../etc/hostname",
    "docs/escape": "sub/../../../etc/passwd",
    "docs/abs": "/etc/hostname",
    "chain1": "chain2",
    "chain2": "docs/back",
    "dir-link": "docs",
    **{f"hop{i}": f"hop{i + 1}" for i in range(MAX_SYMLINKS + 1)},
    f"hop{MAX_SYMLINKS + 1}": "etc/hostname",
}


@pytest.fixture(scope="module")
def fs_mount(tmp_path_factory: pytest.TempPathFactory) -> Mount:
    base = tmp_path_factory.mktemp("paths")
    image = base / "fs.raw"
    content = {"etc/hostname": b"h\n", "docs/readme.txt": b"r\n"}
    part = Partition(16 * MiB, "ext4", "p", content, symlinks=LINKS)
    build_partition(part, 1, image, base)
    return Mount.open(image)


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ("/", ()),
        ("", ()),
        ("//etc//./hostname/", ("etc", "hostname")),
        ("etc/hostname", ("etc", "hostname")),
        ("./a/./b", ("a", "b")),
        ("a/...", ("a", "...")),  # three dots is a name
        ("%2e%2e", ("%2e%2e",)),  # the API decodes once; what is left is a name
        ("..a/b..", ("..a", "b..")),
    ],
)
def test_request_paths_that_are_accepted(raw: str, parts: tuple[str, ...]) -> None:
    assert split_request_path(raw) == parts


@pytest.mark.parametrize(
    "raw",
    ["..", "/..", "../etc", "a/../b", "a/b/..", "/a/./../..", "a\\b", "..\\etc", "\\", "a\x00b", "\x00"],
)
def test_request_paths_that_are_refused(raw: str) -> None:
    with pytest.raises(ApiError) as err:
        split_request_path(raw)
    assert err.value.status == 400 and err.value.code == "PATH_TRAVERSAL"


def _read(mount: Mount, path: str) -> bytes:
    reader, _ = mount.open_file(path)
    with reader:
        return reader.read()


def test_links_inside_are_followed(fs_mount: Mount) -> None:
    assert _read(fs_mount, "/docs/back") == b"r\n"
    assert _read(fs_mount, "/docs/around") == b"h\n"
    assert _read(fs_mount, "/chain1") == b"r\n"
    assert _read(fs_mount, "/self/self/etc/hostname") == b"h\n"
    assert _read(fs_mount, "/dir-link/readme.txt") == b"r\n"
    reader, info = fs_mount.open_file("/chain1")
    reader.close()
    assert info["path"] == "/docs/readme.txt"  # canonical
    assert fs_mount.stat("/chain1")["type"] == "symlink"  # stat does not follow the last link
    assert fs_mount.stat("/dir-link/readme.txt")["path"] == "/docs/readme.txt"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/up", 400, "PATH_TRAVERSAL"),
        ("/up/etc/hostname", 400, "PATH_TRAVERSAL"),
        ("/docs/escape", 400, "PATH_TRAVERSAL"),
        ("/docs/abs", 400, "PATH_TRAVERSAL"),
        ("/loop-a", 400, "TOO_MANY_SYMLINKS"),
        ("/hop0", 400, "TOO_MANY_SYMLINKS"),
        ("/ETC/hostname", 404, "PATH_NOT_FOUND"),  # ext4 names are case-sensitive
        ("/etc/hostname/more", 400, "NOT_A_DIRECTORY"),
        ("/docs", 400, "IS_A_DIRECTORY"),
    ],
)
def test_what_is_refused(fs_mount: Mount, path: str, status: int, code: str) -> None:
    with pytest.raises(ApiError) as err:
        _read(fs_mount, path)
    assert (err.value.status, err.value.code) == (status, code)


def test_links_that_leave_are_listed_not_followed(fs_mount: Mount) -> None:
    files, truncated = fs_mount.listdir("/", recursive=True, limit=1000)
    by_path = {f["path"]: f for f in files}
    assert not truncated
    assert by_path["/docs/escape"]["type"] == "symlink"
    assert by_path["/docs/escape"]["symlink_target"] == "sub/../../../etc/passwd"
    assert by_path["/up"]["symlink_target"] == ".."
    # Recursion never goes through links (the loops and the link to a directory stay links).
    assert "/dir-link/readme.txt" not in by_path and "/self/etc" not in by_path
    files, truncated = fs_mount.listdir("/", recursive=True, limit=3)
    assert len(files) == 3 and truncated


def test_the_root_itself(fs_mount: Mount) -> None:
    info = fs_mount.stat("/")
    assert info["path"] == "/" and info["type"] == "directory" and info["volume"] == "disk"
    assert {f["name"] for f in fs_mount.listdir("", recursive=False, limit=100)[0]} >= {"etc", "docs", "up"}


@pytest.mark.interop
def test_ntfs_symlinks_written_by_ntfs_3g(tmp_path: Path) -> None:
    """NTFS written by ntfs-3g through FUSE (nested directories, its Interix symlinks): the links
    are symlinks, followed inside, refused outside. Fails where FUSE mounts are not allowed."""
    image, mnt = tmp_path / "n.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkntfs", "-F", "-f", "-q", "-T", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    mounted = subprocess.run(["ntfs-3g", str(image), str(mnt)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"ntfs-3g cannot mount here (this test needs FUSE): {mounted.stderr.strip()}")
    try:
        (mnt / "Dir" / "Sub").mkdir(parents=True)
        (mnt / "Dir" / "Sub" / "File.txt").write_bytes(b"ntfs file\n")
        (mnt / "rel").symlink_to("Dir/Sub/File.txt")
        (mnt / "Dir" / "up").symlink_to("../Dir/Sub")
        (mnt / "Dir" / "out").symlink_to("../../etc/passwd")
        (mnt / "abs").symlink_to("/etc/passwd")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    mount = Mount.open(image)
    listing = {f["path"]: f for f in mount.listdir("/", recursive=True, limit=100)[0]}
    assert listing["/rel"]["type"] == "symlink" and listing["/rel"]["symlink_target"] == "Dir/Sub/File.txt"
    assert listing["/Dir/Sub/File.txt"]["type"] == "file" and listing["/Dir/Sub/File.txt"]["size"] == 10
    assert _read(mount, "/rel") == b"ntfs file\n"
    assert _read(mount, "/dir/UP/file.TXT") == b"ntfs file\n"  # NTFS names match without case
    for outside in ("/Dir/out", "/abs"):
        with pytest.raises(ApiError) as err:
            _read(mount, outside)
        assert err.value.code == "PATH_TRAVERSAL"
    mount.close()


def test_a_directory_loop_is_not_walked_twice(tmp_path: Path) -> None:
    """A damaged (or hostile) ext4 where a directory links to the root: listings and archives
    end, the looping entry is listed once and not entered."""
    image = tmp_path / "loop.raw"
    build_partition(Partition(16 * MiB, "ext4", "l", {"docs/a.txt": b"a"}), 1, image, tmp_path)
    subprocess.run(["debugfs", "-w", "-R", "link / /docs/loop", str(image)], check=True, capture_output=True)
    mount = Mount.open(image)
    files, truncated = mount.listdir("/", recursive=True, limit=1000)
    paths = [f["path"] for f in files]
    assert not truncated and "/docs/loop" in paths and "/docs/loop/docs" not in paths
    assert paths.count("/docs/a.txt") == 1
    mount.close()


def test_the_mount_answer_reports_what_dissect_found_and_no_placeholder(fs_mount: Mount) -> None:
    """``filesystem_type`` is dissect's; ``mount_path``/``nbd_device`` do not exist in the no-mount
    design and are left out rather than answered with a made-up path or ``null``."""
    now = dt.datetime.now(dt.UTC)
    row = {
        "id": "mnt-1",
        "backup_id": "bk-1",
        "status": "mounted",
        "filesystem_type": fs_mount.filesystem_type,
        "volumes": json.dumps([v.describe() for v in fs_mount.volumes]),
        "created_by": "admin",
        "created_at": now,
        "last_access_at": now,
        "expires_at": now,
        "unmounted_at": None,
    }
    body = mount_body(row)
    assert body["filesystem_type"] == "ext4"
    assert [(v["name"], v["filesystem_type"]) for v in body["volumes"]] == [("disk", "ext4")]
    assert "mount_path" not in body and "nbd_device" not in body
    assert None not in (body["mount_id"], body["backup_id"], body["filesystem_type"], body["status"])
