-- Users managed through the API (docs/oma.md, "Users and roles"): a read-only viewer role,
-- disabled accounts, token ids a user can list and revoke, login throttling shared by every OMA
-- process on this database, and an audit log of authentication and user administration.

ALTER TABLE users DROP CONSTRAINT users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check CHECK (role IN ('admin', 'operator', 'viewer'));
ALTER TABLE users ALTER COLUMN role SET DEFAULT 'viewer';   -- least privilege unless said otherwise
ALTER TABLE users ADD COLUMN created_by text;
ALTER TABLE users ADD COLUMN disabled_at timestamptz;      -- NULL: the account may log in
ALTER TABLE users ADD COLUMN disabled_by text;
ALTER TABLE users ADD COLUMN password_changed_at timestamptz;

ALTER TABLE auth_tokens DROP CONSTRAINT auth_tokens_role_check;
ALTER TABLE auth_tokens ADD CONSTRAINT auth_tokens_role_check
    CHECK (role IN ('admin', 'operator', 'viewer', 'vma'));
-- The handle a user names a token by (never the token, never its digest).
ALTER TABLE auth_tokens ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX auth_tokens_id ON auth_tokens (id);
CREATE INDEX auth_tokens_user ON auth_tokens (user_id) WHERE user_id IS NOT NULL;

-- Failed logins per key: 'user:<name>' and 'addr:<client address>'. A row lives until
-- expires_at (the end of its lock or of its counting window, whichever is later).
CREATE TABLE login_throttle (
    key             text PRIMARY KEY,
    failures        integer NOT NULL,
    last_failure_at timestamptz NOT NULL,
    locked_until    timestamptz,
    refused         integer NOT NULL DEFAULT 0,  -- attempts refused (429) during the current lock
    expires_at      timestamptz NOT NULL
);
CREATE INDEX login_throttle_expiry ON login_throttle (expires_at);

CREATE TABLE auth_audit_log (
    id          bigserial PRIMARY KEY,
    event_type  text NOT NULL,
    actor       text NOT NULL,            -- who acted: a user name, or the name tried at login
    subject     text,                     -- the user acted upon, when not the actor
    client_ip   text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_audit_log_created ON auth_audit_log (created_at DESC, id DESC);
