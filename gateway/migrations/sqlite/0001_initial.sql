-- Migration 1: the initial schema. Times are milliseconds since the UNIX epoch.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE organizations (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE tokens (
    id          INTEGER PRIMARY KEY,
    org_id      INTEGER REFERENCES organizations(id),
    role        TEXT NOT NULL,
    label       TEXT NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    org_id      INTEGER,
    actor       TEXT NOT NULL,
    token_id    INTEGER,
    action      TEXT NOT NULL,
    object      TEXT NOT NULL,
    details     TEXT NOT NULL
);
CREATE INDEX audit_org ON audit(org_id, id);
-- The audit log is append-only.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;

CREATE TABLE key_sources (
    id          INTEGER PRIMARY KEY,
    org_id      INTEGER NOT NULL REFERENCES organizations(id),
    name        TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    kcv         TEXT NOT NULL,
    sealed      TEXT NOT NULL,
    key_set_id  TEXT NOT NULL,
    next_serial INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE devices (
    id                  INTEGER PRIMARY KEY,
    org_id              INTEGER NOT NULL REFERENCES organizations(id),
    sn                  TEXT NOT NULL UNIQUE,
    model               TEXT,
    rom_version         TEXT,
    app_version         TEXT,
    region              TEXT,
    debug_mode          INTEGER NOT NULL DEFAULT 0,
    debug_key_present   INTEGER NOT NULL DEFAULT 0,
    locked              INTEGER NOT NULL DEFAULT 0,
    unlock_pending      INTEGER NOT NULL DEFAULT 0,
    slots               TEXT NOT NULL DEFAULT '[]',
    last_seen           INTEGER,
    assigned_key_source INTEGER REFERENCES key_sources(id),
    x_pos_device_id     TEXT,
    signing_key         TEXT,
    kbpk_aes            TEXT,
    kbpk_tdes           TEXT,
    password_hash       BLOB,
    last_counter        INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL
);
CREATE INDEX devices_org ON devices(org_id, sn);

CREATE TABLE groups (
    id          INTEGER PRIMARY KEY,
    org_id      INTEGER NOT NULL REFERENCES organizations(id),
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    UNIQUE (org_id, name)
);

CREATE TABLE group_members (
    group_id    INTEGER NOT NULL REFERENCES groups(id),
    device_id   INTEGER NOT NULL REFERENCES devices(id),
    PRIMARY KEY (group_id, device_id)
) WITHOUT ROWID;

CREATE TABLE gudids (
    id              INTEGER PRIMARY KEY,
    org_id          INTEGER NOT NULL REFERENCES organizations(id),
    device_id       INTEGER NOT NULL REFERENCES devices(id),
    gudid_id        BLOB NOT NULL UNIQUE,
    mac_key         BLOB NOT NULL,
    provisioned_by  TEXT NOT NULL,
    provisioned_at  INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER
);
CREATE INDEX gudids_org ON gudids(org_id, device_id);

CREATE TABLE tasks (
    id              INTEGER PRIMARY KEY,
    org_id          INTEGER NOT NULL REFERENCES organizations(id),
    key_source_id   INTEGER NOT NULL REFERENCES key_sources(id),
    slot            INTEGER NOT NULL,
    key_type        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    created_by      TEXT NOT NULL,
    stopped_at      INTEGER,
    request_id      INTEGER,
    UNIQUE (org_id, request_id)
);

CREATE TABLE executions (
    id              INTEGER PRIMARY KEY,
    task_id         INTEGER NOT NULL REFERENCES tasks(id),
    org_id          INTEGER NOT NULL,
    device_id       INTEGER NOT NULL REFERENCES devices(id),
    state           TEXT NOT NULL,
    key_block       TEXT NOT NULL,
    key_id          BLOB NOT NULL,
    kcv             TEXT NOT NULL,
    generation      INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    deadline        INTEGER NOT NULL,
    delivered_at    INTEGER,
    delivery_count  INTEGER NOT NULL DEFAULT 0,
    ended_at        INTEGER,
    result          INTEGER
);
CREATE INDEX executions_task ON executions(task_id, state);
CREATE INDEX executions_open ON executions(deadline) WHERE state IN ('queued', 'delivered');
CREATE INDEX executions_device_open ON executions(device_id) WHERE state IN ('queued', 'delivered');

CREATE TABLE records (
    id              INTEGER PRIMARY KEY,
    org_id          INTEGER NOT NULL,
    execution_id    INTEGER NOT NULL UNIQUE REFERENCES executions(id),
    task_id         INTEGER NOT NULL,
    device_id       INTEGER NOT NULL,
    sn              TEXT NOT NULL,
    key_source      TEXT NOT NULL,
    key_source_id   INTEGER NOT NULL,
    key_type        TEXT NOT NULL,
    injection       TEXT NOT NULL,
    result          TEXT NOT NULL,
    error_code      INTEGER,
    at              INTEGER NOT NULL,
    key_id          TEXT NOT NULL,
    kcv             TEXT NOT NULL
);
CREATE INDEX records_org ON records(org_id, id);
CREATE INDEX records_sn ON records(org_id, sn);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records BEGIN SELECT RAISE(ABORT, 'records are permanent'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records BEGIN SELECT RAISE(ABORT, 'records are permanent'); END;
