"""Backup repositories over the real API: local directories, real mounts (tmpfs stands in for a
share where one must already be mounted), and NFS/CIFS mounts that fail for real — this
machine's kernel has neither file system, so ``mount`` answers with its own error."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from backup_fixtures import create_local_repository, db_of, mounted_tmpfs, run_backup_oma, state_of
from oma_harness import Oma
from vma_double import VmaDouble

from oma.backups import repositories as repos
from oma.backups.repositories import RepositoryError, RepositorySpec


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url) as handle:
        yield handle


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real mount point (a small tmpfs), standing in for an NFS export or CIFS share that is
    mounted already: ``repositories.mount`` leaves a mounted path alone."""
    with mounted_tmpfs(tmp_path / "share") as path:
        yield path


def statvfs_figures(path: Path) -> tuple[int, int, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


def assert_storage_matches(storage: dict[str, int], path: Path) -> None:
    """Figures equal ``statvfs``: the total exactly; used and free within what other processes
    on this shared disk may write between the two readings."""
    total, used, available = statvfs_figures(path)
    assert storage["total_bytes"] == total
    assert abs(storage["used_bytes"] - used) < 256 << 20
    assert abs(storage["available_bytes"] - available) < 256 << 20


async def test_create_local_repository(oma: Oma, tmp_path: Path) -> None:
    root = tmp_path / "repos" / "primary"
    r = await oma.post(
        "/repositories",
        json={
            "name": "primary",
            "type": "local",
            "config": {"disk_path": str(root)},
            "immutable": True,
            "immutable_days": 7,
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert root.is_dir()
    assert body["id"].startswith("repo-")
    assert body["config"] == {"disk_path": str(root)}
    assert (body["enabled"], body["immutable"], body["immutable_days"]) == (True, True, 7)
    assert body["storage"]["mount_point"] == str(root)
    assert body["storage"]["checked_at"] is not None
    assert body["backup_count"] == 0
    assert_storage_matches(body["storage"], root)
    assert list(root.iterdir()) == []  # the probe file is gone

    r = await oma.get(f"/repositories/{body['id']}")
    assert r.status_code == 200 and r.json()["name"] == "primary"
    r = await oma.post(
        "/repositories", json={"name": "primary", "type": "local", "config": {"disk_path": "/x"}}
    )
    assert r.status_code == 409
    r = await oma.post(
        "/repositories", json={"name": "other", "type": "local", "config": {"disk_path": str(root)}}
    )
    assert r.status_code == 409 and r.json()["code"] == "REPOSITORY_OVERLAP", r.text
    assert (await oma.get("/repositories/repo-nope")).status_code == 404
    assert (await oma.client.get(oma.url("/repositories"))).status_code == 401


async def test_overlapping_repositories_are_refused(oma: Oma, tmp_path: Path, tmpfs: Path) -> None:
    """Two repositories never share files: the same directory (also through a symlink or a
    trailing ``/.``), one inside the other either way, a share mounted inside a local one, and
    a local one holding the directory where shares are mounted are refused (409
    ``REPOSITORY_OVERLAP``), before anything is created or mounted."""
    root = tmp_path / "repos" / "primary"
    await create_local_repository(oma, "primary", root)
    (tmp_path / "link-to-primary").symlink_to(root)
    (tmp_path / "link-to-repos").symlink_to(tmp_path / "repos")
    mounts_dir = state_of(oma).config.mounts_dir
    refused: list[tuple[str, dict[str, object]]] = [
        ("local", {"disk_path": str(root) + "/."}),
        ("local", {"disk_path": str(tmp_path / "link-to-primary")}),
        ("local", {"disk_path": str(root / "inner")}),
        ("local", {"disk_path": str(tmp_path / "link-to-primary" / "inner" / "deeper")}),
        ("local", {"disk_path": str(tmp_path / "repos")}),
        ("local", {"disk_path": str(tmp_path / "link-to-repos")}),
        ("local", {"disk_path": str(tmp_path)}),
        ("local", {"disk_path": str(mounts_dir.parent)}),
        ("local", {"disk_path": str(mounts_dir / "mine")}),
        ("nfs", {"server": "nfs.example", "export_path": "/x", "mount_point": str(root / "share")}),
    ]
    for i, (repo_type, config) in enumerate(refused):
        r = await oma.post(
            "/repositories", json={"name": f"overlap-{i}", "type": repo_type, "config": config}
        )
        assert r.status_code == 409, (config, r.text)
        body = r.json()
        assert body["code"] == "REPOSITORY_OVERLAP", body
        assert "'primary'" in body["error"] or "where network repositories are mounted" in body["error"], body
    assert not (root / "inner").exists() and not (root / "share").exists()
    assert not (mounts_dir / "mine").exists()
    # A sibling directory shares nothing: accepted (a name prefix is not a parent).
    await create_local_repository(oma, "sibling", tmp_path / "repos" / "primary-2")
    # A share mounted already (tmpfs) at its own place is fine; a second repository on it is not.
    r = await oma.post(
        "/repositories",
        json={"name": "share", "type": "nfs", "config": {"server": "nfs.example", "export_path": "/x",
                                                          "mount_point": str(tmpfs)}},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    r = await oma.post(
        "/repositories", json={"name": "on-share", "type": "local", "config": {"disk_path": str(tmpfs / "d")}}
    )
    assert r.status_code == 409 and r.json()["code"] == "REPOSITORY_OVERLAP", r.text
    rows = await db_of(oma).fetch("SELECT name FROM backup_repositories ORDER BY name")
    assert [r["name"] for r in rows] == ["primary", "share", "sibling"]


async def test_list_filters_and_storage_refresh(oma: Oma, tmp_path: Path) -> None:
    a = await create_local_repository(oma, "a", tmp_path / "a")
    b = await create_local_repository(oma, "b", tmp_path / "b", enabled=False)
    r = await oma.get("/repositories")
    assert [x["id"] for x in r.json()["repositories"]] == [a, b]
    r = await oma.get("/repositories", params={"type": "local", "enabled": "false"})
    assert [x["id"] for x in r.json()["repositories"]] == [b]
    r = await oma.get("/repositories", params={"type": "nfs"})
    assert r.json() == {"repositories": [], "count": 0}
    assert (await oma.get("/repositories", params={"type": "tape"})).status_code == 400

    # Stale figures are read again when listed; fresh ones are not.
    db = db_of(oma)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    await db.execute(
        "UPDATE backup_repositories SET total_bytes = 1, storage_checked_at = $2 WHERE id = $1", a, old
    )
    await db.execute("UPDATE backup_repositories SET total_bytes = 2 WHERE id = $1", b)
    listed = {x["id"]: x for x in (await oma.get("/repositories")).json()["repositories"]}
    assert_storage_matches(listed[a]["storage"], tmp_path / "a")
    assert dt.datetime.fromisoformat(listed[a]["storage"]["checked_at"]) > old
    assert listed[b]["storage"]["total_bytes"] == 2

    # GET …/storage reads afresh and stores what it read.
    r = await oma.get(f"/repositories/{b}/storage")
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["mount_point"] == str(tmp_path / "b")
    assert_storage_matches(fresh, tmp_path / "b")
    row = await db.fetchrow(
        "SELECT total_bytes, storage_checked_at FROM backup_repositories WHERE id = $1", b
    )
    assert row is not None and row["total_bytes"] == fresh["total_bytes"]
    assert (await oma.get("/repositories/repo-nope/storage")).status_code == 404


async def test_test_endpoint(oma: Oma, tmp_path: Path) -> None:
    root = tmp_path / "probe-me"
    r = await oma.post("/repositories/test", json={"type": "local", "config": {"disk_path": str(root)}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and "error" not in body
    assert body["storage"]["total_bytes"] == statvfs_figures(root)[0]

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = await oma.post(
        "/repositories/test", json={"type": "local", "config": {"disk_path": str(blocker / "repo")}}
    )
    assert r.status_code == 200
    assert r.json()["success"] is False and "cannot create" in r.json()["error"]

    nfs = {"server": "127.0.0.1", "export_path": "/srv/backups"}
    r = await oma.post("/repositories/test", json={"type": "nfs", "config": nfs})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is False
    assert "mount -t nfs 127.0.0.1:/srv/backups" in body["error"] and "failed:" in body["error"]
    assert "No such device" in body["error"]  # mount.nfs's own words: no NFS in this kernel

    cifs = {"server": "fileserver", "share_name": "backups", "username": "svc", "password": "s3cret!"}
    r = await oma.post("/repositories/test", json={"type": "cifs", "config": cifs})
    body = r.json()
    assert r.status_code == 200 and body["success"] is False
    assert "mount -t cifs //fileserver/backups" in body["error"]
    assert "s3cret" not in r.text
    assert list((tmp_path / "mounts").iterdir()) == []  # temporary mount points are removed

    r = await oma.post("/repositories/test", json={"type": "nfs", "config": {"server": "x"}})
    assert r.status_code == 422 and "config.export_path is required" in r.json()["details"]
    assert (await oma.get("/repositories")).json()["count"] == 0  # nothing saved


async def test_unreachable_repository_is_refused(oma: Oma) -> None:
    r = await oma.post(
        "/repositories",
        json={"name": "nas", "type": "nfs", "config": {"server": "10.0.0.9", "export_path": "/backups"}},
    )
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "REPOSITORY_UNAVAILABLE"
    assert "mount -t nfs 10.0.0.9:/backups" in body["error"]
    assert (await oma.get("/repositories")).json()["count"] == 0


@pytest.mark.parametrize(
    ("repo_type", "config", "problem"),
    [
        ("local", {"disk_path": "relative/path"}, "config.disk_path must be an absolute path"),
        ("local", {"disk_path": "/srv/../etc"}, "config.disk_path must not contain '..'"),
        ("local", {}, "config.disk_path is required"),
        (
            "nfs",
            {"server": "nas", "export_path": "/b", "mount_options": "credentials=/etc/shadow"},
            "config.mount_options must not set ['credentials']",
        ),
        (
            "nfs",
            {"server": "nas", "export_path": "/b", "mount_options": "ro -o remount"},
            "config.mount_options may hold only letters, digits and _ . = : , / -",
        ),
        (
            "nfs",
            {"server": "-oremount", "export_path": "/b"},
            "config.server must be a host name or an IP address",
        ),
        ("nfs", {"server": "nas", "export_path": "b"}, "config.export_path must be an absolute path"),
        (
            "cifs",
            {"server": "nas", "share_name": "a/b", "username": "u", "password": "p"},
            "config.share_name must be a share name (no slashes, spaces or commas)",
        ),
        (
            "cifs",
            {"server": "nas", "share_name": "s", "username": "u,password=x", "password": "p"},
            "config.username holds characters a CIFS login cannot",
        ),
        ("cifs", {"server": "nas", "share_name": "s", "username": "u"}, "config.password is required"),
        ("local", {"disk_path": "/srv/b", "extra": 1}, "unknown config keys for a local repository: extra"),
    ],
)
async def test_validation(oma: Oma, repo_type: str, config: dict[str, object], problem: str) -> None:
    for path, body in (
        ("/repositories", {"name": "bad", "type": repo_type, "config": config}),
        ("/repositories/test", {"type": repo_type, "config": config}),
    ):
        r = await oma.post(path, json=body)
        assert r.status_code == 422, r.text
        assert problem in r.json()["details"]


async def test_request_schema(oma: Oma, tmp_path: Path) -> None:
    cases = [
        {"name": "x", "type": "tape", "config": {}},
        {"name": "", "type": "local", "config": {"disk_path": str(tmp_path)}},
        {"name": "x", "type": "local", "config": {"disk_path": str(tmp_path)}, "immutable_days": -1},
        {"name": "x", "type": "local"},
    ]
    for body in cases:
        r = await oma.post("/repositories", json=body)
        assert r.status_code == 422 and r.json()["code"] == "VALIDATION_FAILED", body


async def test_cifs_password_encrypted_never_returned(oma: Oma, tmpfs: Path) -> None:
    password = "Pa55-word-that-must-not-leak"
    r = await oma.post(
        "/repositories",
        json={
            "name": "smb",
            "type": "cifs",
            "config": {
                "server": "fileserver.example",
                "share_name": "backups",
                "username": "svc-backup",
                "domain": "CORP",
                "password": password,
                "mount_point": str(tmpfs),
            },
        },
    )
    assert r.status_code == 201, r.text
    repo_id = r.json()["id"]
    assert password not in r.text and "password" not in r.json()["config"]
    assert r.json()["has_password"] is True
    for path in ("/repositories", f"/repositories/{repo_id}", f"/repositories/{repo_id}/storage"):
        got = await oma.get(path)
        assert got.status_code == 200 and password not in got.text

    db = db_of(oma)
    row = await db.fetchrow("SELECT config::text AS config, secret_ciphertext FROM backup_repositories")
    assert row is not None and password not in row["config"]
    assert password.encode() not in bytes(row["secret_ciphertext"])
    assert state_of(oma).box.decrypt(bytes(row["secret_ciphertext"]), repos.SECRET_PURPOSE) == password

    # Deleting a network repository unmounts it.
    r = await oma.delete(f"/repositories/{repo_id}")
    assert r.status_code == 200, r.text
    assert r.json()["unmounted"] is True
    assert not os.path.ismount(tmpfs)


async def test_delete_refused_while_in_use(oma: Oma, tmp_path: Path) -> None:
    repo = await create_local_repository(oma, "primary", tmp_path / "primary")
    other = await create_local_repository(oma, "other", tmp_path / "other")
    db = db_of(oma)
    await db.execute(
        "INSERT INTO backup_jobs (id, vm_name, vm_key, vm_path, disk_id, backup_type, requested_type,"
        " repository_id, chain_id, status) VALUES ('backup-1', 'vm', 'moref:vc/vm-1', '/DC/vm/vm', 'disk-1',"
        " 'full', 'full', $1, 'backup-1', 'completed')",
        repo,
    )
    r = await oma.delete(f"/repositories/{repo}")
    assert r.status_code == 409 and "1 backup(s)" in r.json()["error"]

    await db.execute(
        "INSERT INTO backup_copies (id, backup_id, repository_id, status) VALUES ('copy-1', 'backup-1', $1,"
        " 'completed')",
        other,
    )
    r = await oma.delete(f"/repositories/{other}")
    assert r.status_code == 409 and "backup copy" in r.json()["error"]
    await db.execute("DELETE FROM backup_jobs")  # the copy goes with it (cascade)

    r = await oma.post(
        "/policies", json={"name": "daily", "primary_repository_id": other, "retention_days": 7}
    )
    assert r.status_code == 201, r.text
    r = await oma.delete(f"/repositories/{other}")
    assert r.status_code == 409 and "policies daily" in r.json()["error"]

    r = await oma.delete(f"/repositories/{repo}")
    assert r.status_code == 200 and r.json()["unmounted"] is False
    assert (tmp_path / "primary").is_dir()  # a local directory is never removed
    assert (await oma.delete(f"/repositories/{repo}")).status_code == 404


# -- mount commands (no server needed) ----------------------------------------------------------


def test_mount_argv() -> None:
    nfs = RepositorySpec(
        "repo-1", "nfs", {"server": "nas", "export_path": "/b", "mount_options": "vers=4.1,hard"}
    )
    assert repos.mount_argv(nfs, Path("/m")) == [
        "mount", "-t", "nfs", "nas:/b", "/m", "-o", "nosuid,nodev,noexec,vers=4.1,hard",
    ]  # fmt: skip
    bare = RepositorySpec("repo-1", "nfs", {"server": "nas", "export_path": "/b"})
    assert repos.mount_argv(bare, Path("/m")) == [
        "mount", "-t", "nfs", "nas:/b", "/m", "-o", "nosuid,nodev,noexec",
    ]  # fmt: skip
    cifs = RepositorySpec("repo-2", "cifs", {"server": "fs", "share_name": "s", "username": "u"}, "p")
    assert repos.mount_argv(cifs, Path("/m"), Path("/tmp/c.cred")) == [
        "mount", "-t", "cifs", "//fs/s", "/m", "-o", "credentials=/tmp/c.cred,nosuid,nodev,noexec",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        repos.mount_argv(cifs, Path("/m"))


def test_cifs_credentials_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``repositories.mount`` with a ``mount`` program first on PATH that records the
    argv it got and the credentials file as it found it (mode and content), then fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    script = bin_dir / "mount"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}\n'
        'cred=$(printf "%s" "$6" | sed "s/^credentials=//; s/,.*//")\n'
        f'stat -c %a "$cred" >> {record}\n'
        f'cat "$cred" >> {record}\n'
        f'stat -c %a "$(dirname "$cred")" >> {record}\n'
        'echo "mount error(13): Permission denied" >&2\n'
        "exit 32\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = RepositorySpec(
        "repo-c",
        "cifs",
        {"server": "fs", "share_name": "s", "username": "u", "domain": "D", "mount_options": "vers=3.0"},
        "pw",
    )
    with pytest.raises(RepositoryError, match=r"mount -t cifs //fs/s .* failed: mount error\(13\)"):
        repos.mount(spec, tmp_path / "m")
    lines = record.read_text().splitlines()
    assert lines[:5] == ["-t", "cifs", "//fs/s", str(tmp_path / "m"), "-o"]
    cred = lines[5].removeprefix("credentials=").split(",")[0]
    assert lines[5] == f"credentials={cred},nosuid,nodev,noexec,vers=3.0"
    assert lines[6] == "600"
    assert lines[7:10] == ["username=u", "password=pw", "domain=D"]
    assert lines[10:] == ["700"]  # in a directory only root can enter
    assert not Path(cred).exists() and not Path(cred).parent.exists()  # removed after the mount
    assert stat.S_ISDIR((tmp_path / "m").stat().st_mode)


async def test_share_gone_is_never_replaced_by_local_disk(oma: Oma, tmpfs: Path) -> None:
    """An NFS repository whose share was unmounted behind the OMA's back: the listing keeps its
    last figures and says why; a fresh reading tries to mount it (this kernel has no NFS) and
    fails, and nothing is ever written into the bare mount-point directory."""
    r = await oma.post(
        "/repositories",
        json={
            "name": "nas",
            "type": "nfs",
            "config": {"server": "nas01", "export_path": "/export/b", "mount_point": str(tmpfs)},
        },
    )
    assert r.status_code == 201, r.text
    repo = r.json()
    subprocess.run(["umount", str(tmpfs)], check=True)
    db = db_of(oma)
    await db.execute(
        "UPDATE backup_repositories SET storage_checked_at = now() - interval '1 hour' WHERE id = $1",
        repo["id"],
    )
    (listed,) = (await oma.get("/repositories")).json()["repositories"]
    assert listed["last_error"] == f"{tmpfs} is not mounted"
    assert listed["storage"]["total_bytes"] == repo["storage"]["total_bytes"]

    r = await oma.get(f"/repositories/{repo['id']}/storage")
    assert r.status_code == 503 and r.json()["code"] == "REPOSITORY_UNAVAILABLE"
    assert "mount -t nfs nas01:/export/b" in r.json()["error"]
    assert list(tmpfs.iterdir()) == []
    assert "mount -t nfs" in (await oma.get(f"/repositories/{repo['id']}")).json()["last_error"]


# -- mount options: an allow-list per type ---------------------------------------------------------


@pytest.mark.parametrize(
    ("repo_type", "options", "named"),
    [
        ("nfs", "suid", "option 'suid' is not allowed for a nfs repository"),
        ("nfs", "hard,exec", "option 'exec' is not allowed for a nfs repository"),
        ("nfs", "dev", "option 'dev' is not allowed"),
        ("nfs", "remount", "option 'remount' is not allowed"),
        ("nfs", "bind", "option 'bind' is not allowed"),
        ("nfs", "x-mount.mkdir", "option 'x-mount.mkdir' is not allowed"),
        ("nfs", "context=system_u:object_r:shadow_t:s0", "option 'context' is not allowed"),
        ("nfs", "vers=9", "'9' is not a valid value of option 'vers'"),
        ("nfs", "vers=4.1=x", "'4.1=x' is not a valid value of option 'vers'"),
        ("nfs", "timeo=soon", "option 'timeo' must be an integer from 1 to 6000"),
        ("nfs", "port=70000", "option 'port' must be an integer from 0 to 65535"),
        ("nfs", "hard=1", "option 'hard' takes no value"),
        ("nfs", "vers", "option 'vers' needs a value"),
        ("nfs", "hard,,soft", "config.mount_options holds an empty option"),
        ("nfs", "timeo=10,timeo=20", "config.mount_options sets option 'timeo' twice"),
        ("cifs", "file_mode=4777", "'4777' is not a valid value of option 'file_mode'"),
        ("cifs", "setuids", "option 'setuids' is not allowed for a cifs repository"),
        ("cifs", "noperm", "option 'noperm' is not allowed"),
        ("cifs", "sec=none", "'none' is not a valid value of option 'sec'"),
        ("cifs", "password2=x", "option 'password2' is not allowed"),
    ],
)
async def test_mount_options_outside_the_allow_list_are_refused(
    oma: Oma, repo_type: str, options: str, named: str
) -> None:
    """Each option is checked against its type's allow-list and its value against its rule; a
    refusal (422) names the option. Nothing is mounted."""
    config: dict[str, object] = {"server": "nas", "mount_options": options}
    if repo_type == "nfs":
        config["export_path"] = "/b"
    else:
        config |= {"share_name": "s", "username": "u", "password": "p"}
    for path, body in (
        ("/repositories", {"name": "bad", "type": repo_type, "config": config}),
        ("/repositories/test", {"type": repo_type, "config": config}),
    ):
        r = await oma.post(path, json=body)
        assert r.status_code == 422, r.text
        assert any(named in d for d in r.json()["details"]), r.json()
    assert (await oma.get("/repositories")).json()["count"] == 0


def test_allowed_options_are_kept_and_nosuid_nodev_noexec_always_added() -> None:
    config, _ = repos.validate_config(
        "nfs", {"server": "nas", "export_path": "/b", "mount_options": "vers=4.1,hard,timeo=600,NOLOCK"}
    )
    assert config["mount_options"] == "vers=4.1,hard,timeo=600,nolock"
    nfs = RepositorySpec("repo-1", "nfs", config)
    assert repos.mount_argv(nfs, Path("/m")) == [
        "mount", "-t", "nfs", "nas:/b", "/m", "-o", "nosuid,nodev,noexec,vers=4.1,hard,timeo=600,nolock",
    ]  # fmt: skip
    bare = RepositorySpec("repo-1", "nfs", {"server": "nas", "export_path": "/b"})
    assert repos.mount_argv(bare, Path("/m"))[-2:] == ["-o", "nosuid,nodev,noexec"]
    config, password = repos.validate_config(
        "cifs",
        {"server": "fs", "share_name": "s", "username": "u", "password": "pw",
         "mount_options": "vers=3.1.1,uid=1000,gid=1000,file_mode=0640,dir_mode=750,sec=ntlmssp"},
    )  # fmt: skip
    cifs = RepositorySpec("repo-2", "cifs", config, password)
    argv = repos.mount_argv(cifs, Path("/m"), Path("/run/c/credentials"))
    assert argv[-1] == (
        "credentials=/run/c/credentials,nosuid,nodev,noexec,"
        "vers=3.1.1,uid=1000,gid=1000,file_mode=0640,dir_mode=750,sec=ntlmssp"
    )
    assert "pw" not in " ".join(argv) and "username" not in " ".join(argv)


async def test_immutability_is_advisory_on_a_share(oma: Oma, tmp_path: Path, tmpfs: Path) -> None:
    """The answer says how a repository's locks hold: ``enforced`` on a local file system with
    the immutable attribute, ``advisory`` on NFS/CIFS (the attribute is not the OMA's to set
    there), None without locks."""
    local = await create_local_repository(oma, "vault", tmp_path / "vault", immutable=True, immutable_days=7)
    r = await oma.post(
        "/repositories",
        json={"name": "nas", "type": "nfs", "immutable": True, "immutable_days": 7,
              "config": {"server": "nas01", "export_path": "/b", "mount_point": str(tmpfs)}},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["immutability"] == "advisory"
    plain = await create_local_repository(oma, "plain", tmp_path / "plain")
    listed = {x["id"]: x for x in (await oma.get("/repositories")).json()["repositories"]}
    assert listed[local]["immutability"] == "enforced"
    assert listed[r.json()["id"]]["immutability"] == "advisory"
    assert listed[plain]["immutability"] is None
