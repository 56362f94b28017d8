-- Replicas load revocations incrementally: each reload reads the rows written
-- or extended since its last one, by `updated_at`, instead of every row.
-- Existing rows take the time of this migration (a fast default, no rewrite).
ALTER TABLE identity_revocations ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS idx_identity_revocations_updated_at ON identity_revocations (updated_at);
