-- Foundation schema. Safe on an existing application database: every
-- statement only adds what is missing and never drops or rewrites data.

-- The application's users (the seed's `users`). Kept as is when it exists.
CREATE TABLE IF NOT EXISTS users (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    email TEXT UNIQUE,
    password_hash TEXT,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE users ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE users ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
-- The seed's optional column: the linked Clerk user, unique.
ALTER TABLE users ADD COLUMN IF NOT EXISTS clerk_user_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS users_clerk_user_id_key ON users (clerk_user_id);
-- Users that arrived through Clerk and never had a legacy password.
ALTER TABLE users ADD COLUMN IF NOT EXISTS clerk_native BOOLEAN NOT NULL DEFAULT false;
-- Clerk-native users have no password (and may have no email yet); relaxing
-- NOT NULL changes no existing row.
ALTER TABLE users ALTER COLUMN password_hash DROP NOT NULL;
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
-- Lookups by email are case-insensitive.
CREATE INDEX IF NOT EXISTS idx_users_email_lower ON users (lower(email));

-- The seed's mapping table and indexes, one mapping per user.
CREATE TABLE IF NOT EXISTS user_clerk_mappings (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    clerk_user_id TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_user_clerk_mappings_user_id ON user_clerk_mappings (user_id);
CREATE INDEX IF NOT EXISTS idx_user_clerk_mappings_clerk_id ON user_clerk_mappings (clerk_user_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_user_clerk_mappings_user_id ON user_clerk_mappings (user_id);

-- Invitation tokens: only the SHA-256 of the token is stored.
CREATE TABLE IF NOT EXISTS user_migration_tokens (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ,
    superseded_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_user_migration_tokens_user_id ON user_migration_tokens (user_id);

-- Revoked legacy tokens, by `jti` or by token hash, kept until they expire.
CREATE TABLE IF NOT EXISTS jwt_blacklist (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid()
);
ALTER TABLE jwt_blacklist ADD COLUMN IF NOT EXISTS jti TEXT;
ALTER TABLE jwt_blacklist ADD COLUMN IF NOT EXISTS token_hash TEXT;
ALTER TABLE jwt_blacklist ADD COLUMN IF NOT EXISTS user_id UUID;
ALTER TABLE jwt_blacklist ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ;
ALTER TABLE jwt_blacklist ADD COLUMN IF NOT EXISTS revoked_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE UNIQUE INDEX IF NOT EXISTS uq_jwt_blacklist_jti ON jwt_blacklist (jti);
CREATE UNIQUE INDEX IF NOT EXISTS uq_jwt_blacklist_token_hash ON jwt_blacklist (token_hash);
CREATE INDEX IF NOT EXISTS idx_jwt_blacklist_expires_at ON jwt_blacklist (expires_at);

-- The service's own tables carry a prefix so they never meet the application's.
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
