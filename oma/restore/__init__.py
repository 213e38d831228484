"""Restore of backup points: browse files without mounting anything, or restore a disk whole.

Layers, by what each owns:

- :mod:`oma.restore.filesystems` — the only module that imports dissect: volumes of a disk
  (MBR/GPT partitions, LVM2 logical volumes) and the file systems on them (ext2/3/4, XFS, NTFS,
  FAT), behind a small typed interface.
- :mod:`oma.restore.paths` — what a client may ask for (no ``..``, NUL or backslash) and how a
  path resolves, symlinks included, without ever leaving its file system.
- :mod:`oma.restore.mount` — one backup point opened read-only through the mover's QCOW2 reader
  (:func:`pyapp.mover.open_image`): root semantics, list, stat, read, walk; blocking calls,
  serialised per image.
- :mod:`oma.restore.archive` — zip and tar.gz of a directory, streamed entry by entry.
- :mod:`oma.restore.service` — per-process cache of open mounts, their state in
  ``restore_mounts``, idle expiry, the figures of ``/restore/resources`` and
  ``/restore/cleanup-status``, and the nursery of full restore jobs.
- :mod:`oma.restore.full` — full restore through :func:`pyapp.mover.copy`, verified by digest.
- :mod:`oma.restore.points` — which points may be read (completed ones), and holding them
  against deletion while a mount or a job is recorded.

The HTTP side is :mod:`oma.api.restore`; the contract is docs/backup.md.
"""
