-- Exact user counts kept by a trigger in the same transaction as every
-- change, so stats cost the same at a million users as at a hundred; and
-- the auth counters every replica flushes in small time buckets.

CREATE TABLE IF NOT EXISTS identity_user_counts (
    id BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    legacy_only BIGINT NOT NULL,
    migrated BIGINT NOT NULL,
    clerk_native BIGINT NOT NULL
);

CREATE OR REPLACE FUNCTION identity_count_users() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_legacy BIGINT := 0;
    d_migrated BIGINT := 0;
    d_native BIGINT := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF OLD.clerk_native THEN d_native := d_native - 1;
        ELSIF OLD.clerk_user_id IS NULL THEN d_legacy := d_legacy - 1;
        ELSE d_migrated := d_migrated - 1;
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        IF NEW.clerk_native THEN d_native := d_native + 1;
        ELSIF NEW.clerk_user_id IS NULL THEN d_legacy := d_legacy + 1;
        ELSE d_migrated := d_migrated + 1;
        END IF;
    END IF;
    IF d_legacy <> 0 OR d_migrated <> 0 OR d_native <> 0 THEN
        UPDATE identity_user_counts
        SET legacy_only = legacy_only + d_legacy, migrated = migrated + d_migrated, clerk_native = clerk_native + d_native
        WHERE id;
    END IF;
    RETURN NULL;
END
$$;

-- Writers wait while the snapshot is taken and the trigger installed, so the count starts exact.
LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO identity_user_counts (id, legacy_only, migrated, clerk_native)
SELECT true,
       count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NULL),
       count(*) FILTER (WHERE NOT clerk_native AND clerk_user_id IS NOT NULL),
       count(*) FILTER (WHERE clerk_native)
FROM users
ON CONFLICT (id) DO NOTHING;
DROP TRIGGER IF EXISTS identity_count_users ON users;
CREATE TRIGGER identity_count_users
    AFTER INSERT OR DELETE OR UPDATE OF clerk_user_id, clerk_native ON users
    FOR EACH ROW EXECUTE FUNCTION identity_count_users();

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
