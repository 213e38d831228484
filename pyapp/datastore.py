"""vSphere datastore paths and flat VMDK descriptors: what the VMA's local disk source and the
lab both need to find the raw bytes behind a disk backing's ``fileName``.

A datastore path is ``[NAME] dir/file.vmdk``; a monolithicFlat descriptor ``x.vmdk`` names its
single raw extent (usually ``x-flat.vmdk``) in a ``FLAT`` extent line.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")
_EXTENT = re.compile(r'^(RW|RDONLY)\s+\d+\s+FLAT\s+"(?P<file>[^"]+)"\s+\d+\s*$')


class DatastorePathError(ValueError):
    """A datastore path is malformed, names an unknown datastore or leaves its directory."""


def parse_datastore_path(ds_path: str) -> tuple[str, PurePosixPath]:
    """``"[LocalDS_0] vm1/vm1.vmdk"`` -> ``("LocalDS_0", PurePosixPath("vm1/vm1.vmdk"))``; a path
    that is absolute or climbs out with ``..`` is refused."""
    m = _DS_PATH.match(ds_path.strip())
    if m is None:
        raise DatastorePathError(f"not a datastore path: {ds_path!r}")
    rel = PurePosixPath(m["path"])
    if rel.is_absolute() or ".." in rel.parts:
        raise DatastorePathError(f"datastore path leaves its datastore: {ds_path!r}")
    return m["ds"], rel


def raw_extent(path: Path) -> Path:
    """For a monolithicFlat descriptor, its extent file; any other file is its own raw image."""
    if not path.name.endswith(".vmdk") or path.name.endswith("-flat.vmdk"):
        return path
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.startswith(b"# Disk DescriptorFile"):
        return path
    for line in head.decode("utf-8", "replace").splitlines():
        m = _EXTENT.match(line.strip())
        if m is not None:
            return path.with_name(m["file"])
    raise DatastorePathError(f"{path}: VMDK descriptor without a FLAT extent")
