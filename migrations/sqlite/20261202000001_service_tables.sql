-- The service's own tables in SQLite: ids as UUID text, timestamps as Unix
-- microseconds (INTEGER). Every table carries the `identity_` prefix and none
-- touches the application's tables (see the PostgreSQL file for the why).

CREATE TABLE IF NOT EXISTS identity_users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT,
    email_key TEXT,
    password_hash TEXT,
    clerk_native INTEGER NOT NULL DEFAULT 0,
    merged_into TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_users_email_key ON identity_users (email_key) WHERE merged_into IS NULL;

-- What an export (`identity import-users`) told the service about users of
-- the application's table that the table itself does not show readably
-- (LeafLock encrypts emails): read alongside the application's row.
CREATE TABLE IF NOT EXISTS identity_user_profiles (
    user_id TEXT PRIMARY KEY NOT NULL,
    email TEXT,
    email_key TEXT,
    password_hash TEXT,
    imported_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_user_profiles_email_key ON identity_user_profiles (email_key);

CREATE TABLE IF NOT EXISTS identity_user_mappings (
    user_id TEXT PRIMARY KEY NOT NULL,
    clerk_user_id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS identity_unlinked_clerk_users (
    clerk_user_id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    unlinked_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS identity_migration_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    superseded_at INTEGER,
    email_supplied_by TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_identity_migration_tokens_user_id ON identity_migration_tokens (user_id);

CREATE TABLE IF NOT EXISTS identity_revocations (
    id TEXT PRIMARY KEY NOT NULL,
    jti TEXT UNIQUE,
    token_hash TEXT UNIQUE,
    user_id TEXT,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_identity_revocations_expires_at ON identity_revocations (expires_at);

CREATE TABLE IF NOT EXISTS identity_audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at INTEGER NOT NULL,
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    user_id TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_user_id ON identity_audit_events (user_id, id);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_action ON identity_audit_events (action, id);
CREATE INDEX IF NOT EXISTS idx_identity_audit_events_occurred_at ON identity_audit_events (occurred_at);

CREATE TABLE IF NOT EXISTS identity_settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS identity_outbox (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body_text TEXT,
    body_html TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until INTEGER,
    locked_by TEXT,
    last_error TEXT,
    sent_at INTEGER,
    failed_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_identity_outbox_due ON identity_outbox (next_attempt_at) WHERE sent_at IS NULL AND failed_at IS NULL;

CREATE TABLE IF NOT EXISTS identity_bulk_jobs (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    params TEXT NOT NULL,
    cursor_user_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    processed INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL DEFAULT 0,
    linked_existing INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    started_by TEXT NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_bulk_jobs_running ON identity_bulk_jobs (state) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS identity_bulk_failures (
    job_id TEXT NOT NULL REFERENCES identity_bulk_jobs(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, user_id)
);

CREATE TABLE IF NOT EXISTS identity_auth_counts (
    bucket INTEGER NOT NULL,
    method TEXT NOT NULL,
    outcome TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (bucket, method, outcome)
);
CREATE TABLE IF NOT EXISTS identity_auth_latency (
    bucket INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (bucket, slot)
);
CREATE TABLE IF NOT EXISTS identity_auth_activity (
    user_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    legacy INTEGER NOT NULL DEFAULT 0,
    clerk INTEGER NOT NULL DEFAULT 0,
    legacy_while_migrated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
CREATE INDEX IF NOT EXISTS idx_identity_auth_activity_day ON identity_auth_activity (day);

-- Counting triggers an earlier version installed on the application's table.
DROP TRIGGER IF EXISTS identity_count_users_insert;
DROP TRIGGER IF EXISTS identity_count_users_delete;
DROP TRIGGER IF EXISTS identity_count_users_update;
DROP TABLE IF EXISTS identity_user_counts;
