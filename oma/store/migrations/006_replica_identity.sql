-- Replicas keyed by the VM's stable identity, and change IDs owned by the volume that received them
-- (issue 12, items 1, 2 and 8).
--
-- A VM is (vcenter_host, vm_id): its managed object id within its vCenter; 'path:<inventory path>'
-- when neither the request nor the inventory knows the id. Names and paths are for display only.
-- Every target volume is a row of replica_volumes, recorded ('creating') before its file is made;
-- a new or recreated volume has a new generation, and a change ID is a base only for the volume
-- and generation that received it.

CREATE TABLE replica_volumes (
    id            text PRIMARY KEY,               -- vol-<hex>
    vcenter_host  text NOT NULL,
    vm_id         text NOT NULL,                  -- managed object id within vcenter_host (or path:...)
    disk_id       text NOT NULL,                  -- the disk key, e.g. disk-2000
    vm_name       text NOT NULL DEFAULT '',       -- display only (last known)
    vm_path       text NOT NULL DEFAULT '',       -- display only (last known)
    path          text NOT NULL,                  -- the volume file
    node_id       text,                           -- the OMA node holding the file; NULL: unknown (pre-006)
    generation    integer NOT NULL DEFAULT 1 CHECK (generation >= 1),
    size_bytes    bigint,
    -- creating: recorded, file being made or first pass of this generation not complete;
    -- ready: holds a complete pass (a change ID of this generation); failed: see error_message
    state         text NOT NULL CHECK (state IN ('creating', 'ready', 'failed')),
    error_message text,
    job_id        text,                           -- the last job that wrote it (kept when deleted)
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vcenter_host, vm_id, disk_id)
);
CREATE INDEX replica_volumes_by_path ON replica_volumes (vm_path, disk_id, updated_at DESC);

-- The jobs' VM identity: the inventory's id for the path when the job did not name one.
UPDATE replication_jobs j SET vm_id = COALESCE(
    (SELECT v.id FROM vms v WHERE v.path = j.vm_path AND (j.vcenter_host = '' OR v.vcenter_host = j.vcenter_host)
      ORDER BY v.updated_at DESC LIMIT 1),
    'path:' || j.vm_path)
WHERE vm_id IS NULL OR vm_id = '';
UPDATE replication_jobs j SET vcenter_host = v.vcenter_host FROM vms v WHERE j.vcenter_host = '' AND v.id = j.vm_id;

ALTER TABLE replication_job_disks
    ADD COLUMN vcenter_host      text,
    ADD COLUMN vm_id             text,
    ADD COLUMN volume_id         text REFERENCES replica_volumes (id) ON DELETE SET NULL,
    ADD COLUMN volume_generation integer;   -- the generation this job's pass writes (or builds on)
UPDATE replication_job_disks d SET vcenter_host = j.vcenter_host, vm_id = j.vm_id
FROM replication_jobs j WHERE j.id = d.job_id;
-- One active job per VM disk, by identity (was: by inventory path).
DROP INDEX replication_job_disks_one_active;
CREATE UNIQUE INDEX replication_job_disks_one_active ON replication_job_disks (vcenter_host, vm_id, disk_id)
    WHERE active;

-- The volumes the engine made before 006, one per VM disk (the latest one written). A volume is
-- trusted only when no other VM wrote the same file and the latest 'initial' pass into it really
-- was a full pass (before 006 an 'initial' job could run incrementally into a fresh zeroed file);
-- otherwise it is 'failed' and the next pass makes a new generation with a full pass.
WITH latest AS (
    SELECT DISTINCT ON (d.vcenter_host, d.vm_id, d.disk_id)
           d.vcenter_host, d.vm_id, d.disk_id, d.volume_path, j.vm_name, j.vm_path, d.capacity_bytes, j.id AS job_id
    FROM replication_job_disks d JOIN replication_jobs j ON j.id = d.job_id
    WHERE d.volume_path IS NOT NULL
    ORDER BY d.vcenter_host, d.vm_id, d.disk_id, j.created_at DESC, j.id DESC
), last_initial AS (
    SELECT DISTINCT ON (d.vcenter_host, d.vm_id, d.disk_id) d.vcenter_host, d.vm_id, d.disk_id, d.copy_mode
    FROM replication_job_disks d JOIN replication_jobs j ON j.id = d.job_id
    WHERE j.replication_type = 'initial' AND d.volume_path IS NOT NULL
    ORDER BY d.vcenter_host, d.vm_id, d.disk_id, j.created_at DESC, j.id DESC
), judged AS (
    SELECT l.*,
           CASE
             WHEN EXISTS (SELECT 1 FROM latest o WHERE o.volume_path = l.volume_path
                          AND (o.vcenter_host, o.vm_id, o.disk_id) IS DISTINCT FROM (l.vcenter_host, l.vm_id, l.disk_id))
               THEN 'before migration 006 this file was also written for another VM: the next pass is a full pass into a new volume'
             WHEN i.copy_mode IS NULL OR i.copy_mode NOT IN ('full', 'full-cbt-reset')
               THEN 'before migration 006 the last initial pass into this file was not a full pass: the next pass is a full pass into a new volume'
           END AS distrust
    FROM latest l LEFT JOIN last_initial i USING (vcenter_host, vm_id, disk_id)
)
INSERT INTO replica_volumes (id, vcenter_host, vm_id, disk_id, vm_name, vm_path, path, node_id, generation,
                             size_bytes, state, error_message, job_id)
SELECT 'vol-' || replace(gen_random_uuid()::text, '-', ''), vcenter_host, vm_id, disk_id, vm_name, vm_path,
       volume_path, NULL, 1, capacity_bytes, CASE WHEN distrust IS NULL THEN 'ready' ELSE 'failed' END,
       distrust, job_id
FROM judged;
UPDATE replication_job_disks d SET volume_id = v.id, volume_generation = 1
FROM replica_volumes v
WHERE (v.vcenter_host, v.vm_id, v.disk_id) = (d.vcenter_host, d.vm_id, d.disk_id) AND d.volume_path = v.path;

-- Change IDs belong to a volume and generation. A pre-006 change ID is kept as a base only for a
-- trusted volume and only when recorded by a pass at or after that volume's last initial pass; an
-- older base of the same volume is always safe (it re-copies a superset of the changes).
ALTER TABLE vm_disk_changeids
    ADD COLUMN vcenter_host text,
    ADD COLUMN vm_id        text,
    ADD COLUMN volume_id    text REFERENCES replica_volumes (id) ON DELETE SET NULL,
    ADD COLUMN generation   integer;
UPDATE vm_disk_changeids c SET vcenter_host = j.vcenter_host, vm_id = j.vm_id
FROM replication_jobs j WHERE j.id = c.job_id;
UPDATE vm_disk_changeids c SET volume_id = v.id, generation = 1
FROM replica_volumes v, replication_jobs j
WHERE j.id = c.job_id AND v.state = 'ready'
  AND (v.vcenter_host, v.vm_id, v.disk_id) = (c.vcenter_host, c.vm_id, c.disk_id)
  AND j.created_at >= (SELECT max(ij.created_at) FROM replication_jobs ij JOIN replication_job_disks id_
                         ON id_.job_id = ij.id
                       WHERE ij.replication_type = 'initial'
                         AND (id_.vcenter_host, id_.vm_id, id_.disk_id) = (v.vcenter_host, v.vm_id, v.disk_id));
CREATE INDEX vm_disk_changeids_volume ON vm_disk_changeids (volume_id, generation, id DESC);

-- VM contexts: one per VM identity (was: per name, so two VMs of one name shared a context and
-- a renamed VM got a second one). Contexts of one identity are merged into the newest.
UPDATE vm_contexts c SET vmware_vm_id = COALESCE(
    (SELECT v.id FROM vms v WHERE v.path = c.vm_path AND (c.vcenter_host = '' OR v.vcenter_host = c.vcenter_host)
      ORDER BY v.updated_at DESC LIMIT 1),
    'path:' || c.vm_path)
WHERE vmware_vm_id IS NULL OR vmware_vm_id = '';
UPDATE vm_contexts c SET vcenter_host = v.vcenter_host FROM vms v WHERE c.vcenter_host = '' AND v.id = c.vmware_vm_id;

CREATE TEMPORARY TABLE ctx_merge ON COMMIT DROP AS
SELECT context_id, first_value(context_id) OVER (PARTITION BY vcenter_host, vmware_vm_id
                                                 ORDER BY updated_at DESC, context_id) AS keep
FROM vm_contexts;
DELETE FROM ctx_merge WHERE context_id = keep;
UPDATE vm_contexts k SET total_jobs = k.total_jobs + s.total, successful_jobs = k.successful_jobs + s.ok,
                         failed_jobs = k.failed_jobs + s.failed
FROM (SELECT m.keep, sum(c.total_jobs) AS total, sum(c.successful_jobs) AS ok, sum(c.failed_jobs) AS failed
      FROM ctx_merge m JOIN vm_contexts c USING (context_id) GROUP BY m.keep) s
WHERE k.context_id = s.keep;
UPDATE replication_jobs t SET vm_context_id = m.keep FROM ctx_merge m WHERE t.vm_context_id = m.context_id;
UPDATE backup_jobs t SET vm_context_id = m.keep FROM ctx_merge m WHERE t.vm_context_id = m.context_id;
UPDATE failover_jobs t SET vm_context_id = m.keep FROM ctx_merge m WHERE t.vm_context_id = m.context_id;
DELETE FROM vm_contexts c USING ctx_merge m WHERE c.context_id = m.context_id;

ALTER TABLE vm_contexts DROP CONSTRAINT vm_contexts_vm_name_key;
ALTER TABLE vm_contexts ALTER COLUMN vmware_vm_id SET NOT NULL;
CREATE UNIQUE INDEX vm_contexts_identity ON vm_contexts (vcenter_host, vmware_vm_id);
CREATE INDEX vm_contexts_name ON vm_contexts (vm_name);
