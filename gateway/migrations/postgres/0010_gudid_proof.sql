-- Migration 10 (as SQLite's schema 10): a GUDID is spent by its first answer and proven by the
-- device's first message under the secrets it gave; until proven, for a bounded time, a retried
-- CreateKey with the same GUDID is answered anew. Every GUDID spent before counts as proven.
ALTER TABLE gudids ADD COLUMN proven_at BIGINT;
UPDATE gudids SET proven_at = used_at WHERE used_at IS NOT NULL;
CREATE INDEX gudids_device_unproven ON gudids(device_id) WHERE used_at IS NOT NULL AND proven_at IS NULL;
