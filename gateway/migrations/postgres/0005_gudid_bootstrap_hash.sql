-- Migration 5: the hash of each GUDID's bootstrap password (as SQLite's schema 5).
ALTER TABLE gudids ADD COLUMN bootstrap_hash TEXT;
