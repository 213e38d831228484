"""Backup repositories: where backup points are stored, and making that place ready.

A repository is a local directory (``disk_path``), an NFS export or a CIFS/SMB share. The OMA
mounts NFS and CIFS itself (``mount -t nfs`` / ``mount -t cifs``; CIFS credentials go through a
0600 file in a 0700 directory that exists only during the mount). Mount options come from an
allow-list per type (:data:`NFS_OPTIONS`, :data:`CIFS_OPTIONS`), each value checked, and
``nosuid,nodev,noexec`` are always added: an operator's request never becomes an arbitrary
``mount`` (a share bringing setuid programs or devices, a remount, a credentials file of their
choice). The one rule: a network repository's path is used
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from oma.backups.immutability import LockMode, root_mode
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
    password: str | None = field(default=None, repr=False)


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


#: A mount option's value: which values an allowed option takes.
_Value = re.Pattern[str] | tuple[int, int] | None

_NUMBER = re.compile(r"^[0-9]{1,10}$")
_IP = re.compile(r"^(\[?[0-9A-Fa-f:.]+\]?)$")
_MODE = re.compile(r"^0?[0-7]{3}$")  # permission bits only: never setuid, setgid or sticky
# fmt: off
_NFS_FLAGS = (
    "hard", "soft", "intr", "nointr", "lock", "nolock", "ac", "noac", "cto", "nocto", "ro", "rw",
    "tcp", "udp", "atime", "noatime", "diratime", "nodiratime", "relatime", "resvport",
    "noresvport", "sharecache", "nosharecache", "rdirplus", "nordirplus",
)
_CIFS_FLAGS = (
    "hard", "soft", "ro", "rw", "serverino", "noserverino", "nounix", "nobrl", "seal", "sign",
    "nosharesock", "forceuid", "forcegid", "noatime", "relatime", "nocase", "nostrictsync",
    "mfsymlinks", "nomapposix", "nomapchars",
)
# fmt: on
#: NFS options an operator may set (docs/backup.md, "Mount options"): a flag (None), a value
#: matching a pattern, or an integer in a range. Anything else is refused; ``nosuid,nodev,noexec``
#: are always added, so a share can never bring a setuid program or a device node to the OMA.
NFS_OPTIONS: dict[str, _Value] = {
    **dict.fromkeys(_NFS_FLAGS, None),
    "vers": re.compile(r"^(2|3|4|4\.0|4\.1|4\.2)$"),
    "nfsvers": re.compile(r"^(2|3|4|4\.0|4\.1|4\.2)$"),
    "minorversion": (0, 2),
    "proto": re.compile(r"^(tcp|udp|tcp6|udp6|rdma|rdma6)$"),
    "mountproto": re.compile(r"^(tcp|udp|tcp6|udp6)$"),
    "mountvers": (1, 3),
    "sec": re.compile(r"^(sys|krb5|krb5i|krb5p)$"),
    "local_lock": re.compile(r"^(none|all|flock|posix)$"),
    "lookupcache": re.compile(r"^(all|none|pos|positive)$"),
    "timeo": (1, 6000),
    "retrans": (0, 100),
    "retry": (0, 10000),
    "port": (0, 65535),
    "mountport": (0, 65535),
    "rsize": (1024, 16 << 20),
    "wsize": (1024, 16 << 20),
    "nconnect": (1, 16),
    "actimeo": (0, 3600),
    "acregmin": (0, 3600),
    "acregmax": (0, 3600),
    "acdirmin": (0, 3600),
    "acdirmax": (0, 3600),
    "clientaddr": _IP,
}
#: CIFS options an operator may set. The login (username, password, domain) is never an option:
#: it goes through the credentials file.
CIFS_OPTIONS: dict[str, _Value] = {
    **dict.fromkeys(_CIFS_FLAGS, None),
    "vers": re.compile(r"^(1\.0|2\.0|2\.1|3|3\.0|3\.02|3\.1\.1|3\.11|default)$"),
    "sec": re.compile(r"^(krb5|krb5i|ntlmssp|ntlmsspi|ntlmv2|ntlmv2i)$"),
    "cache": re.compile(r"^(strict|none|loose|singleclient|ro)$"),
    "iocharset": re.compile(r"^(utf8|iso8859-1|iso8859-15|cp437|cp850)$"),
    "port": (1, 65535),
    "uid": (0, 2**31 - 1),
    "gid": (0, 2**31 - 1),
    "file_mode": _MODE,
    "dir_mode": _MODE,
    "rsize": (1024, 16 << 20),
    "wsize": (1024, 16 << 20),
    "actimeo": (0, 3600),
    "echo_interval": (1, 600),
    "closetimeo": (0, 3600),
    "max_credits": (20, 60000),
}
#: Added to every network mount, whatever the operator chose.
FORCED_OPTIONS = ("nosuid", "nodev", "noexec")


def _check_option(repo_type: str, name: str, value: str | None, allowed: dict[str, _Value]) -> str | None:
    """Why one ``name[=value]`` option is refused, or None when it is allowed."""
    if name not in allowed:
        return (
            f"config.mount_options: option {name!r} is not allowed for a {repo_type} repository"
            f" (allowed: {', '.join(sorted(allowed))})"
        )
    rule = allowed[name]
    if rule is None:
        return None if value is None else f"config.mount_options: option {name!r} takes no value"
    if value is None or value == "":
        return f"config.mount_options: option {name!r} needs a value"
    if isinstance(rule, tuple):
        low, high = rule
        if not _NUMBER.match(value) or not low <= int(value) <= high:
            return f"config.mount_options: option {name!r} must be an integer from {low} to {high}"
        return None
    if not rule.match(value):
        return f"config.mount_options: {value!r} is not a valid value of option {name!r}"
    return None


def _mount_options(repo_type: str, config: Mapping[str, Any], errors: list[str]) -> str | None:
    """The operator's mount options, each checked against the type's allow-list; returned
    normalised (``name[=value]`` joined by commas). Every refused option is named in ``errors``."""
    value = _text(config, "mount_options", errors, required=False)
    if value is None:
        return None
    if not _OPTIONS.match(value):
        errors.append("config.mount_options may hold only letters, digits and _ . = : , / -")
        return None
    items = [opt.split("=", 1) for opt in value.split(",")]
    names = [item[0].lower() for item in items]
    if set(names) & _FORBIDDEN_OPTIONS:
        errors.append(f"config.mount_options must not set {sorted(set(names) & _FORBIDDEN_OPTIONS)}")
        return None
    allowed = NFS_OPTIONS if repo_type == "nfs" else CIFS_OPTIONS
    problems: list[str] = []
    seen: set[str] = set()
    for name, item in zip(names, items, strict=True):
        if not name:
            problems.append("config.mount_options holds an empty option (two commas, or a leading '=')")
            continue
        if name in seen:
            problems.append(f"config.mount_options sets option {name!r} twice")
        seen.add(name)
        problem = _check_option(repo_type, name, item[1] if len(item) == 2 else None, allowed)
        if problem is not None:
            problems.append(problem)
    if problems:
        errors.extend(problems)
        return None
    return ",".join(
        name if len(item) == 1 else f"{name}={item[1]}" for name, item in zip(names, items, strict=True)
    )


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
        options = _mount_options(repo_type, config, errors)
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
    """The ``mount`` command of a network repository (no shell: each value is one argument).
    ``nosuid,nodev,noexec`` always come first, then the operator's (allow-listed) options; a
    CIFS login is only ever the ``credentials=`` file, never a user name or password in argv."""
    options = ",".join(o for o in (*FORCED_OPTIONS, spec.config.get("mount_options")) if o)
    if spec.type == "nfs":
        source = f"{spec.config['server']}:{spec.config['export_path']}"
        return ["mount", "-t", "nfs", source, str(mount_point), "-o", options]
    if spec.type == "cifs":
        if credentials_file is None:
            raise ValueError("a CIFS mount needs a credentials file")
        opts = f"credentials={credentials_file},{options}"
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
        # A private directory (0700) holding a 0600 file, both the OMA's (root's) only, that
        # exists for the mount alone: the password never reaches argv or the environment.
        private = Path(tempfile.mkdtemp(prefix="oma-cifs-"))
        name = private / "credentials"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_credentials_text(spec))
            _run_mount(mount_argv(spec, mount_point, name))
        finally:
            name.unlink(missing_ok=True)
            private.rmdir()
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


def lock_mode(spec: RepositorySpec, mounts_dir: Path) -> LockMode:
    """How an immutability lock holds in this repository (blocking): ``enforced`` where the
    file system keeps the immutable attribute (a local directory on ext4, xfs, btrfs, ...),
    ``advisory`` where it cannot (NFS and CIFS shares always: the attribute is not theirs to
    set; a local file system without it)."""
    if spec.type != "local":
        return "advisory"
    return root_mode(root_of(spec, mounts_dir))


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
