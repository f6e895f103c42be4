-- Migration 11 (as SQLite's schema 11): the MQTT credentials a broker may admit, in one view, read
-- by a broker that authenticates from the database at each CONNECT (the Mosquitto plugin
-- `mosquitto-auth/`, EMQX's PostgreSQL authenticator: docs/SCALE-OUT.md) under a role that may read
-- this view and nothing else. One row per identity and `$7$` hash (PBKDF2-SHA512, Mosquitto's
-- format): an initialised terminal `{SN}`; the bootstrap identity `init@{SN}` while a GUDID of the
-- SN is live, or spent less than 10 minutes ago and not yet proven by its device (PROTOCOL.md 7.5,
-- the rule of `live_bootstrap_hashes` and `GUDID_PROOF_WINDOW_MS`); an RKI backend
-- `backend@{org}~{name}` until it is revoked. Times are the database's clock, in Unix milliseconds.
CREATE VIEW rki_broker_credentials AS
    SELECT d.sn AS username, c.broker_password_hash AS password_hash
      FROM devices d JOIN device_credentials c ON c.device_id = d.id
     WHERE c.broker_password_hash IS NOT NULL
    UNION ALL
    SELECT 'init@' || d.sn, g.bootstrap_hash
      FROM devices d JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
     WHERE g.bootstrap_hash IS NOT NULL AND g.revoked_at IS NULL
       AND g.expires_at > (extract(epoch FROM now()) * 1000)::bigint
       AND (g.used_at IS NULL
            OR (g.proven_at IS NULL AND g.used_at > (extract(epoch FROM now()) * 1000)::bigint - 600000))
    UNION ALL
    SELECT 'backend@' || o.name || '~' || b.name, b.password_hash
      FROM backends b JOIN organizations o ON o.id = b.org_id
     WHERE b.revoked_at IS NULL;
-- `WHERE username = $1` on the bootstrap branch is `'init@' || d.sn = $1`: found by this index,
-- not by a scan of every device, and its GUDIDs by `gudids_org` (org_id, device_id), which is why
-- the join names both (the terminal branch uses the SN's own unique index; backends are a few
-- rows).
CREATE INDEX devices_bootstrap_username ON devices (('init@' || sn));
