-- Migration 3: the columns of PostgreSQL's cluster-wide re-delivery claims, unused by a single
-- node; they keep the two schemas' versions in step.
ALTER TABLE executions ADD COLUMN last_sent_at INTEGER; ALTER TABLE executions ADD COLUMN retry_claimed_until INTEGER;
