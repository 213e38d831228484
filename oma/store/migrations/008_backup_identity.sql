-- Backups keyed by the VM's stable identity, never by its name (docs/backup.md, "Identity").
-- vm_key is 'moref:<vCenter>/<managed object id>' (oma/backups/layout.py vm_key). Chains, their
-- lock and the one-active index were keyed by vm_name: two VMs whose names collide, or one
-- name in two folders, shared a chain.
ALTER TABLE backup_jobs ADD COLUMN vm_key text;

-- Existing points: the identity of their VM context when the context still describes the VM
-- that was backed up (same path); otherwise the path the point was exported from, which no new
-- backup uses as a key: such a chain ends, and the next backup of the VM is a full.
UPDATE backup_jobs b SET vm_key = COALESCE(
    (SELECT 'moref:' || c.vcenter_host || '/' || c.vmware_vm_id FROM vm_contexts c
      WHERE c.context_id = b.vm_context_id AND c.vmware_vm_id IS NOT NULL AND c.vm_path = b.vm_path),
    'path:' || b.vm_path);
ALTER TABLE backup_jobs ALTER COLUMN vm_key SET NOT NULL;

-- Two active backups that now turn out to be of one VM disk (one VM under two names): the
-- older one stays, the others fail.
UPDATE backup_jobs b SET status = 'failed', completed_at = now(), updated_at = now(),
    current_operation = 'Backup failed',
    error_message = 'failed at upgrade: another backup of the same VM disk was in flight'
 WHERE b.status IN ('pending', 'running') AND EXISTS (
    SELECT 1 FROM backup_jobs o WHERE o.vm_key = b.vm_key AND o.disk_id = b.disk_id
      AND o.status IN ('pending', 'running') AND (o.created_at, o.id) < (b.created_at, b.id));

DROP INDEX backup_jobs_chain;
CREATE INDEX backup_jobs_chain ON backup_jobs (vm_key, disk_id, repository_id, created_at);
DROP INDEX backup_jobs_one_active;
-- At most one backup in flight per VM disk.
CREATE UNIQUE INDEX backup_jobs_one_active ON backup_jobs (vm_key, disk_id) WHERE status IN ('pending', 'running');
