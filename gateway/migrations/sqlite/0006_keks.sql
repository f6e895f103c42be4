-- Migration 6: key-encryption keys, entered once per organization at a key ceremony; BDKs then
-- arrive as TR-31 key blocks under them.
CREATE TABLE keks (
         id         INTEGER PRIMARY KEY,
         org_id     INTEGER NOT NULL REFERENCES organizations(id),
         name       TEXT NOT NULL,
         algorithm  TEXT NOT NULL,
         kcv        TEXT NOT NULL,
         sealed     TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         UNIQUE (org_id, name)
     );
