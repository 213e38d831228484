-- Which OMA process runs a full restore: a job whose process died is failed at the next start
-- instead of staying 'running' for ever.
ALTER TABLE restore_jobs ADD COLUMN claimed_by text;

-- Retention runs, whichever OMA process made them: GET /policies/retention-status shows the last
-- one to every process (runs older than 30 days are pruned as new ones are recorded).
CREATE TABLE retention_runs (
    id          bigserial PRIMARY KEY,
    ran_by      text NOT NULL,                   -- worker id of the OMA process
    finished_at timestamptz NOT NULL,
    summary     jsonb NOT NULL                   -- RetentionRun.summary()
);
CREATE INDEX retention_runs_finished ON retention_runs (finished_at DESC);
