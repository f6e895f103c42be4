-- Migration 7: GUDID custody (as SQLite's schema 7): each GUDID's MAC key sealed under the master
-- key (the clear `mac_key` column is emptied by the start-time re-seal and written empty from now
-- on); revocation; the unspent GUDIDs of a device found by index.
ALTER TABLE gudids ADD COLUMN sealed_mac_key TEXT, ADD COLUMN revoked_at BIGINT, ADD COLUMN revoked_by TEXT;
     CREATE INDEX gudids_device_unspent ON gudids(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;
