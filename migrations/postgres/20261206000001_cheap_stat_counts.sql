-- Outbox depth and invitation figures without full scans: running totals
-- kept by triggers on the service's own tables (never the application's),
-- and partial indexes for what is bounded in time (pending messages,
-- unexpired invitations).
CREATE TABLE IF NOT EXISTS identity_stat_counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

CREATE OR REPLACE FUNCTION identity_count_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_sent BIGINT := 0;
    d_failed BIGINT := 0;
    d_invites BIGINT := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        d_sent := d_sent - (OLD.sent_at IS NOT NULL)::int;
        d_failed := d_failed - (OLD.failed_at IS NOT NULL)::int;
        d_invites := d_invites - (OLD.kind = 'migration_invite' AND OLD.sent_at IS NOT NULL)::int;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        d_sent := d_sent + (NEW.sent_at IS NOT NULL)::int;
        d_failed := d_failed + (NEW.failed_at IS NOT NULL)::int;
        d_invites := d_invites + (NEW.kind = 'migration_invite' AND NEW.sent_at IS NOT NULL)::int;
    END IF;
    IF d_sent <> 0 THEN
        UPDATE identity_stat_counters SET value = value + d_sent WHERE name = 'outbox_sent';
    END IF;
    IF d_failed <> 0 THEN
        UPDATE identity_stat_counters SET value = value + d_failed WHERE name = 'outbox_failed';
    END IF;
    IF d_invites <> 0 THEN
        UPDATE identity_stat_counters SET value = value + d_invites WHERE name = 'invitations_sent';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION identity_count_invitations() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_redeemed BIGINT := 0;
    d_open BIGINT := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        d_redeemed := d_redeemed - (OLD.used_at IS NOT NULL)::int;
        d_open := d_open - (OLD.used_at IS NULL AND OLD.superseded_at IS NULL)::int;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        d_redeemed := d_redeemed + (NEW.used_at IS NOT NULL)::int;
        d_open := d_open + (NEW.used_at IS NULL AND NEW.superseded_at IS NULL)::int;
    END IF;
    IF d_redeemed <> 0 THEN
        UPDATE identity_stat_counters SET value = value + d_redeemed WHERE name = 'invitations_redeemed';
    END IF;
    IF d_open <> 0 THEN
        UPDATE identity_stat_counters SET value = value + d_open WHERE name = 'invitations_open';
    END IF;
    RETURN NULL;
END
$$;

-- The triggers first: creating them locks out writers until this migration
-- commits, so the totals below cannot miss a concurrent change.
DROP TRIGGER IF EXISTS identity_count_outbox ON identity_outbox;
CREATE TRIGGER identity_count_outbox
    AFTER INSERT OR UPDATE OF sent_at, failed_at, kind OR DELETE ON identity_outbox
    FOR EACH ROW EXECUTE FUNCTION identity_count_outbox();
DROP TRIGGER IF EXISTS identity_count_invitations ON identity_migration_tokens;
CREATE TRIGGER identity_count_invitations
    AFTER INSERT OR UPDATE OF used_at, superseded_at OR DELETE ON identity_migration_tokens
    FOR EACH ROW EXECUTE FUNCTION identity_count_invitations();

INSERT INTO identity_stat_counters (name, value) VALUES
    ('outbox_sent', (SELECT count(*) FROM identity_outbox WHERE sent_at IS NOT NULL)),
    ('outbox_failed', (SELECT count(*) FROM identity_outbox WHERE failed_at IS NOT NULL)),
    ('invitations_sent', (SELECT count(*) FROM identity_outbox WHERE kind = 'migration_invite' AND sent_at IS NOT NULL)),
    ('invitations_redeemed', (SELECT count(*) FROM identity_migration_tokens WHERE used_at IS NOT NULL)),
    ('invitations_open', (SELECT count(*) FROM identity_migration_tokens WHERE used_at IS NULL AND superseded_at IS NULL))
ON CONFLICT (name) DO UPDATE SET value = excluded.value;

-- Unused, not superseded invitations by expiry: the pending ones are a range of it.
CREATE INDEX IF NOT EXISTS idx_identity_migration_tokens_open ON identity_migration_tokens (expires_at)
    WHERE used_at IS NULL AND superseded_at IS NULL;
