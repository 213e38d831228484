"""Where a backup point lives in a repository, and which VM a chain belongs to.

A VM is identified by its stable identity, never by its name (docs/backup.md, "Identity"): the
*VM key* is ``moref:<vCenter>/<managed object id>`` (:func:`vm_key`). Every chain, its
directory, its lock and the "one backup in flight" index are keyed by ``(vm_key, disk_id)``;
names are for display only. Two VMs whose names collide after sanitising (``c2 vm``, ``c2_vm``)
or that share a name in two folders (``/DC0/vm/dupa``, ``/DC0/vm/f2/dupa``) have two keys, so
two directories, two locks and two chains.

A chain's points live in one directory, ``<root>/vm-<digest of the VM key>/<disk>/``: the full
at ``<backup_id>.qcow2``, each incremental beside its parent (an overlay names its backing file
relative to its own directory, and the mover resolves backing names only inside it). The
manifest is ``<backup_id>.qcow2.manifest`` beside each image. The same relative layout in every
repository (a copy mirrors the primary's path under its repository's root) makes a chain copied
to another repository valid there as it is. The directory names are hex digests or a disk's
numeric key: nothing taken from a name reaches the file system.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

MANIFEST_SUFFIX = ".manifest"
#: A backup id as :func:`oma.store.rows.new_id` makes them (``backup-<hex>``).
_BACKUP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")
#: A disk id as the inventory names it: ``disk-<device key>``.
_DISK_ID = re.compile(r"^disk-[0-9]{1,10}$")


def vm_key(vcenter_host: str, moref: str) -> str:
    """The stable identity of a VM: its managed object id within its vCenter."""
    return f"moref:{vcenter_host}/{moref}"


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def vm_dir(key: str) -> str:
    """The directory of a VM's chains: a digest of its key (never its name)."""
    return f"vm-{_digest(key, 32)}"


def disk_dir(disk_id: str) -> str:
    """The directory of one disk's chains: ``disk-<key>`` as the inventory names it, else a
    digest (a disk id given by hand never reaches the file system as it is)."""
    return disk_id if _DISK_ID.match(disk_id) else f"disk-{_digest(disk_id, 16)}"


def image_name(backup_id: str) -> str:
    if not _BACKUP_ID.match(backup_id):
        raise ValueError(f"not a backup id: {backup_id!r}")
    return f"{backup_id}.qcow2"


def backup_relpath(key: str, disk_id: str, backup_id: str) -> PurePosixPath:
    """A new chain's full point relative to its repository's root."""
    return PurePosixPath(vm_dir(key)) / disk_dir(disk_id) / image_name(backup_id)


def backup_path(root: Path, key: str, disk_id: str, backup_id: str) -> Path:
    return root / backup_relpath(key, disk_id, backup_id)


def point_path(root: Path, key: str, disk_id: str, backup_id: str, parent_file: Path | None) -> Path:
    """Where a new point is written: beside its parent's file (an incremental: the chain's
    directory, wherever it is), else in the VM disk's directory."""
    if parent_file is not None:
        return parent_file.parent / image_name(backup_id)
    return backup_path(root, key, disk_id, backup_id)


def manifest_path(image: Path) -> Path:
    """The mover's manifest of ``image``: ``IMAGE.manifest`` beside it."""
    return image.with_name(image.name + MANIFEST_SUFFIX)
