-- Migration 11: the view of the MQTT credentials a broker may admit, which a broker that reads
-- PostgreSQL at each CONNECT uses (docs/SCALE-OUT.md). A single node on SQLite serves its terminals
-- itself and never reads it; it is here so that version 11 is the same schema in both dialects,
-- and so that the store suite checks the view's rule once against both.
CREATE VIEW rki_broker_credentials AS
    SELECT d.sn AS username, c.broker_password_hash AS password_hash
      FROM devices d JOIN device_credentials c ON c.device_id = d.id
     WHERE c.broker_password_hash IS NOT NULL
    UNION ALL
    SELECT 'init@' || d.sn, g.bootstrap_hash
      FROM devices d JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
     WHERE g.bootstrap_hash IS NOT NULL AND g.revoked_at IS NULL
       AND g.expires_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
       AND (g.used_at IS NULL
            OR (g.proven_at IS NULL
                AND g.used_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - 600000))
    UNION ALL
    SELECT 'backend@' || o.name || '~' || b.name, b.password_hash
      FROM backends b JOIN organizations o ON o.id = b.org_id
     WHERE b.revoked_at IS NULL;
