-- Migration 4: a device's credentials in a table of their own (as SQLite's schema 4): the device
-- row, rewritten on every ack and hello, no longer carries them into each new row version.
CREATE TABLE device_credentials (
         device_id            BIGINT PRIMARY KEY REFERENCES devices(id),
         signing_key          TEXT NOT NULL,
         kbpk_aes             TEXT,
         kbpk_tdes            TEXT,
         password_hash        BYTEA,
         broker_password_hash TEXT
     );
     INSERT INTO device_credentials (device_id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
         SELECT id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash FROM devices
         WHERE signing_key IS NOT NULL;
     ALTER TABLE devices DROP COLUMN signing_key, DROP COLUMN kbpk_aes, DROP COLUMN kbpk_tdes,
         DROP COLUMN password_hash, DROP COLUMN broker_password_hash;
