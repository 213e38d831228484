-- The replication engine: which OMA process drives a job, the credential it runs with, and each
-- disk's target volume, export and copy figures.
ALTER TABLE replication_jobs
    ADD COLUMN credential_id integer REFERENCES vmware_credentials (id) ON DELETE SET NULL,
    ADD COLUMN claimed_by    text,          -- engine id of the OMA process driving the job
    ADD COLUMN claimed_at    timestamptz;
-- What the engine's claim query scans (FOR UPDATE SKIP LOCKED).
CREATE INDEX replication_jobs_unclaimed ON replication_jobs (created_at) WHERE status = 'pending' AND claimed_by IS NULL;

ALTER TABLE replication_job_disks
    ADD COLUMN volume_path   text,          -- the persistent target volume of this VM disk
    ADD COLUMN nbd_uri       text,          -- the export the VMA wrote into (closed at the job's end)
    ADD COLUMN copy_mode     text,          -- full | incremental | full-cbt-reset (the VMA's choice)
    ADD COLUMN bytes_written bigint,        -- bytes sent as data
    ADD COLUMN bytes_zeroed  bigint;        -- bytes written as zeroes/holes, never sent as data
