"""Immutability locks that hold below the database: the file system's immutable attribute and a
lock record beside each locked point.

A point stored in an immutable repository is locked until ``created_at + immutable_days``. The
database flag alone is no lock (``UPDATE backup_repositories SET immutable = false`` would undo
it, and ``rm`` as root ignores it), so at the point's completion the OMA also

1. writes a **lock record** ``<image>.lock`` beside the image (JSON: the backup id, the image and
   manifest names, ``locked_at`` and ``locked_until``; written to a temporary name, fsynced,
   renamed), and
2. sets ``FS_IMMUTABLE_FL`` (what ``chattr +i`` sets, through the ``FS_IOC_SETFLAGS`` ioctl) on
   the image, its manifest and the lock record. Even root cannot unlink, rename over, truncate or
   write such a file until the flag is cleared (``EPERM``).

Deletion (API or retention) reads the point's own lock record, not only the database: a lock
record whose ``locked_until`` is in the future refuses the removal whatever the database says.
Only when that date has passed does the OMA clear the flag (:func:`release_expired`, called by
the retention run for every point and before any removal), so a lock is never shortened by a
database edit. The record is not rewritten either: the first record of a point is the one that
counts (a later, shorter lock cannot replace an immutable file).

Where the file system has no immutable attribute (NFS, CIFS, tmpfs on old kernels; the ioctl
answers ``ENOTTY``/``EOPNOTSUPP``/``EINVAL``) the lock record is still written, but the lock is
*advisory*: the API says so (``immutability: "advisory"`` on the repository), and the files can
be removed by whoever can write the share.

Everything here blocks (file system calls): run it in a thread. Setting or clearing the flag needs
``CAP_LINUX_IMMUTABLE`` (root).
"""

from __future__ import annotations

import array
import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from oma.backups.layout import manifest_path

log = logging.getLogger(__name__)

#: ``_IOR('f', 1, long)`` and ``_IOW('f', 2, long)`` on 64-bit Linux (linux/fs.h); the kernel
#: reads and writes an ``int`` through them.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
LOCK_SUFFIX = ".lock"
#: The lock record's format; bump when its fields change.
LOCK_FORMAT = 1

#: ``enforced``: the file system's immutable attribute holds the files; ``advisory``: only the
#: OMA's own checks (database and lock record) do.
LockMode = Literal["enforced", "advisory"]
_UNSUPPORTED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


class LockError(Exception):
    """A lock could not be set or read; the message says why (for operators)."""


@dataclass(frozen=True)
class LockRecord:
    """What ``<image>.lock`` says."""

    backup_id: str
    locked_at: dt.datetime
    locked_until: dt.datetime
    files: tuple[str, ...]


def lock_path(image: Path) -> Path:
    """The lock record of ``image``: ``IMAGE.lock`` beside it."""
    return image.with_name(image.name + LOCK_SUFFIX)


def point_files(image: Path) -> list[Path]:
    """The files a lock holds: the image, its manifest, the lock record."""
    return [image, manifest_path(image), lock_path(image)]


def _flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(buf[0])


def _set_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags]), False)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def is_immutable(path: Path) -> bool:
    """True when ``path`` carries ``FS_IMMUTABLE_FL`` (False when the file system has none)."""
    fd = _open(path)
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)


def set_immutable(path: Path, on: bool) -> bool:
    """Set or clear ``FS_IMMUTABLE_FL`` on a regular file. False when the file system has no such
    attribute (nothing changed); raises :class:`OSError` for anything else (EPERM: not root)."""
    fd = _open(path)
    try:
        flags = _flags(fd)
        wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            _set_flags(fd, wanted)
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)


def probe_mode(root: Path) -> LockMode:
    """Whether the file system under ``root`` keeps the immutable attribute: a probe file is
    created, flagged, cleared and removed."""
    probe = root / f".oma-immutable-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError:
        return "advisory"
    try:
        if set_immutable(probe, True) and is_immutable(probe):
            set_immutable(probe, False)
            return "enforced"
        return "advisory"
    except OSError:
        return "advisory"
    finally:
        with contextlib.suppress(OSError):
            set_immutable(probe, False)
        with contextlib.suppress(OSError):
            probe.unlink()


_PROBED: dict[tuple[str, int], LockMode] = {}


def root_mode(root: Path) -> LockMode:
    """:func:`probe_mode` of a repository root, probed once per directory and file system in
    this process (blocking). A root that is not there is ``advisory``."""
    try:
        key = (os.path.realpath(root), os.stat(root).st_dev)
    except OSError:
        return "advisory"
    if key not in _PROBED:
        _PROBED[key] = probe_mode(root)
    return _PROBED[key]


def read_lock(image: Path) -> LockRecord | None:
    """The lock record of ``image``, None when there is none. Raises :class:`LockError` when one
    exists but cannot be read: an unreadable lock is never taken for no lock."""
    path = lock_path(image)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LockError(f"cannot read the lock record {path}: {e.strerror or e}") from e
    try:
        body = json.loads(text)
        return LockRecord(
            str(body["backup_id"]),
            dt.datetime.fromisoformat(body["locked_at"]),
            dt.datetime.fromisoformat(body["locked_until"]),
            tuple(str(f) for f in body["files"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise LockError(f"the lock record {path} is damaged ({e}); the point stays locked") from e


def _write_record(image: Path, record: LockRecord) -> None:
    path = lock_path(image)
    body = {
        "format": LOCK_FORMAT,
        "backup_id": record.backup_id,
        "locked_at": record.locked_at.isoformat(),
        "locked_until": record.locked_until.isoformat(),
        "files": list(record.files),
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_point(
    image: Path, backup_id: str, locked_at: dt.datetime, locked_until: dt.datetime, now: dt.datetime
) -> LockMode | None:
    """Lock a point's files until ``locked_until``: write its lock record (unless one exists:
    the first record counts) and set the immutable attribute on the image, its manifest and the
    record. Returns ``advisory`` when the file system cannot hold the attribute, None when the
    recorded lock has ended by ``now`` (nothing to hold). Idempotent."""
    existing = read_lock(image)
    if existing is None:
        files = tuple(p.name for p in (image, manifest_path(image)) if p.exists())
        existing = LockRecord(backup_id, locked_at, locked_until, files)
        _write_record(image, existing)
    if existing.locked_until <= now:
        return None
    mode: LockMode = "enforced"
    for path in point_files(image):
        if not path.exists():
            continue
        if not set_immutable(path, True):
            mode = "advisory"
    return mode


def locked_until(image: Path) -> dt.datetime | None:
    """The end of the point's own lock (its lock record), None when it has no record."""
    record = read_lock(image)
    return None if record is None else record.locked_until


def release_expired(image: Path, now: dt.datetime) -> bool:
    """Clear the immutable attribute of a point whose recorded lock has ended (as of ``now``).
    True when the files are free to change (no record, or the record's date has passed); False
    while the record still holds them (nothing is touched then)."""
    record = read_lock(image)
    if record is not None and record.locked_until > now:
        return False
    for path in point_files(image):
        try:
            set_immutable(path, False)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                continue
            raise
    return True


def clear_tree(root: Path) -> int:
    """Clear the immutable attribute of every file under ``root`` (tests' teardown, an
    administrator dismantling a repository). Returns how many files were cleared."""
    cleared = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if is_immutable(path):
                    set_immutable(path, False)
                    cleared += 1
    return cleared


@dataclass(frozen=True)
class StoredPoint:
    """One stored file of a point, as the sweep sees it: the database's lock (None: none)."""

    image: Path
    backup_id: str
    created_at: dt.datetime
    db_locked_until: dt.datetime | None


@dataclass
class SweepResult:
    locked: list[str]
    released: list[str]
    failed: list[dict[str, str]]


def sweep(points: list[StoredPoint], now: dt.datetime) -> SweepResult:
    """Bring the files of stored points in line with their locks (blocking): a point whose lock
    record has ended has its immutable attribute cleared; a point whose record still holds it
    has the attribute set again (someone may have cleared it by hand); a point the database
    locks but that has no record yet (a crash between completion and locking, a point older than
    this feature, a copy) is locked now. The record, never the database, decides the release."""
    result = SweepResult([], [], [])
    for point in points:
        try:
            record = read_lock(point.image)
            if record is not None and record.locked_until <= now:
                if any(is_immutable(p) for p in point_files(point.image) if p.exists()):
                    release_expired(point.image, now)
                    result.released.append(point.backup_id)
            elif record is not None or (point.db_locked_until is not None and point.db_locked_until > now):
                if not point.image.exists():
                    continue
                until = point.db_locked_until if record is None else record.locked_until
                assert until is not None
                held = all(is_immutable(p) for p in point_files(point.image) if p.exists())
                if record is None or not held:
                    mode = lock_point(point.image, point.backup_id, point.created_at, until, now)
                    if record is None or mode == "enforced":
                        result.locked.append(point.backup_id)
        except (OSError, LockError) as e:
            log.error("cannot bring the lock of %s in line: %s", point.image, e)
            result.failed.append({"backup_id": point.backup_id, "error": str(e)})
    return result
