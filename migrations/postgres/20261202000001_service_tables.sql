-- The service's own tables. Every one carries the `identity_` prefix, so none
-- can meet an application table, and none touches the application's tables:
-- its users are read through the configured column mapping (IDENTITY_USERS_*),
-- and the one column the service may add to them (the seed's optional
-- `users.clerk_user_id`) is added at start-up, only when configured.
-- Applied under the migrations table `identity_schema_migrations`, apart from
-- any sqlx migrations the application itself keeps in `_sqlx_migrations`.

-- Users the service knows beyond the application's table: Clerk users first
-- seen through Clerk (provisioned) and users imported from an export.
-- `email` is kept as given; `email_key` (lower-cased) is what look-ups compare.
CREATE TABLE IF NOT EXISTS identity_users (
    id UUID PRIMARY KEY,
    email TEXT,
    email_key TEXT,
    password_hash TEXT,
    clerk_native BOOLEAN NOT NULL DEFAULT false,
    -- A provisional (Clerk-native) user merged into a legacy user: no longer resolved.
    merged_into UUID,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_users_email_key ON identity_users (email_key) WHERE merged_into IS NULL;

-- What an export (`identity import-users`) told the service about users of
-- the application's table that the table itself does not show readably
-- (LeafLock encrypts emails): read alongside the application's row.
CREATE TABLE IF NOT EXISTS identity_user_profiles (
    user_id UUID PRIMARY KEY,
    email TEXT,
    email_key TEXT,
    password_hash TEXT,
    imported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_user_profiles_email_key ON identity_user_profiles (email_key);

-- Legacy user <-> Clerk user, one to one.
CREATE TABLE IF NOT EXISTS identity_user_mappings (
    user_id UUID PRIMARY KEY,
    clerk_user_id TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Clerk users whose link an admin removed (UnlinkUser is a rollback): their
-- tokens are refused until they are linked again, never re-provisioned.
CREATE TABLE IF NOT EXISTS identity_unlinked_clerk_users (
    clerk_user_id TEXT PRIMARY KEY,
    user_id UUID NOT NULL,
    unlinked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Invitation tokens: only the SHA-256 of the token is stored.
CREATE TABLE IF NOT EXISTS identity_migration_tokens (
    id UUID PRIMARY KEY,
    user_id UUID NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ,
    superseded_at TIMESTAMPTZ,
    -- Who supplied the address, when the application's table has no readable email.
    email_supplied_by TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_identity_migration_tokens_user_id ON identity_migration_tokens (user_id);

-- Revoked legacy tokens, by `jti` or by token hash, kept until they expire.
CREATE TABLE IF NOT EXISTS identity_revocations (
    id UUID PRIMARY KEY,
    jti TEXT UNIQUE,
    token_hash TEXT UNIQUE,
    user_id UUID,
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_identity_revocations_expires_at ON identity_revocations (expires_at);

CREATE TABLE IF NOT EXISTS identity_audit_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    user_id UUID,
    outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_user_id ON identity_audit_events (user_id, id);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_action ON identity_audit_events (action, id);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_occurred_at ON identity_audit_events (occurred_at);

CREATE TABLE IF NOT EXISTS identity_settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_by TEXT NOT NULL
);

-- Invitation emails (transactional outbox). The bodies hold the migration
-- link; they are cleared once the message is sent or given up on.
CREATE TABLE IF NOT EXISTS identity_outbox (
    id UUID PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id UUID,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body_text TEXT,
    body_html TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until TIMESTAMPTZ,
    locked_by TEXT,
    last_error TEXT,
    sent_at TIMESTAMPTZ,
    failed_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_identity_outbox_due ON identity_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND failed_at IS NULL;

CREATE TABLE IF NOT EXISTS identity_bulk_jobs (
    id UUID PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    params TEXT NOT NULL,
    cursor_user_id UUID,
    total BIGINT NOT NULL DEFAULT 0,
    processed BIGINT NOT NULL DEFAULT 0,
    created BIGINT NOT NULL DEFAULT 0,
    linked_existing BIGINT NOT NULL DEFAULT 0,
    skipped BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    started_by TEXT NOT NULL,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);
-- At most one unfinished job at a time.
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_bulk_jobs_running ON identity_bulk_jobs ((true)) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS identity_bulk_failures (
    job_id UUID NOT NULL REFERENCES identity_bulk_jobs(id) ON DELETE CASCADE,
    user_id UUID NOT NULL,
    reason TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, user_id)
);

-- Verification counts per minute bucket (Unix seconds), method and outcome.
CREATE TABLE IF NOT EXISTS identity_auth_counts (
    bucket BIGINT NOT NULL,
    method TEXT NOT NULL,
    outcome TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (bucket, method, outcome)
);
-- Verification latency histogram per minute bucket (slot = upper bound index).
CREATE TABLE IF NOT EXISTS identity_auth_latency (
    bucket BIGINT NOT NULL,
    slot INTEGER NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (bucket, slot)
);
-- Who authenticated how, per day (days since 1970-01-01), for cutover readiness.
CREATE TABLE IF NOT EXISTS identity_auth_activity (
    user_id UUID NOT NULL,
    day BIGINT NOT NULL,
    legacy BIGINT NOT NULL DEFAULT 0,
    clerk BIGINT NOT NULL DEFAULT 0,
    legacy_while_migrated BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
CREATE INDEX IF NOT EXISTS idx_identity_auth_activity_day ON identity_auth_activity (day);

-- An earlier version of this service counted users with triggers on the
-- application's `users` table; they cost the application's every write.
-- Remove them wherever they were installed.
DO $$
DECLARE t record;
BEGIN
    FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
             WHERE NOT tgisinternal AND tgname IN ('identity_count_users', 'identity_count_users_insert',
                                                   'identity_count_users_update', 'identity_count_users_delete')
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$$;
DROP FUNCTION IF EXISTS identity_count_users_delta();
DROP FUNCTION IF EXISTS identity_count_users();
DROP TABLE IF EXISTS identity_user_counts;
