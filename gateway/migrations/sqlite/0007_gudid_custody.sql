-- Migration 7: GUDID custody. The MAC key of each GUDID sealed under the master key (the clear
-- `mac_key` column is emptied by the start-time re-seal, `seal_legacy_gudid_keys`, and written
-- empty from now on); revocation; at most one live GUDID per device, found by index.
ALTER TABLE gudids ADD COLUMN sealed_mac_key TEXT;
     ALTER TABLE gudids ADD COLUMN revoked_at INTEGER;
     ALTER TABLE gudids ADD COLUMN revoked_by TEXT;
     CREATE INDEX gudids_device_unspent ON gudids(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;
