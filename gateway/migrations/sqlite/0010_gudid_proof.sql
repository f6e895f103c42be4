-- Migration 10: a GUDID is spent by its first answer and proven by the device's first message
-- under the secrets it gave. Until proven (and for a bounded time after its first answer), a
-- retried CreateKey with the same GUDID is answered anew, so a terminal whose answer came too
-- late keeps its GUDID. Every GUDID spent before this migration counts as proven.
ALTER TABLE gudids ADD COLUMN proven_at INTEGER;
UPDATE gudids SET proven_at = used_at WHERE used_at IS NOT NULL;
CREATE INDEX gudids_device_unproven ON gudids(device_id) WHERE used_at IS NOT NULL AND proven_at IS NULL;
