-- Migration 12 (as SQLite's schema 12): the broker credentials view names each row's kind and SN,
-- so that a broker looks an identity up by its SN's unique index whatever the planner's statistics
-- say. Found at 19,000 terminals through three nodes: right after the SNs and GUDIDs were uploaded
-- (no ANALYZE yet), `WHERE username = 'init@…'` was planned as a scan of every GUDID, 35 ms per
-- CONNECT on Mosquitto's only thread, where `kind = 'bootstrap' AND name = SN` is an index probe
-- (tens of microseconds). `username` and `password_hash` stay as they were, first, so that EMQX's
-- queries (docs/SCALE-OUT.md) and the role's SELECT grant carry over (`CREATE OR REPLACE VIEW`
-- keeps grants and may only add columns at the end).
--   kind: 'terminal' ({SN}), 'bootstrap' (init@{SN}), 'backend' (backend@{org}~{name})
--   name: the SN for 'terminal' and 'bootstrap'; '{org}~{name}' for 'backend'
CREATE OR REPLACE VIEW rki_broker_credentials AS
    SELECT d.sn AS username, c.broker_password_hash AS password_hash, 'terminal'::text AS kind, d.sn AS name
      FROM devices d JOIN device_credentials c ON c.device_id = d.id
     WHERE c.broker_password_hash IS NOT NULL
    UNION ALL
    SELECT 'init@' || d.sn, g.bootstrap_hash, 'bootstrap'::text, d.sn
      FROM devices d JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
     WHERE g.bootstrap_hash IS NOT NULL AND g.revoked_at IS NULL
       AND g.expires_at > (extract(epoch FROM now()) * 1000)::bigint
       AND (g.used_at IS NULL
            OR (g.proven_at IS NULL AND g.used_at > (extract(epoch FROM now()) * 1000)::bigint - 600000))
    UNION ALL
    SELECT 'backend@' || o.name || '~' || b.name, b.password_hash, 'backend'::text, o.name || '~' || b.name
      FROM backends b JOIN organizations o ON o.id = b.org_id
     WHERE b.revoked_at IS NULL;
