-- Migration 5: the hash of each GUDID's bootstrap password, which the MQTT endpoint checks at
-- CONNECT.
ALTER TABLE gudids ADD COLUMN bootstrap_hash TEXT;
