"""The vSphere lab: a local vCenter simulator (govmomi's, plus the project's Go extension in
``lab/vcsim``) whose VMs have real disk images, a guest that writes into them with a change
journal, and QueryChangedDiskAreas answered from that journal. See ``docs/lab.md``.
"""

from .datastore import DatastoreMap, DatastorePathError, parse_datastore_path, raw_extent
from .disks import DiskBuildError, DiskLayout, MiB, Partition, PlacedPartition, build_disk
from .fsdisk import rewrite_partition
from .guest import GuestDisk, JournalEntry, read_journal
from .lab import DiskSpec, Lab, LabDisk, LabVM
from .vcsim import LabError, Ready, build_vcsim

__all__ = [
    "DatastoreMap",
    "DatastorePathError",
    "DiskBuildError",
    "DiskLayout",
    "DiskSpec",
    "GuestDisk",
    "JournalEntry",
    "Lab",
    "LabDisk",
    "LabError",
    "LabVM",
    "MiB",
    "Partition",
    "PlacedPartition",
    "Ready",
    "build_disk",
    "build_vcsim",
    "parse_datastore_path",
    "raw_extent",
    "read_journal",
    "rewrite_partition",
]
