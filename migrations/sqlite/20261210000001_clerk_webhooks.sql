-- Clerk webhooks and reconciliation (see the PostgreSQL file for the why).
-- Timestamps are Unix microseconds; `object_version` milliseconds, as Clerk sends them.

CREATE TABLE IF NOT EXISTS identity_webhook_events (
    svix_id TEXT PRIMARY KEY NOT NULL,
    event_type TEXT NOT NULL,
    object_id TEXT,
    object_version INTEGER,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    occurred_at INTEGER,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_identity_webhook_events_object ON identity_webhook_events (object_id, object_version);
CREATE INDEX IF NOT EXISTS idx_identity_webhook_events_received_at ON identity_webhook_events (received_at);

ALTER TABLE identity_revocations ADD COLUMN session_id TEXT;
ALTER TABLE identity_revocations ADD COLUMN clerk_user_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_revocations_session_id ON identity_revocations (session_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_revocations_clerk_user_id ON identity_revocations (clerk_user_id);

CREATE INDEX IF NOT EXISTS idx_identity_unlinked_clerk_users_user_id ON identity_unlinked_clerk_users (user_id);

CREATE TABLE IF NOT EXISTS identity_reconcile_jobs (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    fix INTEGER NOT NULL,
    params TEXT NOT NULL,
    cursor TEXT,
    summary TEXT NOT NULL DEFAULT '{}',
    started_by TEXT NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_reconcile_jobs_running ON identity_reconcile_jobs (state) WHERE state = 'running';
