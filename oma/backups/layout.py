"""Where a backup point lives in a repository.

``<root>/<vm>/<disk>/<backup_id>.qcow2`` with its manifest ``<backup_id>.qcow2.manifest`` beside
it. The same relative layout in every repository, and overlays naming their backing file by a
relative name, make a chain copied to another repository valid there as it is.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from oma.engine import safe_name

MANIFEST_SUFFIX = ".manifest"


def backup_relpath(vm_name: str, disk_id: str, backup_id: str) -> PurePosixPath:
    """The point's QCOW2 file relative to its repository's root."""
    return PurePosixPath(safe_name(vm_name)) / safe_name(disk_id) / f"{safe_name(backup_id)}.qcow2"


def backup_path(root: Path, vm_name: str, disk_id: str, backup_id: str) -> Path:
    return root / backup_relpath(vm_name, disk_id, backup_id)


def manifest_path(image: Path) -> Path:
    """The mover's manifest of ``image``: ``IMAGE.manifest`` beside it."""
    return image.with_name(image.name + MANIFEST_SUFFIX)
