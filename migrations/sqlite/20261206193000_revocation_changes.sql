-- Replicas load revocations incrementally: each reload reads the rows written
-- or extended since its last one, by `updated_at` (Unix microseconds),
-- instead of every row. Existing rows take their revocation time.
ALTER TABLE identity_revocations ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
UPDATE identity_revocations SET updated_at = revoked_at;
CREATE INDEX IF NOT EXISTS idx_identity_revocations_updated_at ON identity_revocations (updated_at);
