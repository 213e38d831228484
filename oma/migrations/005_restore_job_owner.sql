-- Which OMA process runs a full restore: a job whose process died is failed at the next start
-- instead of staying 'running' for ever.
ALTER TABLE restore_jobs ADD COLUMN claimed_by text;
