"""The lab: the doubles and tools the tests and the demo run the product against, never imported
by the services. See ``docs/lab.md``.

Today it is the vSphere lab: a local vCenter simulator (govmomi's, plus the project's Go
extension in ``lab/vcsim/``, driven by :mod:`lab.simulator` and :mod:`lab.vsphere`) whose VMs
have real disk images (:mod:`lab.disks`, :mod:`lab.filesystems`, :mod:`lab.lvm`), a guest that
writes into them with a change journal (:mod:`lab.guest`), and QueryChangedDiskAreas answered
from that journal; its VMs may boot (:mod:`lab.bootdisk`, ``Lab.create_boot_vm``) or be made from
an operator's raw or QCOW2 images (:mod:`lab.images`, ``python -m lab add-vm``). Beside it, the
lab CloudStack (:mod:`lab.cloudstack`) runs started VMs under qemu. :mod:`lab.demo` runs the whole
product against them.

This module re-exports what tests use most; it imports :mod:`pyapp` and nothing of the services
(only :mod:`lab.demo` does, and nothing here imports it).
"""

from lab.datastore import DatastoreMap, DatastorePathError, parse_datastore_path, raw_extent
from lab.disks import DiskLayout, PlacedPartition, build_disk
from lab.filesystems import DiskBuildError, MiB, Partition
from lab.guest import GuestDisk, JournalEntry, read_journal, rewrite_partition
from lab.simulator import LabError, Ready, build_vcsim
from lab.vsphere import DiskSpec, Lab, LabDisk, LabNic, LabVM, NicSpec

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
    "LabNic",
    "LabVM",
    "MiB",
    "NicSpec",
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
