-- Migration 1: the initial schema, in PostgreSQL's dialect. The same tables, columns, keys and
-- indexes as SQLite's 0001_initial.sql; only the types differ: BIGSERIAL ids, BIGINT
-- times (milliseconds since the UNIX epoch), BOOLEAN flags, BYTEA blobs.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE organizations (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE tokens (
    id          BIGSERIAL PRIMARY KEY,
    org_id      BIGINT REFERENCES organizations(id),
    role        TEXT NOT NULL,
    label       TEXT NOT NULL,
    token_hash  BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- Refuses any change to an append-only table. SQLSTATE 23000 (integrity constraint violation),
-- so the store reports it as a conflict, as SQLite's RAISE(ABORT) is.
CREATE FUNCTION rki_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TABLE audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    org_id      BIGINT,
    actor       TEXT NOT NULL,
    token_id    BIGINT,
    action      TEXT NOT NULL,
    object      TEXT NOT NULL,
    details     TEXT NOT NULL
);
CREATE INDEX audit_org ON audit(org_id, id);
-- The audit log is append-only. TRUNCATE bypasses row triggers, so it is refused as well.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION rki_refuse_change('audit log is append-only');
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION rki_refuse_change('audit log is append-only');
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION rki_refuse_change('audit log is append-only');

CREATE TABLE key_sources (
    id          BIGSERIAL PRIMARY KEY,
    org_id      BIGINT NOT NULL REFERENCES organizations(id),
    name        TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    kcv         TEXT NOT NULL,
    sealed      TEXT NOT NULL,
    key_set_id  TEXT NOT NULL,
    next_serial BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE devices (
    id                  BIGSERIAL PRIMARY KEY,
    org_id              BIGINT NOT NULL REFERENCES organizations(id),
    sn                  TEXT NOT NULL UNIQUE,
    model               TEXT,
    rom_version         TEXT,
    app_version         TEXT,
    region              TEXT,
    debug_mode          BOOLEAN NOT NULL DEFAULT FALSE,
    debug_key_present   BOOLEAN NOT NULL DEFAULT FALSE,
    locked              BOOLEAN NOT NULL DEFAULT FALSE,
    unlock_pending      BOOLEAN NOT NULL DEFAULT FALSE,
    slots               TEXT NOT NULL DEFAULT '[]',
    last_seen           BIGINT,
    assigned_key_source BIGINT REFERENCES key_sources(id),
    x_pos_device_id     TEXT,
    signing_key         TEXT,
    kbpk_aes            TEXT,
    kbpk_tdes           TEXT,
    password_hash       BYTEA,
    last_counter        BIGINT NOT NULL DEFAULT 0,
    generation          BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL
) WITH (fillfactor = 70);
CREATE INDEX devices_org ON devices(org_id, sn);

CREATE TABLE groups (
    id          BIGSERIAL PRIMARY KEY,
    org_id      BIGINT NOT NULL REFERENCES organizations(id),
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    UNIQUE (org_id, name)
);

CREATE TABLE group_members (
    group_id    BIGINT NOT NULL REFERENCES groups(id),
    device_id   BIGINT NOT NULL REFERENCES devices(id),
    PRIMARY KEY (group_id, device_id)
);

CREATE TABLE gudids (
    id              BIGSERIAL PRIMARY KEY,
    org_id          BIGINT NOT NULL REFERENCES organizations(id),
    device_id       BIGINT NOT NULL REFERENCES devices(id),
    gudid_id        BYTEA NOT NULL UNIQUE,
    mac_key         BYTEA NOT NULL,
    provisioned_by  TEXT NOT NULL,
    provisioned_at  BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    used_at         BIGINT
);
CREATE INDEX gudids_org ON gudids(org_id, device_id);

CREATE TABLE tasks (
    id              BIGSERIAL PRIMARY KEY,
    org_id          BIGINT NOT NULL REFERENCES organizations(id),
    key_source_id   BIGINT NOT NULL REFERENCES key_sources(id),
    slot            INTEGER NOT NULL,
    key_type        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    created_by      TEXT NOT NULL,
    stopped_at      BIGINT,
    request_id      BIGINT,
    UNIQUE (org_id, request_id)
);

CREATE TABLE executions (
    id              BIGSERIAL PRIMARY KEY,
    task_id         BIGINT NOT NULL REFERENCES tasks(id),
    org_id          BIGINT NOT NULL,
    device_id       BIGINT NOT NULL REFERENCES devices(id),
    state           TEXT NOT NULL,
    key_block       TEXT NOT NULL,
    key_id          BYTEA NOT NULL,
    kcv             TEXT NOT NULL,
    generation      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    deadline        BIGINT NOT NULL,
    delivered_at    BIGINT,
    delivery_count  BIGINT NOT NULL DEFAULT 0,
    ended_at        BIGINT,
    result          INTEGER
);
CREATE INDEX executions_task ON executions(task_id, state);
-- Partial indexes over the open executions only: the expiry sweep and the start-up load read
-- them; the ended ones (nearly all rows, in time) cost nothing here. Queries name the states
-- literally (`state IN ('queued', 'delivered')`) so the planner can use them.
CREATE INDEX executions_open ON executions(deadline) WHERE state IN ('queued', 'delivered');
CREATE INDEX executions_device_open ON executions(device_id) WHERE state IN ('queued', 'delivered');

CREATE TABLE records (
    id              BIGSERIAL PRIMARY KEY,
    org_id          BIGINT NOT NULL,
    execution_id    BIGINT NOT NULL UNIQUE REFERENCES executions(id),
    task_id         BIGINT NOT NULL,
    device_id       BIGINT NOT NULL,
    sn              TEXT NOT NULL,
    key_source      TEXT NOT NULL,
    key_source_id   BIGINT NOT NULL,
    key_type        TEXT NOT NULL,
    injection       TEXT NOT NULL,
    result          TEXT NOT NULL,
    error_code      INTEGER,
    at              BIGINT NOT NULL,
    key_id          TEXT NOT NULL,
    kcv             TEXT NOT NULL
);
CREATE INDEX records_org ON records(org_id, id);
CREATE INDEX records_sn ON records(org_id, sn);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    FOR EACH ROW EXECUTE FUNCTION rki_refuse_change('records are permanent');
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION rki_refuse_change('records are permanent');
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION rki_refuse_change('records are permanent');
