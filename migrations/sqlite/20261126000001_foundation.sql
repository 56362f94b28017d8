-- Foundation schema for the embedded SQLite database. Ids are UUID text;
-- timestamps are Unix microseconds (INTEGER) so they compare and sort exactly.

CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT UNIQUE COLLATE NOCASE,
    password_hash TEXT,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    clerk_user_id TEXT UNIQUE,
    clerk_native INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE user_clerk_mappings (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    clerk_user_id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX idx_user_clerk_mappings_user_id ON user_clerk_mappings (user_id);
CREATE INDEX idx_user_clerk_mappings_clerk_id ON user_clerk_mappings (clerk_user_id);

CREATE TABLE user_migration_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    superseded_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX idx_user_migration_tokens_user_id ON user_migration_tokens (user_id);

CREATE TABLE jwt_blacklist (
    id TEXT PRIMARY KEY NOT NULL,
    jti TEXT UNIQUE,
    token_hash TEXT UNIQUE,
    user_id TEXT,
    expires_at INTEGER,
    revoked_at INTEGER NOT NULL
);
CREATE INDEX idx_jwt_blacklist_expires_at ON jwt_blacklist (expires_at);

CREATE TABLE identity_audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at INTEGER NOT NULL,
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    user_id TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX idx_identity_audit_events_user_id ON identity_audit_events (user_id, id);
CREATE INDEX idx_identity_audit_events_action ON identity_audit_events (action, id);
CREATE INDEX idx_identity_audit_events_occurred_at ON identity_audit_events (occurred_at);

CREATE TABLE identity_settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);
