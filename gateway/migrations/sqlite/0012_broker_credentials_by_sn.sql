-- Migration 12: the broker credentials view names each row's kind ('terminal', 'bootstrap',
-- 'backend') and SN (`name`; '{org}~{name}' for a backend), so that a broker reading PostgreSQL
-- finds an identity by the SN's unique index whatever the planner's statistics (the PostgreSQL
-- migration says why). Here only so that version 12 is the same schema in both dialects.
DROP VIEW rki_broker_credentials;
CREATE VIEW rki_broker_credentials AS
    SELECT d.sn AS username, c.broker_password_hash AS password_hash, 'terminal' AS kind, d.sn AS name
      FROM devices d JOIN device_credentials c ON c.device_id = d.id
     WHERE c.broker_password_hash IS NOT NULL
    UNION ALL
    SELECT 'init@' || d.sn, g.bootstrap_hash, 'bootstrap', d.sn
      FROM devices d JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
     WHERE g.bootstrap_hash IS NOT NULL AND g.revoked_at IS NULL
       AND g.expires_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
       AND (g.used_at IS NULL
            OR (g.proven_at IS NULL
                AND g.used_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - 600000))
    UNION ALL
    SELECT 'backend@' || o.name || '~' || b.name, b.password_hash, 'backend', o.name || '~' || b.name
      FROM backends b JOIN organizations o ON o.id = b.org_id
     WHERE b.revoked_at IS NULL;
