-- Outbox depth and invitation figures without full scans: running totals
-- kept by triggers on the service's own tables (never the application's),
-- and partial indexes for what is bounded in time (pending messages,
-- unexpired invitations).
CREATE TABLE IF NOT EXISTS identity_stat_counters (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);

INSERT INTO identity_stat_counters (name, value) VALUES
    ('outbox_sent', (SELECT count(*) FROM identity_outbox WHERE sent_at IS NOT NULL)),
    ('outbox_failed', (SELECT count(*) FROM identity_outbox WHERE failed_at IS NOT NULL)),
    ('invitations_sent', (SELECT count(*) FROM identity_outbox WHERE kind = 'migration_invite' AND sent_at IS NOT NULL)),
    ('invitations_redeemed', (SELECT count(*) FROM identity_migration_tokens WHERE used_at IS NOT NULL)),
    ('invitations_open', (SELECT count(*) FROM identity_migration_tokens WHERE used_at IS NULL AND superseded_at IS NULL))
ON CONFLICT (name) DO UPDATE SET value = excluded.value;

DROP TRIGGER IF EXISTS identity_count_outbox_insert;
CREATE TRIGGER identity_count_outbox_insert AFTER INSERT ON identity_outbox
BEGIN
    UPDATE identity_stat_counters SET value = value + CASE name
        WHEN 'outbox_sent' THEN NEW.sent_at IS NOT NULL
        WHEN 'outbox_failed' THEN NEW.failed_at IS NOT NULL
        ELSE NEW.kind = 'migration_invite' AND NEW.sent_at IS NOT NULL
    END
    WHERE name IN ('outbox_sent', 'outbox_failed', 'invitations_sent');
END;

DROP TRIGGER IF EXISTS identity_count_outbox_update;
CREATE TRIGGER identity_count_outbox_update AFTER UPDATE OF sent_at, failed_at, kind ON identity_outbox
WHEN (OLD.sent_at IS NULL) <> (NEW.sent_at IS NULL) OR (OLD.failed_at IS NULL) <> (NEW.failed_at IS NULL)
    OR OLD.kind IS NOT NEW.kind
BEGIN
    UPDATE identity_stat_counters SET value = value + CASE name
        WHEN 'outbox_sent' THEN (NEW.sent_at IS NOT NULL) - (OLD.sent_at IS NOT NULL)
        WHEN 'outbox_failed' THEN (NEW.failed_at IS NOT NULL) - (OLD.failed_at IS NOT NULL)
        ELSE (NEW.kind = 'migration_invite' AND NEW.sent_at IS NOT NULL)
            - (OLD.kind = 'migration_invite' AND OLD.sent_at IS NOT NULL)
    END
    WHERE name IN ('outbox_sent', 'outbox_failed', 'invitations_sent');
END;

DROP TRIGGER IF EXISTS identity_count_outbox_delete;
CREATE TRIGGER identity_count_outbox_delete AFTER DELETE ON identity_outbox
BEGIN
    UPDATE identity_stat_counters SET value = value - CASE name
        WHEN 'outbox_sent' THEN OLD.sent_at IS NOT NULL
        WHEN 'outbox_failed' THEN OLD.failed_at IS NOT NULL
        ELSE OLD.kind = 'migration_invite' AND OLD.sent_at IS NOT NULL
    END
    WHERE name IN ('outbox_sent', 'outbox_failed', 'invitations_sent');
END;

DROP TRIGGER IF EXISTS identity_count_invitations_insert;
CREATE TRIGGER identity_count_invitations_insert AFTER INSERT ON identity_migration_tokens
BEGIN
    UPDATE identity_stat_counters SET value = value + CASE name
        WHEN 'invitations_redeemed' THEN NEW.used_at IS NOT NULL
        ELSE NEW.used_at IS NULL AND NEW.superseded_at IS NULL
    END
    WHERE name IN ('invitations_redeemed', 'invitations_open');
END;

DROP TRIGGER IF EXISTS identity_count_invitations_update;
CREATE TRIGGER identity_count_invitations_update AFTER UPDATE OF used_at, superseded_at ON identity_migration_tokens
WHEN (OLD.used_at IS NULL) <> (NEW.used_at IS NULL) OR (OLD.superseded_at IS NULL) <> (NEW.superseded_at IS NULL)
BEGIN
    UPDATE identity_stat_counters SET value = value + CASE name
        WHEN 'invitations_redeemed' THEN (NEW.used_at IS NOT NULL) - (OLD.used_at IS NOT NULL)
        ELSE (NEW.used_at IS NULL AND NEW.superseded_at IS NULL) - (OLD.used_at IS NULL AND OLD.superseded_at IS NULL)
    END
    WHERE name IN ('invitations_redeemed', 'invitations_open');
END;

DROP TRIGGER IF EXISTS identity_count_invitations_delete;
CREATE TRIGGER identity_count_invitations_delete AFTER DELETE ON identity_migration_tokens
BEGIN
    UPDATE identity_stat_counters SET value = value - CASE name
        WHEN 'invitations_redeemed' THEN OLD.used_at IS NOT NULL
        ELSE OLD.used_at IS NULL AND OLD.superseded_at IS NULL
    END
    WHERE name IN ('invitations_redeemed', 'invitations_open');
END;

-- Unused, not superseded invitations by expiry: the pending ones are a range of it.
CREATE INDEX IF NOT EXISTS idx_identity_migration_tokens_open ON identity_migration_tokens (expires_at)
    WHERE used_at IS NULL AND superseded_at IS NULL;
