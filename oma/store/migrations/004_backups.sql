-- Backups: repositories, policies with copy rules, backup points (QCOW2 chains), their copies in
-- other repositories, file-level restore mounts and full restores. See docs/backup.md.

CREATE TABLE backup_repositories (
    id                 text PRIMARY KEY,                 -- repo-<hex>
    name               text NOT NULL UNIQUE,
    type               text NOT NULL CHECK (type IN ('local', 'nfs', 'cifs')),
    -- local: {disk_path}; nfs: {server, export_path, mount_point, mount_options?};
    -- cifs: {server, share_name, mount_point, username, domain?, mount_options?}
    config             jsonb NOT NULL,
    secret_ciphertext  bytea,                            -- CIFS password (oma.crypto.SecretBox)
    enabled            boolean NOT NULL DEFAULT true,
    immutable          boolean NOT NULL DEFAULT false,
    immutable_days     integer NOT NULL DEFAULT 0 CHECK (immutable_days >= 0),
    total_bytes        bigint,
    used_bytes         bigint,
    available_bytes    bigint,
    storage_checked_at timestamptz,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE backup_policies (
    id                    text PRIMARY KEY,              -- pol-<hex>
    name                  text NOT NULL UNIQUE,
    enabled               boolean NOT NULL DEFAULT true,
    primary_repository_id text NOT NULL REFERENCES backup_repositories (id),
    retention_days        integer NOT NULL CHECK (retention_days >= 1),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE backup_copy_rules (
    id                        text PRIMARY KEY,          -- rule-<hex>
    policy_id                 text NOT NULL REFERENCES backup_policies (id) ON DELETE CASCADE,
    destination_repository_id text NOT NULL REFERENCES backup_repositories (id),
    copy_mode                 text NOT NULL DEFAULT 'immediate' CHECK (copy_mode IN ('immediate', 'scheduled')),
    verify_after_copy         boolean NOT NULL DEFAULT true,
    enabled                   boolean NOT NULL DEFAULT true,
    created_at                timestamptz NOT NULL DEFAULT now(),
    UNIQUE (policy_id, destination_repository_id)
);

-- One row per backup point of one VM disk. A chain is (vm_name, disk_id, repository_id): a full
-- and the incrementals on it, linked by parent_backup_id.
CREATE TABLE backup_jobs (
    id                 text PRIMARY KEY,                 -- backup-<hex>
    vm_context_id      text REFERENCES vm_contexts (context_id) ON DELETE SET NULL,
    vm_name            text NOT NULL,
    vm_path            text NOT NULL,
    disk_id            text NOT NULL,
    backup_type        text NOT NULL CHECK (backup_type IN ('full', 'incremental')),
    requested_type     text NOT NULL CHECK (requested_type IN ('full', 'incremental')),
    repository_id      text NOT NULL REFERENCES backup_repositories (id),
    policy_id          text REFERENCES backup_policies (id) ON DELETE SET NULL,
    parent_backup_id   text REFERENCES backup_jobs (id),
    chain_id           text NOT NULL,                    -- the id of the chain's full when it was made
    -- 'deleting': being removed (API delete or retention); never a parent, never restored from.
    status             text NOT NULL CHECK (status IN
                         ('pending', 'running', 'completed', 'failed', 'cancelled', 'deleting')),
    file_path          text,                             -- absolute path of the QCOW2 file
    manifest_path      text,
    tags               jsonb NOT NULL DEFAULT '{}'::jsonb,
    change_id          text,                             -- CBT change ID of the snapshot backed up
    copy_mode          text,                             -- the VMA's plan: full | incremental | full-cbt-reset
    virtual_size_bytes bigint,                           -- the disk's capacity
    stored_bytes       bigint,                           -- the QCOW2 file's size on the repository
    changed_bytes      bigint,                           -- bytes the pass planned to copy
    bytes_transferred  bigint NOT NULL DEFAULT 0,
    progress_percent   double precision NOT NULL DEFAULT 0,
    current_operation  text NOT NULL DEFAULT '',
    disk_digest        text,                             -- BLAKE3 disk digest of the manifest
    error_message      text,
    claimed_by         text,
    claimed_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    completed_at       timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX backup_jobs_chain ON backup_jobs (vm_name, disk_id, repository_id, created_at);
CREATE INDEX backup_jobs_unclaimed ON backup_jobs (created_at) WHERE status = 'pending' AND claimed_by IS NULL;
-- At most one backup in flight per VM disk.
CREATE UNIQUE INDEX backup_jobs_one_active ON backup_jobs (vm_name, disk_id) WHERE status IN ('pending', 'running');

-- A backup point's copy in another repository (3-2-1).
CREATE TABLE backup_copies (
    id             text PRIMARY KEY,                     -- copy-<hex>
    backup_id      text NOT NULL REFERENCES backup_jobs (id) ON DELETE CASCADE,
    repository_id  text NOT NULL REFERENCES backup_repositories (id),
    copy_rule_id   text REFERENCES backup_copy_rules (id) ON DELETE SET NULL,
    status         text NOT NULL CHECK (status IN ('pending', 'copying', 'verifying', 'completed', 'failed')),
    file_path      text,
    size_bytes     bigint,
    disk_digest    text,                                 -- digest found when the copy was verified
    verified       boolean NOT NULL DEFAULT false,
    error_message  text,
    claimed_by     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    completed_at   timestamptz,
    UNIQUE (backup_id, repository_id)
);
CREATE INDEX backup_copies_pending ON backup_copies (created_at) WHERE status = 'pending';

-- File-level restore: a backup point opened read-only (in user space, through dissect).
CREATE TABLE restore_mounts (
    id               text PRIMARY KEY,                   -- mount-<hex>
    backup_id        text NOT NULL REFERENCES backup_jobs (id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN ('mounted', 'unmounted', 'expired', 'failed')),
    filesystem_type  text NOT NULL DEFAULT '',
    volumes          jsonb NOT NULL DEFAULT '[]'::jsonb, -- [{name, filesystem_type, offset, size, source}]
    created_by       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_access_at   timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    unmounted_at     timestamptz
);
CREATE INDEX restore_mounts_active ON restore_mounts (expires_at) WHERE status = 'mounted';

-- Full restore of a backup point to a raw or QCOW2 volume or an NBD target.
CREATE TABLE restore_jobs (
    id                text PRIMARY KEY,                  -- restore-<hex>
    backup_id         text NOT NULL REFERENCES backup_jobs (id) ON DELETE CASCADE,
    target_type       text NOT NULL CHECK (target_type IN ('raw', 'qcow2', 'nbd')),
    target            text NOT NULL,                     -- a path, or an NBD URI
    status            text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    bytes_total       bigint NOT NULL DEFAULT 0,
    bytes_done        bigint NOT NULL DEFAULT 0,
    progress_percent  double precision NOT NULL DEFAULT 0,
    disk_digest       text,
    error_message     text,
    created_by        text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz
);
