-- A device's credentials move out of the device row into a table of their own (schema version 4).
-- They are written once per initialisation; the device row is rewritten on every ack and hello.
CREATE TABLE device_credentials (
    device_id            INTEGER PRIMARY KEY REFERENCES devices(id),
    signing_key          TEXT NOT NULL,
    kbpk_aes             TEXT,
    kbpk_tdes            TEXT,
    password_hash        BLOB,
    broker_password_hash TEXT
);
INSERT INTO device_credentials (device_id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
    SELECT id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash FROM devices
    WHERE signing_key IS NOT NULL;
ALTER TABLE devices DROP COLUMN signing_key;
ALTER TABLE devices DROP COLUMN kbpk_aes;
ALTER TABLE devices DROP COLUMN kbpk_tdes;
ALTER TABLE devices DROP COLUMN password_hash;
ALTER TABLE devices DROP COLUMN broker_password_hash;
