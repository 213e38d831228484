"""The lab: the doubles and tools the tests and the demo run the product against, never imported
by the services. See ``docs/lab.md``.

Today it is the vSphere lab: a local vCenter simulator (govmomi's, plus the project's Go
extension in ``lab/vcsim/``, driven by :mod:`lab.simulator` and :mod:`lab.vsphere`) whose VMs
have real disk images (:mod:`lab.disks`, :mod:`lab.filesystems`, :mod:`lab.lvm`), a guest that
writes into them with a change journal (:mod:`lab.guest`), and QueryChangedDiskAreas answered
from that journal. :mod:`lab.demo` runs the whole product against it.

This module re-exports what tests use most; it imports :mod:`pyapp` and nothing of the services
(only :mod:`lab.demo` does, and nothing here imports it).
"""

from lab.datastore import DatastoreMap, DatastorePathError, parse_datastore_path, raw_extent
from lab.disks import DiskLayout, PlacedPartition, build_disk
from lab.filesystems import DiskBuildError, MiB, Partition
from lab.guest import GuestDisk, JournalEntry, read_journal, rewrite_partition
from lab.simulator import LabError, Ready, build_vcsim
from lab.vsphere import DiskSpec, Lab, LabDisk, LabVM

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
