-- Exact user counts kept by triggers, and the flushed auth counters.

CREATE TABLE identity_user_counts (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    legacy_only INTEGER NOT NULL,
    migrated INTEGER NOT NULL,
    clerk_native INTEGER NOT NULL
);
INSERT INTO identity_user_counts (id, legacy_only, migrated, clerk_native)
SELECT 1,
       COALESCE(SUM(clerk_native = 0 AND clerk_user_id IS NULL), 0),
       COALESCE(SUM(clerk_native = 0 AND clerk_user_id IS NOT NULL), 0),
       COALESCE(SUM(clerk_native <> 0), 0)
FROM users;

CREATE TRIGGER identity_count_users_insert AFTER INSERT ON users BEGIN
    UPDATE identity_user_counts SET
        legacy_only = legacy_only + (NEW.clerk_native = 0 AND NEW.clerk_user_id IS NULL),
        migrated = migrated + (NEW.clerk_native = 0 AND NEW.clerk_user_id IS NOT NULL),
        clerk_native = clerk_native + (NEW.clerk_native <> 0)
    WHERE id = 1;
END;

CREATE TRIGGER identity_count_users_delete AFTER DELETE ON users BEGIN
    UPDATE identity_user_counts SET
        legacy_only = legacy_only - (OLD.clerk_native = 0 AND OLD.clerk_user_id IS NULL),
        migrated = migrated - (OLD.clerk_native = 0 AND OLD.clerk_user_id IS NOT NULL),
        clerk_native = clerk_native - (OLD.clerk_native <> 0)
    WHERE id = 1;
END;

CREATE TRIGGER identity_count_users_update AFTER UPDATE OF clerk_user_id, clerk_native ON users BEGIN
    UPDATE identity_user_counts SET
        legacy_only = legacy_only - (OLD.clerk_native = 0 AND OLD.clerk_user_id IS NULL)
                                  + (NEW.clerk_native = 0 AND NEW.clerk_user_id IS NULL),
        migrated = migrated - (OLD.clerk_native = 0 AND OLD.clerk_user_id IS NOT NULL)
                            + (NEW.clerk_native = 0 AND NEW.clerk_user_id IS NOT NULL),
        clerk_native = clerk_native - (OLD.clerk_native <> 0) + (NEW.clerk_native <> 0)
    WHERE id = 1;
END;

CREATE TABLE identity_auth_counts (
    bucket INTEGER NOT NULL,
    method TEXT NOT NULL,
    outcome TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (bucket, method, outcome)
);
CREATE TABLE identity_auth_latency (
    bucket INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (bucket, slot)
);
CREATE TABLE identity_auth_activity (
    user_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    legacy INTEGER NOT NULL DEFAULT 0,
    clerk INTEGER NOT NULL DEFAULT 0,
    legacy_while_migrated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
CREATE INDEX idx_identity_auth_activity_day ON identity_auth_activity (day);
