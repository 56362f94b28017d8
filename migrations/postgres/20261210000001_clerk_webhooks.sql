-- Clerk webhooks (delivered through Svix) and reconciliation with Clerk.

-- One row per delivery, by its `svix-id`: the primary key is what makes a
-- delivery processed once, even when it reaches two replicas at the same
-- moment (the second insert waits for the first transaction and then finds
-- the row). The row is written in the same transaction as the event's effect
-- and its audit event, so an event that failed on our side leaves no row and
-- its retry is processed. `object_version` is the Clerk object's `updated_at`
-- (milliseconds; a deletion is the largest value): an event older than one
-- already processed for the same object does not overwrite it.
CREATE TABLE IF NOT EXISTS identity_webhook_events (
    svix_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    object_id TEXT,
    object_version BIGINT,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    occurred_at TIMESTAMPTZ,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_identity_webhook_events_object ON identity_webhook_events (object_id, object_version);
CREATE INDEX IF NOT EXISTS idx_identity_webhook_events_received_at ON identity_webhook_events (received_at);

-- Ended Clerk sessions (`sid`) and deleted Clerk users are refused like
-- revoked legacy tokens: rows of `identity_revocations`, loaded by every
-- replica through the same incremental reads (by `updated_at`).
ALTER TABLE identity_revocations ADD COLUMN IF NOT EXISTS session_id TEXT;
ALTER TABLE identity_revocations ADD COLUMN IF NOT EXISTS clerk_user_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_revocations_session_id ON identity_revocations (session_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_revocations_clerk_user_id ON identity_revocations (clerk_user_id);

-- Which users lost their Clerk link (an admin's unlink, a deletion in Clerk):
-- `link_by_email` does not hand them to another Clerk account by itself.
CREATE INDEX IF NOT EXISTS idx_identity_unlinked_clerk_users_user_id ON identity_unlinked_clerk_users (user_id);

-- Reconciliation passes (`ReconcileMappings`, `identity reconcile`): one
-- unfinished at a time, run under a lease like bulk jobs, resumable from
-- `cursor`; `summary` holds the drift found so far (JSON).
CREATE TABLE IF NOT EXISTS identity_reconcile_jobs (
    id UUID PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    fix BOOLEAN NOT NULL,
    params TEXT NOT NULL,
    cursor TEXT,
    summary TEXT NOT NULL DEFAULT '{}',
    started_by TEXT NOT NULL,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_identity_reconcile_jobs_running ON identity_reconcile_jobs ((true)) WHERE state = 'running';
