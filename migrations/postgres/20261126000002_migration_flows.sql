-- Invitation emails (transactional outbox) and bulk import jobs.

CREATE TABLE IF NOT EXISTS identity_outbox (
    id UUID PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id UUID,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    -- The bodies hold the migration link; they are cleared once the
    -- message is sent or given up on, so the raw token does not linger.
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
