"""Replication: copying a VM's disks from vCenter, through the VMA, into persistent replica
volumes on this side (docs/oma.md, "The replication engine").

Modules, by what each owns (each imports only the ones listed after it):

- :mod:`oma.replication.engine` — claims pending jobs and drives each: volumes, exports, the
  VMA's copy, tracking, the end whatever it is.
- :mod:`oma.replication.creation` — a new job: its disks and their bases, recorded in one
  statement (one active job per VM disk, decided by PostgreSQL).
- :mod:`oma.replication.progress` — a job's figures, with the VMA's live ones while it runs.
- :mod:`oma.replication.volumes` — replica volumes: paths, generations, the node they are on,
  their files and their ``qemu-nbd`` exports.
- :mod:`oma.replication.change_ids` — change IDs, owned by the volume generation that received
  them, and the base each disk's next pass builds on.
- :mod:`oma.replication.jobs` — a job's record and status machine, the one lock order, every
  status change.
- :mod:`oma.replication.identity` — which VM (vCenter, managed object id) and which disks.
- :mod:`oma.replication.events` — the job changes the domain publishes once committed.

The package may import :mod:`oma.workers`, :mod:`oma.vcenter_login`, :mod:`oma.vma_client`,
:mod:`oma.config`, :mod:`oma.store` and :mod:`pyapp`; never :mod:`oma.api`, :mod:`oma.state`,
the shell (:mod:`oma.app`, :mod:`oma.server`) or another domain. The HTTP side is
:mod:`oma.api.replications`; the app owns the :class:`~oma.replication.events.JobEvents` and
subscribes the engine to it.
"""
