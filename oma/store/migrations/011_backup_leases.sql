-- Leases on claimed backups, as on replication jobs (007): the claiming engine renews
-- lease_expires_at while it drives the backup; once it has expired (the OMA was killed, hangs or
-- lost the database), any live backup engine takes it over: releases its export, removes its
-- unfinished files and fails it with the reason (oma/backups/engine.py BackupEngine.take_over).
-- A backup claimed before this migration has no lease: its lease counts from claimed_at.
ALTER TABLE backup_jobs ADD COLUMN lease_expires_at timestamptz;
CREATE INDEX backup_jobs_leases ON backup_jobs (lease_expires_at)
    WHERE status IN ('pending', 'running') AND claimed_by IS NOT NULL;
