"""The replication domain: what the VMA does with a VM's disks for the OMA.

- :mod:`~vma.replication.jobs`: the jobs this process runs or ran, their figures, and the journal
  of what a job may leave behind (snapshots, work directories);
- :mod:`~vma.replication.workflow`: the steps both job modes share (CBT on, snapshot, the plan of
  each disk's pass, ending a job);
- :mod:`~vma.replication.source`: one ``nbdkit`` per disk serving the snapshot's bytes;
- :mod:`~vma.replication.replicate`: ``replicate`` jobs, copying into the OMA's targets with the
  mover;
- :mod:`~vma.replication.export`: ``export`` jobs, serving the snapshot's disks to the OMA's
  backup engine;
- :mod:`~vma.replication.recovery`: what jobs of a previous run left, found and removed.

It builds on :mod:`vma.vsphere` and :mod:`vma.oma_client` and never imports :mod:`vma.api` or the
service shell (``vma.app``, ``vma.state``, ``vma.server``); the contracts in ``.importlinter`` say
so.
"""
