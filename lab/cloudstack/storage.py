"""The double's storage: real raw files for volumes and snapshots, and the OMA guest's device links.

A volume file is ``<data-dir>/primary/<uuid>`` (the name CloudStack's KVM agent gives a volume on
file-based primary storage). It is created sparse, at its full size, when the volume is first
attached (CloudStack allocates a data volume on primary storage only then); a ROOT volume of a
template that has an image (lab only, see :mod:`.seed`) holds that image's disk, converted to raw
(:func:`lab.images.copy_as_raw`), then zeros up to its size. A snapshot is a copy
of the volume file in ``<data-dir>/secondary/snapshots/<uuid>``; reverting copies it back.
Copies keep holes (``cp --sparse=always``, reflinked where the file system can) and go through a
temporary name, so a copy cut short never leaves a half file under a volume's or snapshot's name.

The OMA VM's guest sees an attached volume as ``/dev/disk/by-id/virtio-<serial>``, where the
serial is what the KVM agent puts in the libvirt disk definition
(``LibvirtComputingResource.diskUuidToSerial``): the volume UUID without dashes, cut to 20
characters, the length of a virtio-blk serial. Here that name is a symlink to the volume file under
the configured device root, made on attach and removed on detach.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import trio

from lab.images import copy_as_raw, inspect_image


def virtio_serial(volume_uuid: str) -> str:
    return volume_uuid.replace("-", "")[:20]


class Storage:
    def __init__(self, data_dir: Path, device_root: Path) -> None:
        self.primary = data_dir / "primary"
        self.snapshots = data_dir / "secondary" / "snapshots"
        self.by_id = device_root / "disk" / "by-id"
        for directory in (self.primary, self.snapshots, self.by_id):
            directory.mkdir(parents=True, exist_ok=True)

    def volume_file(self, volume_uuid: str) -> Path:
        return self.primary / volume_uuid

    def snapshot_file(self, snapshot_uuid: str) -> Path:
        return self.snapshots / snapshot_uuid

    def device_link(self, volume_uuid: str) -> Path:
        return self.by_id / f"virtio-{virtio_serial(volume_uuid)}"

    async def create_volume_file(self, volume_uuid: str, size: int) -> None:
        """A sparse raw file of ``size`` bytes (all zeros), under its final name only when whole."""
        final = self.volume_file(volume_uuid)

        def create() -> None:
            tmp = final.with_name(f".{final.name}.tmp")
            with open(tmp, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
            os.replace(tmp, final)

        await trio.to_thread.run_sync(create)

    async def create_volume_from_image(self, volume_uuid: str, image: Path, size: int) -> None:
        """A raw file of ``size`` bytes holding the disk of ``image`` (raw or QCOW2), under its
        final name only when whole."""
        final = self.volume_file(volume_uuid)
        await trio.to_thread.run_sync(lambda: copy_as_raw(inspect_image(image), final, size))

    async def copy(self, source: Path, target: Path) -> None:
        """``target`` becomes a copy of ``source`` with the same holes; replaced only once the copy
        is complete. Cancelled, the copy process is stopped and its temporary file removed."""
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            await trio.run_process(
                ["cp", "--sparse=always", "--reflink=auto", "--", str(source), str(tmp)],
                capture_stdout=True,
                capture_stderr=True,
            )
            await trio.to_thread.run_sync(_fsync_and_replace, tmp, target)
        except subprocess.CalledProcessError as exc:
            raise OSError(f"cp {source} failed: {exc.stderr.decode(errors='replace').strip()}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def link_device(self, volume_uuid: str) -> None:
        link = self.device_link(volume_uuid)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.volume_file(volume_uuid).resolve())

    def unlink_device(self, volume_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.device_link(volume_uuid).unlink()

    def device_links(self) -> dict[str, str]:
        """Every link under disk/by-id, name -> target."""
        return {p.name: os.readlink(p) for p in sorted(self.by_id.iterdir()) if p.is_symlink()}

    def files(self) -> dict[str, list[str]]:
        return {
            "primary": sorted(p.name for p in self.primary.iterdir() if not p.name.startswith(".")),
            "snapshots": sorted(p.name for p in self.snapshots.iterdir() if not p.name.startswith(".")),
        }


def _fsync_and_replace(tmp: Path, target: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
