-- Migration 6: key-encryption keys (as SQLite's schema 6), entered once per organization; BDKs
-- then arrive as TR-31 key blocks under them.
CREATE TABLE keks (
         id         BIGSERIAL PRIMARY KEY,
         org_id     BIGINT NOT NULL REFERENCES organizations(id),
         name       TEXT NOT NULL,
         algorithm  TEXT NOT NULL,
         kcv        TEXT NOT NULL,
         sealed     TEXT NOT NULL,
         created_at BIGINT NOT NULL,
         UNIQUE (org_id, name)
     );
