-- OMA schema, version 1. Applied once, in one transaction, under the migration advisory lock.

CREATE TABLE users (
    id            serial PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,              -- argon2id
    role          text NOT NULL DEFAULT 'admin' CHECK (role IN ('admin', 'operator')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);

-- VMA enrollment: pairing codes, enrollments (one per VMA), audit trail.
CREATE TABLE vma_pairing_codes (
    id            serial PRIMARY KEY,
    code_hash     bytea NOT NULL UNIQUE,      -- sha256 of the normalised code
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);

CREATE TABLE vma_enrollments (
    id                  text PRIMARY KEY,
    pairing_code_id     integer NOT NULL REFERENCES vma_pairing_codes (id),
    vma_name            text NOT NULL,
    vma_version         text NOT NULL,
    vma_fingerprint     text NOT NULL,
    public_key          text NOT NULL,        -- OpenSSH ed25519 public key
    challenge           text NOT NULL,
    status              text NOT NULL CHECK (status IN
                          ('pending_verification', 'awaiting_approval', 'approved', 'rejected', 'revoked')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    verified_at         timestamptz,
    decided_at          timestamptz,
    decided_by          text,
    decision_reason     text,
    revoked_at          timestamptz,
    appliance_id        text UNIQUE,          -- login name issued at approval
    secret_hash         text,                 -- argon2id of the issued secret
    secret_ciphertext   bytea,                -- the secret, encrypted, until the VMA fetched it once
    secret_delivered_at timestamptz
);
CREATE INDEX vma_enrollments_status ON vma_enrollments (status, created_at);

CREATE TABLE vma_audit_log (
    id            bigserial PRIMARY KEY,
    enrollment_id text REFERENCES vma_enrollments (id) ON DELETE SET NULL,
    event_type    text NOT NULL,
    actor         text NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb,
    client_ip     text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vma_audit_log_created ON vma_audit_log (created_at DESC, id DESC);

CREATE TABLE auth_tokens (
    token_hash  bytea PRIMARY KEY,            -- sha256 of the bearer token; the token is never stored
    role        text NOT NULL CHECK (role IN ('admin', 'operator', 'vma')),
    user_id     integer REFERENCES users (id) ON DELETE CASCADE,
    vma_id      text REFERENCES vma_enrollments (id) ON DELETE CASCADE,
    subject     text NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    CHECK ((user_id IS NULL) <> (vma_id IS NULL))
);
CREATE INDEX auth_tokens_vma ON auth_tokens (vma_id) WHERE vma_id IS NOT NULL;
CREATE INDEX auth_tokens_expiry ON auth_tokens (expires_at);

-- vCenter credentials; the password is AES-GCM ciphertext (key file in the data directory).
CREATE TABLE vmware_credentials (
    id                  serial PRIMARY KEY,
    credential_name     text NOT NULL UNIQUE,
    vcenter_host        text NOT NULL,
    username            text NOT NULL,
    password_ciphertext bytea NOT NULL,
    datacenter          text NOT NULL DEFAULT '',
    is_active           boolean NOT NULL DEFAULT true,
    is_default          boolean NOT NULL DEFAULT false,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz,
    usage_count         integer NOT NULL DEFAULT 0,
    last_test_at        timestamptz,
    last_test_ok        boolean,
    last_test_message   text
);
CREATE UNIQUE INDEX vmware_credentials_one_default ON vmware_credentials ((true)) WHERE is_default;

-- VM inventory as last reported by a VMA (discovery or inventory push).
CREATE TABLE vms (
    id            text PRIMARY KEY,           -- VMware managed object id, e.g. vm-143233
    name          text NOT NULL,
    path          text NOT NULL,
    vcenter_host  text NOT NULL DEFAULT '',
    datacenter    text NOT NULL DEFAULT '',
    power_state   text,
    guest_os      text,
    memory_mb     integer,
    num_cpu       integer,
    disks         jsonb NOT NULL DEFAULT '[]'::jsonb,
    networks      jsonb NOT NULL DEFAULT '[]'::jsonb,
    source        text NOT NULL DEFAULT 'inventory',
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vms_name ON vms (name, id);

-- The VM-centric view: one context per VM under management, whatever its jobs.
CREATE TABLE vm_contexts (
    context_id       text PRIMARY KEY,
    vm_name          text NOT NULL UNIQUE,
    vmware_vm_id     text,
    vm_path          text NOT NULL,
    vcenter_host     text NOT NULL DEFAULT '',
    datacenter       text NOT NULL DEFAULT '',
    credential_id    integer REFERENCES vmware_credentials (id) ON DELETE SET NULL,
    machine_group_id text,                    -- NULL: ungrouped
    current_status   text NOT NULL DEFAULT 'discovered',
    current_job_id   text,
    auto_added       boolean NOT NULL DEFAULT false,
    cpu_count        integer,
    memory_mb        integer,
    os_type          text,
    power_state      text,
    total_jobs       integer NOT NULL DEFAULT 0,
    successful_jobs  integer NOT NULL DEFAULT 0,
    failed_jobs      integer NOT NULL DEFAULT 0,
    last_job_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vm_contexts_ungrouped ON vm_contexts (vm_name) WHERE machine_group_id IS NULL;

CREATE TABLE replication_jobs (
    id                text PRIMARY KEY,
    vm_context_id     text NOT NULL REFERENCES vm_contexts (context_id),
    vm_id             text,
    vm_name           text NOT NULL,
    vm_path           text NOT NULL,
    vcenter_host      text NOT NULL DEFAULT '',
    datacenter        text NOT NULL DEFAULT '',
    replication_type  text NOT NULL CHECK (replication_type IN ('initial', 'incremental')),
    status            text NOT NULL CHECK (status IN
                        ('pending', 'replicating', 'completed', 'failed', 'cancelled')),
    progress_percent  double precision NOT NULL DEFAULT 0,
    bytes_transferred bigint NOT NULL DEFAULT 0,
    total_bytes       bigint NOT NULL DEFAULT 0,
    current_operation text NOT NULL DEFAULT '',
    error_message     text,
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz
);
CREATE INDEX replication_jobs_created ON replication_jobs (created_at DESC, id DESC);
CREATE INDEX replication_jobs_context ON replication_jobs (vm_context_id, created_at DESC);
CREATE INDEX replication_jobs_status ON replication_jobs (status, created_at DESC);

-- One row per disk of a job. The partial unique index is what makes "one active job per VM disk"
-- hold under concurrency: the second INSERT fails, whatever the timing.
CREATE TABLE replication_job_disks (
    job_id         text NOT NULL REFERENCES replication_jobs (id) ON DELETE CASCADE,
    disk_id        text NOT NULL,
    vm_path        text NOT NULL,
    capacity_bytes bigint,
    active         boolean NOT NULL DEFAULT true,
    base_change_id text,                      -- change ID the job starts from (incremental)
    PRIMARY KEY (job_id, disk_id)
);
CREATE UNIQUE INDEX replication_job_disks_one_active ON replication_job_disks (vm_path, disk_id) WHERE active;

-- CBT change IDs recorded after each completed pass, per VM disk.
CREATE TABLE vm_disk_changeids (
    id         bigserial PRIMARY KEY,
    vm_path    text NOT NULL,
    disk_id    text NOT NULL,
    change_id  text NOT NULL,
    job_id     text REFERENCES replication_jobs (id) ON DELETE SET NULL,  -- kept when the job is deleted
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vm_disk_changeids_latest ON vm_disk_changeids (vm_path, disk_id, id DESC);

-- Failover jobs (written by the failover engine; read here by /debug/failover-jobs).
CREATE TABLE failover_jobs (
    id            text PRIMARY KEY,
    vm_context_id text REFERENCES vm_contexts (context_id),
    failover_type text NOT NULL CHECK (failover_type IN ('live', 'test')),
    status        text NOT NULL,
    error_message text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
