"""Backup repositories: where backup points are stored, and making that place ready.

A repository is a local directory (``disk_path``), an NFS export or a CIFS/SMB share. The OMA
mounts NFS and CIFS itself (``mount -t nfs`` / ``mount -t cifs``; CIFS credentials go through a
0600 file that exists only during the mount). The one rule: a network repository's path is used
only once ``os.path.ismount`` says it is a mount. An NFS server that is down must never turn into
backups silently written into the empty mount-point directory on the OMA's own disk.

Everything here that touches the file system or runs ``mount`` blocks: call it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

from oma.crypto import SecretBox
from pyapp.api import ApiError
from pyapp.db import Database, Record

RepositoryType = Literal["local", "nfs", "cifs"]
REPOSITORY_TYPES: tuple[RepositoryType, ...] = ("local", "nfs", "cifs")
REPOSITORY_UNAVAILABLE = "REPOSITORY_UNAVAILABLE"
REPOSITORY_OVERLAP = "REPOSITORY_OVERLAP"
#: The purpose bound to a CIFS password's ciphertext (oma.crypto.SecretBox).
SECRET_PURPOSE = b"backup-repository-password"
MOUNT_TIMEOUT_S = 60.0

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_OPTIONS = re.compile(r"^[A-Za-z0-9_.=:,/-]*$")
_SHARE = re.compile(r"^[^/\\\s,]{1,80}$")
_USER = re.compile(r"^[^\s,=/\\]{1,104}$")
#: Options that would let a request change what the credentials file says, or where it comes from.
_FORBIDDEN_OPTIONS = frozenset({"credentials", "username", "user", "password", "pass", "domain", "dom"})


class RepositoryError(Exception):
    """The repository cannot be used now; the message says why (for operators)."""


@dataclass(frozen=True)
class RepositorySpec:
    """What it takes to reach a repository: its type, validated config and (CIFS) password."""

    id: str
    type: RepositoryType
    config: Mapping[str, Any]
    password: str | None = None


@dataclass(frozen=True)
class StorageInfo:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    mount_point: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "available_bytes": self.available_bytes,
            "mount_point": self.mount_point,
        }


def _text(config: Mapping[str, Any], key: str, errors: list[str], *, required: bool = True) -> str | None:
    value = config.get(key)
    if value is None or value == "":
        if required:
            errors.append(f"config.{key} is required")
        return None
    if not isinstance(value, str) or "\0" in value or "\n" in value:
        errors.append(f"config.{key} must be a single-line string")
        return None
    return value


def _absolute(config: Mapping[str, Any], key: str, errors: list[str], *, required: bool) -> str | None:
    value = _text(config, key, errors, required=required)
    if value is not None and not value.startswith("/"):
        errors.append(f"config.{key} must be an absolute path")
        return None
    if value is not None and ".." in Path(value).parts:
        errors.append(f"config.{key} must not contain '..'")
        return None
    return None if value is None else os.path.normpath(value)


def _mount_options(config: Mapping[str, Any], errors: list[str]) -> str | None:
    value = _text(config, "mount_options", errors, required=False)
    if value is None:
        return None
    if not _OPTIONS.match(value):
        errors.append("config.mount_options may hold only letters, digits and _ . = : , / -")
        return None
    names = {opt.split("=", 1)[0].lower() for opt in value.split(",") if opt}
    if names & _FORBIDDEN_OPTIONS:
        errors.append(f"config.mount_options must not set {sorted(names & _FORBIDDEN_OPTIONS)}")
        return None
    return value


def validate_config(repo_type: str, config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The normalised config of a repository of ``repo_type`` and, for CIFS, its password (kept
    apart: it is stored encrypted and never returned). Raises a 422 :class:`ApiError` listing
    every problem."""
    if repo_type not in REPOSITORY_TYPES:
        raise ApiError.unprocessable(f"type must be one of {', '.join(REPOSITORY_TYPES)}")
    errors: list[str] = []
    out: dict[str, Any] = {}
    password: str | None = None
    if repo_type == "local":
        out["disk_path"] = _absolute(config, "disk_path", errors, required=True)
    else:
        server = _text(config, "server", errors)
        if server is not None and not _HOST.match(server):
            errors.append("config.server must be a host name or an IP address")
        out["server"] = server
        mount_point = _absolute(config, "mount_point", errors, required=False)
        if mount_point is not None:
            out["mount_point"] = mount_point
        options = _mount_options(config, errors)
        if options is not None:
            out["mount_options"] = options
        if repo_type == "nfs":
            out["export_path"] = _absolute(config, "export_path", errors, required=True)
        else:
            share = _text(config, "share_name", errors)
            if share is not None and not _SHARE.match(share):
                errors.append("config.share_name must be a share name (no slashes, spaces or commas)")
            out["share_name"] = share
            for key in ("username", "domain"):
                value = _text(config, key, errors, required=key == "username")
                if value is not None and not _USER.match(value):
                    errors.append(f"config.{key} holds characters a CIFS login cannot")
                if value is not None:
                    out[key] = value
            password = _text(config, "password", errors)
    unknown = sorted(set(config) - set(out) - {"password", "mount_point", "mount_options", "domain"})
    if unknown:
        errors.append(f"unknown config keys for a {repo_type} repository: {', '.join(unknown)}")
    if errors:
        raise ApiError.unprocessable("invalid repository config", details=errors)
    return out, password


def root_of(spec: RepositorySpec, mounts_dir: Path) -> Path:
    """Where the repository's files live: ``disk_path``, or the network share's mount point."""
    if spec.type == "local":
        return Path(spec.config["disk_path"])
    mount_point = spec.config.get("mount_point")
    return Path(mount_point) if mount_point else mounts_dir / spec.id


def mount_argv(spec: RepositorySpec, mount_point: Path, credentials_file: Path | None = None) -> list[str]:
    """The ``mount`` command of a network repository (no shell: each value is one argument)."""
    options = spec.config.get("mount_options") or ""
    if spec.type == "nfs":
        source = f"{spec.config['server']}:{spec.config['export_path']}"
        argv = ["mount", "-t", "nfs", source, str(mount_point)]
        return [*argv, "-o", options] if options else argv
    if spec.type == "cifs":
        if credentials_file is None:
            raise ValueError("a CIFS mount needs a credentials file")
        opts = ",".join(o for o in (f"credentials={credentials_file}", options) if o)
        source = f"//{spec.config['server']}/{spec.config['share_name']}"
        return ["mount", "-t", "cifs", source, str(mount_point), "-o", opts]
    raise ValueError(f"a {spec.type} repository is not mounted")


def _credentials_text(spec: RepositorySpec) -> str:
    lines = [f"username={spec.config['username']}", f"password={spec.password or ''}"]
    if spec.config.get("domain"):
        lines.append(f"domain={spec.config['domain']}")
    return "\n".join(lines) + "\n"


def _run_mount(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, check=False)
    except FileNotFoundError as e:
        raise RepositoryError(f"cannot run {argv[0]}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise RepositoryError(f"{' '.join(argv[:4])} did not finish in {MOUNT_TIMEOUT_S:.0f} s") from e
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise RepositoryError(f"{' '.join(argv[:5])} failed: {message}")


def mount(spec: RepositorySpec, mount_point: Path) -> None:
    """Mount a network repository at ``mount_point`` unless something is mounted there already."""
    if os.path.ismount(mount_point):
        return
    try:
        mount_point.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as e:
        raise RepositoryError(f"cannot create the mount point {mount_point}: {e}") from e
    if spec.type == "cifs":
        fd, name = tempfile.mkstemp(prefix="oma-cifs-", suffix=".cred")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_credentials_text(spec))
            _run_mount(mount_argv(spec, mount_point, Path(name)))
        finally:
            os.unlink(name)
    else:
        _run_mount(mount_argv(spec, mount_point))
    if not os.path.ismount(mount_point):
        raise RepositoryError(f"{mount_point} is not a mount point after mount said it succeeded")


def unmount(mount_point: Path) -> None:
    if not os.path.ismount(mount_point):
        return
    done = subprocess.run(
        ["umount", str(mount_point)], capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RepositoryError(f"umount {mount_point} failed: {done.stderr.strip()}")


def probe(root: Path) -> None:
    """Write, fsync and remove a small file: the repository really takes data."""
    path = root / f".oma-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"oma repository probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise RepositoryError(f"cannot write into {root}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def storage(root: Path) -> StorageInfo:
    """Capacity of the file system holding ``root``, as ``df`` shows it."""
    try:
        st = os.statvfs(root)
    except OSError as e:
        raise RepositoryError(f"cannot read the capacity of {root}: {e.strerror or e}") from e
    total = st.f_blocks * st.f_frsize
    return StorageInfo(total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize, str(root))


def prepare(spec: RepositorySpec, mounts_dir: Path) -> Path:
    """Make the repository usable and return its root: a local directory is created if missing
    and must be a directory; a network share is mounted if it is not."""
    root = root_of(spec, mounts_dir)
    if spec.type == "local":
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            raise RepositoryError(f"cannot create {root}: {e.strerror or e}") from e
        if not root.is_dir():
            raise RepositoryError(f"{root} is not a directory")
        return root
    mount(spec, root)
    return root


def try_config(spec: RepositorySpec, mounts_dir: Path) -> StorageInfo:
    """Really try a configuration: mount it (network: into a fresh temporary mount point, then
    unmount) or create the local path, write a probe file, read the capacity."""
    if spec.type == "local":
        root = prepare(spec, mounts_dir)
        probe(root)
        return storage(root)
    mounts_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    mount_point = Path(tempfile.mkdtemp(prefix="test-", dir=mounts_dir))
    try:
        mount(spec, mount_point)
        try:
            probe(mount_point)
            return storage(mount_point)
        finally:
            unmount(mount_point)
    finally:
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def ready_storage(spec: RepositorySpec, mounts_dir: Path) -> StorageInfo:
    """Prepare the repository (create the directory, or mount the share), prove it takes data
    with a probe file, and read its capacity: what a repository must pass before it is saved."""
    root = prepare(spec, mounts_dir)
    probe(root)
    return storage(root)


def prepare_storage(spec: RepositorySpec, mounts_dir: Path) -> StorageInfo:
    """A fresh capacity reading of the repository, prepared (mounted) first as a backup would."""
    return storage(prepare(spec, mounts_dir))


def current_storage(spec: RepositorySpec, mounts_dir: Path) -> StorageInfo:
    """The capacity of the repository as it is now, without mounting anything: a network share
    that is not mounted has no figures (its mount point would report the OMA's own disk)."""
    root = root_of(spec, mounts_dir)
    if spec.type != "local" and not os.path.ismount(root):
        raise RepositoryError(f"{root} is not mounted")
    return storage(root)


def release(spec: RepositorySpec, mounts_dir: Path) -> None:
    """Undo :func:`prepare` for a repository being removed: unmount a network share and remove
    the mount-point directory the OMA made for it (a local directory and its files stay)."""
    if spec.type == "local":
        return
    root = root_of(spec, mounts_dir)
    unmount(root)
    if root.parent == mounts_dir:
        with contextlib.suppress(OSError):
            root.rmdir()


def overlap(root: Path, others: Sequence[tuple[str, Path]]) -> tuple[str, Path] | None:
    """The first of ``others`` (name, root) whose root is ``root``, holds it or lies inside it,
    all resolved through symlinks (blocking). Two such repositories would share files: a copy
    would overwrite its own primary, a retention of one would remove points of the other."""
    real = Path(os.path.realpath(root))
    for name, other in others:
        other_real = Path(os.path.realpath(other))
        if real == other_real or other_real in real.parents or real in other_real.parents:
            return name, other
    return None


def config_of(row: Record | Mapping[str, Any]) -> dict[str, Any]:
    """The config of a repository row (jsonb arrives as text)."""
    config = row["config"]
    return dict(json.loads(config) if isinstance(config, str) else config)


def spec_from_row(row: Record | Mapping[str, Any], box: SecretBox) -> RepositorySpec:
    """A repository row (``backup_repositories``) as a spec, its password decrypted."""
    password = None
    if row["secret_ciphertext"] is not None:
        password = box.decrypt(bytes(row["secret_ciphertext"]), SECRET_PURPOSE)
    return RepositorySpec(row["id"], row["type"], config_of(row), password)


async def enabled_spec(db: Database, box: SecretBox, repository_id: str) -> RepositorySpec:
    """An enabled repository's spec. Raises :class:`ApiError`: 404 unknown, 409 disabled."""
    row = await db.fetchrow(
        "SELECT id, type, config, secret_ciphertext, enabled FROM backup_repositories WHERE id = $1",
        repository_id,
    )
    if row is None:
        raise ApiError.not_found(f"repository {repository_id} not found")
    if not row["enabled"]:
        raise ApiError.conflict(f"repository {repository_id} is disabled")
    return spec_from_row(row, box)


async def ensure_ready(db: Database, box: SecretBox, mounts_dir: Path, repository_id: str) -> Path:
    """The root of an enabled repository, mounted if it is a network share. Raises
    :class:`ApiError`: 404 unknown, 409 disabled, 503 ``REPOSITORY_UNAVAILABLE`` (mount failed)."""
    spec = await enabled_spec(db, box, repository_id)
    try:
        return await trio.to_thread.run_sync(prepare, spec, mounts_dir)
    except RepositoryError as e:
        raise ApiError(503, REPOSITORY_UNAVAILABLE, f"repository {repository_id} is unavailable: {e}") from e
