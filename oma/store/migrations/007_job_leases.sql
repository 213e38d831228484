-- Leases on claimed replication jobs: the claiming worker renews lease_expires_at while it drives
-- the job; once it has expired (the worker was killed, hangs, or lost the database), any live
-- worker takes the job over (oma/workers.py). A job claimed before this migration has no lease:
-- its lease counts from claimed_at (COALESCE(lease_expires_at, claimed_at + ttl)), long past.
ALTER TABLE replication_jobs ADD COLUMN lease_expires_at timestamptz;
CREATE INDEX replication_jobs_leases ON replication_jobs (lease_expires_at)
    WHERE status IN ('pending', 'replicating') AND claimed_by IS NOT NULL;
