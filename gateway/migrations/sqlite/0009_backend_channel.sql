-- 9: the backend channel: backend identities, remembered requests, event streams and events.
CREATE TABLE backends (
    id             INTEGER PRIMARY KEY,
    org_id         INTEGER NOT NULL REFERENCES organizations(id),
    name           TEXT NOT NULL,
    sealed_mac_key TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    last_counter   INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    created_by     TEXT NOT NULL,
    revoked_at     INTEGER,
    UNIQUE (org_id, name)
);
CREATE TABLE backend_requests (
    backend_id      INTEGER NOT NULL REFERENCES backends(id),
    request_id      INTEGER NOT NULL,
    org_id          INTEGER NOT NULL,
    digest          BLOB NOT NULL,
    task_request_id INTEGER,
    answer          BLOB,
    at              INTEGER NOT NULL,
    PRIMARY KEY (backend_id, request_id)
);
CREATE INDEX backend_requests_task ON backend_requests(org_id, task_request_id) WHERE task_request_id IS NOT NULL;
CREATE INDEX backend_requests_at ON backend_requests(at);
CREATE TABLE event_streams (
    org_id   INTEGER PRIMARY KEY REFERENCES organizations(id),
    last_seq INTEGER NOT NULL
);
CREATE TABLE backend_events (
    org_id  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (org_id, seq)
);
CREATE INDEX backend_events_at ON backend_events(at);
