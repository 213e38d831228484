"""The failover domain: a replicated VM becomes a running VM in CloudStack.

A failover job (:mod:`.jobs`) runs as persisted steps (:mod:`.engine`), each a row written before
it does anything, with its own status, timing, error and what it found or did:

1. ``validate`` (:mod:`.checks`): the replication is complete, every NIC has a network mapping, a
   service offering fits the VM's CPUs and memory, the replica volumes sit on the OMA VM, and no
   other failover holds the VM;
2. ``snapshot``: each replica volume detached from the OMA VM, then snapshotted (the rollback
   point; CloudStack refuses a KVM snapshot of a volume attached to a running VM);
3. ``prepare`` (:mod:`.drivers`): the guest's file systems inspected for virtio drivers (read as
   file-level restore reads them); ``virt-v2v-in-place`` when they are missing;
4. ``deploy`` (:mod:`.cloud`): the VM deployed stopped, its template ROOT swapped for replica
   disk 0, the other replicas attached in order, the template ROOT deleted;
5. ``start``: started, then waited for until ``Running`` and the guest answers (:mod:`.guest`).

A step that fails undoes what the job did (``rollback``), from what the job recorded; ending a
test (``end_test``) is the same undo. The domain reaches CloudStack through ``oma.cloudstack``'s
client, settings and OMA VM volume operations, and reads the guest's file systems through
``oma.restore.filesystems``: named interfaces in ``.importlinter``. It reads the replication
domain's ``replica_volumes`` rows (never writes them).
"""
