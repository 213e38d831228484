-- Failover jobs as persisted steps (oma/failover, docs/failover.md).
--
-- A job is one failover of one VM context (test or live). Everything the job changes in
-- CloudStack is recorded BEFORE the call that changes it, under a name the job chose (the
-- target VM's name, each snapshot's name), and its id once CloudStack answered: a restarted OMA
-- finds what a job left (by id, else by that name) and undoes it. `volumes` holds one entry per
-- replica disk, in disk order (disk 0 becomes the ROOT volume):
--   {"disk_id", "replica_volume_id", "cloudstack_volume_id", "snapshot_name", "snapshot_id",
--    "detached_from_oma", "attached_to_target"}
-- The table came with 001 (read by /debug/failover-jobs, never written until now).
ALTER TABLE failover_jobs
    ADD COLUMN vm_name               text NOT NULL DEFAULT '',
    ADD COLUMN vcenter_host          text NOT NULL DEFAULT '',
    ADD COLUMN vm_id                 text NOT NULL DEFAULT '',   -- the VMware VM id of the context
    ADD COLUMN created_by            text NOT NULL DEFAULT '',
    ADD COLUMN started_at            timestamptz,
    ADD COLUMN completed_at          timestamptz,
    ADD COLUMN ended_at              timestamptz,                -- a test ended (DELETE /failover/test/{id})
    ADD COLUMN target_vm_name        text,                       -- recorded before deployVirtualMachine
    ADD COLUMN target_vm_id          text,                       -- once CloudStack answered
    ADD COLUMN template_root_id      text,                       -- the deployed ROOT the replica replaced
    ADD COLUMN template_root_deleted boolean NOT NULL DEFAULT false,
    ADD COLUMN volumes               jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN previous_vm_status    text;                       -- the context's status before the job
-- running: steps in progress; failed_over: the VM runs (a test until ended); ending: a test
-- being ended; ended: ended, volumes back on the OMA VM; rolling_back: a failed step being
-- undone; failed: a step failed and what the job did was undone; cleanup_required: the undo
-- itself failed (see error_message): finish it by hand.
UPDATE failover_jobs SET status = 'failed' WHERE status NOT IN
    ('running', 'failed_over', 'ending', 'ended', 'rolling_back', 'failed', 'cleanup_required');
ALTER TABLE failover_jobs ADD CONSTRAINT failover_jobs_status CHECK (status IN
    ('running', 'failed_over', 'ending', 'ended', 'rolling_back', 'failed', 'cleanup_required'));
-- One job at a time holds a VM: a second insert fails whatever the timing.
CREATE UNIQUE INDEX failover_jobs_one_active ON failover_jobs (vm_context_id)
    WHERE status IN ('running', 'failed_over', 'ending', 'rolling_back', 'cleanup_required');
CREATE INDEX failover_jobs_created ON failover_jobs (created_at DESC, id DESC);

-- The steps of a job, in order; a step's row is written (running) before it does anything.
CREATE TABLE failover_job_steps (
    job_id        text NOT NULL REFERENCES failover_jobs (id) ON DELETE CASCADE,
    seq           integer NOT NULL,
    name          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    error_message text,
    result        jsonb NOT NULL DEFAULT '{}'::jsonb,   -- what the step found or did
    PRIMARY KEY (job_id, seq)
);
