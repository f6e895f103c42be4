-- Migration 2: Mosquitto password hashes for the external-broker mode.
ALTER TABLE devices ADD COLUMN broker_password_hash TEXT;
