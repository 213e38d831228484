"""Datastore paths of the lab and the files behind them.

Mapping: the lab datastore ``NAME`` is the local directory ``<lab dir>/datastores/NAME``, so
``[LocalDS_0] vm1/vm1.vmdk`` is ``<lab dir>/datastores/LocalDS_0/vm1/vm1.vmdk``.

A lab disk is laid out as on ESXi: ``x.vmdk`` is a (monolithicFlat) VMDK descriptor whose single
extent is the raw image ``x-flat.vmdk``; next to them the change journal ``x-ctk.jsonl`` takes the
place of ESXi's ``x-ctk.vmdk``. A snapshot's frozen copy of ``x.vmdk`` is ``x-<snapshot moref>.vmdk``
with its own ``-flat`` extent. Readers of disk bytes (``nbdkit file``) want the raw extent:
:meth:`DatastoreMap.image` gives it for a descriptor path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Re-exported: the lab's callers and tests know them from here.
from pyapp.datastore import DatastorePathError as DatastorePathError
from pyapp.datastore import parse_datastore_path as parse_datastore_path
from pyapp.datastore import raw_extent as raw_extent


def datastore_path(datastore: str, rel: str | PurePosixPath) -> str:
    return f"[{datastore}] {PurePosixPath(rel)}"


@dataclass(frozen=True)
class DatastoreMap:
    """Datastore name -> local directory, as the simulator reports it in its ready line."""

    dirs: Mapping[str, Path]

    @classmethod
    def for_lab_dir(cls, lab_dir: Path, names: list[str]) -> DatastoreMap:
        return cls({n: lab_dir / "datastores" / n for n in names})

    def resolve(self, ds_path: str) -> Path:
        """The local file of a datastore path (it need not exist)."""
        ds, rel = parse_datastore_path(ds_path)
        try:
            root = self.dirs[ds]
        except KeyError:
            raise DatastorePathError(f"unknown datastore {ds!r} in {ds_path!r}") from None
        return Path(root, *rel.parts)

    def image(self, ds_path: str) -> Path:
        """The raw image holding the bytes of the disk ``ds_path`` names (descriptor or raw file)."""
        return raw_extent(self.resolve(ds_path))

    def journal(self, ds_path: str) -> Path:
        """The change journal of the disk whose descriptor is ``ds_path``."""
        return journal_of(self.resolve(ds_path))


def flat_of(descriptor: Path) -> Path:
    return descriptor.with_name(descriptor.name.removesuffix(".vmdk") + "-flat.vmdk")


def journal_of(descriptor: Path) -> Path:
    return descriptor.with_name(descriptor.name.removesuffix(".vmdk") + "-ctk.jsonl")


def write_descriptor(descriptor: Path, capacity: int) -> None:
    """Write the monolithicFlat descriptor of ``descriptor``'s ``-flat`` extent, atomically."""
    if capacity % 512:
        raise ValueError("disk capacity must be a multiple of 512 bytes")
    text = (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW {capacity // 512} FLAT "{flat_of(descriptor).name}" 0\n'
    )
    tmp = descriptor.with_name(descriptor.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(descriptor)
