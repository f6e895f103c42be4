-- 9: the backend channel: backend identities, remembered requests, event streams and events.
CREATE TABLE backends (
    id             BIGSERIAL PRIMARY KEY,
    org_id         BIGINT NOT NULL REFERENCES organizations(id),
    name           TEXT NOT NULL,
    sealed_mac_key TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    last_counter   BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    revoked_at     BIGINT,
    UNIQUE (org_id, name)
);
CREATE TABLE backend_requests (
    backend_id      BIGINT NOT NULL REFERENCES backends(id),
    request_id      BIGINT NOT NULL,
    org_id          BIGINT NOT NULL,
    digest          BYTEA NOT NULL,
    task_request_id BIGINT,
    answer          BYTEA,
    at              BIGINT NOT NULL,
    PRIMARY KEY (backend_id, request_id)
);
CREATE INDEX backend_requests_task ON backend_requests(org_id, task_request_id) WHERE task_request_id IS NOT NULL;
CREATE INDEX backend_requests_at ON backend_requests(at);
CREATE TABLE event_streams (
    org_id   BIGINT PRIMARY KEY REFERENCES organizations(id),
    last_seq BIGINT NOT NULL
);
CREATE TABLE backend_events (
    org_id  BIGINT NOT NULL,
    seq     BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (org_id, seq)
);
CREATE INDEX backend_events_at ON backend_events(at);
