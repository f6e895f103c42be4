//! SQLite implementation of [`ChannelStore`], and the event hooks the SQLite store's own
//! transactions call. One writer: an event's `seq` is the stream's next number in the writer's
//! transaction, so the sequence has no holes and no repeats.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::channel::*;
use super::sqlite::tasks::task_counts;
use super::sqlite::{audit_in, backend, SqliteStore};
use super::*;

const BACKEND_COLUMNS: &str =
    "id, org_id, name, created_at, created_by, revoked_at, last_counter, sealed_mac_key, password_hash";

fn backend_row(r: &Row<'_>) -> rusqlite::Result<BackendRow> {
    Ok(BackendRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
        created_by: r.get(4)?,
        revoked_at: r.get(5)?,
        last_counter: from_sql(r.get(6)?),
        sealed_mac_key: r.get(7)?,
        password_hash: r.get(8)?,
    })
}

fn backend_in(conn: &Connection, org_id: i64, name: &str) -> StoreResult<Option<BackendRow>> {
    conn.query_row(
        &format!("SELECT {BACKEND_COLUMNS} FROM backends WHERE org_id = ?1 AND name = ?2"),
        params![org_id, name],
        backend_row,
    )
    .optional()
    .map_err(backend)
}

/// Appends one event to the organization's stream, if it has one; returns its `seq`.
fn append_event(tx: &Transaction<'_>, org_id: i64, at: Millis, payload: &[u8]) -> StoreResult<Option<u64>> {
    let seq: Option<i64> = tx
        .prepare_cached("UPDATE event_streams SET last_seq = last_seq + 1 WHERE org_id = ?1 RETURNING last_seq")
        .map_err(backend)?
        .query_row([org_id], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    let Some(seq) = seq else { return Ok(None) };
    tx.prepare_cached("INSERT INTO backend_events (org_id, seq, at, payload) VALUES (?1, ?2, ?3, ?4)")
        .map_err(backend)?
        .execute(params![org_id, seq, at, payload])
        .map_err(backend)?;
    Ok(Some(from_sql(seq)))
}

fn has_streams(tx: &Transaction<'_>) -> StoreResult<bool> {
    tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM event_streams)")
        .map_err(backend)?
        .query_row([], |r| r.get(0))
        .map_err(backend)
}

/// Hook of `create_task_with`, inside its transaction: the answer of the backend request that
/// asked for the task (found by the task's `request_id`), and the `TaskCreated` event.
pub(super) fn on_task_created(tx: &Transaction<'_>, task: &NewTask, number: i64, executions: usize) -> StoreResult<()> {
    let mut asked_by = (String::new(), 0u64);
    if let Some(task_request_id) = task.request_id {
        let found: Option<(i64, i64, String)> = tx
            .prepare_cached(
                "SELECT r.backend_id, r.request_id, b.name FROM backend_requests r JOIN backends b ON b.id = r.backend_id
                 WHERE r.org_id = ?1 AND r.task_request_id = ?2",
            )
            .map_err(backend)?
            .query_row(params![task.org_id, task_request_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(backend)?;
        if let Some((backend_id, request_id, name)) = found {
            let answer = task_created_answer(number, executions)?;
            tx.prepare_cached("UPDATE backend_requests SET answer = ?3 WHERE backend_id = ?1 AND request_id = ?2")
                .map_err(backend)?
                .execute(params![backend_id, request_id, answer])
                .map_err(backend)?;
            asked_by = (name, from_sql(request_id));
        }
    }
    if !has_streams(tx)? {
        return Ok(());
    }
    let payload = task_created_event(number, &asked_by.0, asked_by.1, executions)?;
    append_event(tx, task.org_id, task.created_at, &payload)?;
    Ok(())
}

/// Hook of the actions that may answer a backend request (`stop_task`, `set_unlock_pending`),
/// inside their transaction: the remembered answer, if the audit carries one, written only on a
/// claimed row without an answer yet (the first answer wins).
pub(super) fn on_answered(tx: &Transaction<'_>, audit: &Audit, terminated: usize) -> StoreResult<()> {
    let Some(answering) = &audit.answering else { return Ok(()) };
    let answer = answering.encode(terminated)?;
    tx.prepare_cached(
        "UPDATE backend_requests SET answer = ?3 WHERE backend_id = ?1 AND request_id = ?2 AND answer IS NULL",
    )
    .map_err(backend)?
    .execute(params![answering.backend_id, as_sql(answering.request_id), answer])
    .map_err(backend)?;
    Ok(())
}

/// Hook of every ending (`apply_batch`, `stop_task`, `expire_due`), inside its transaction,
/// after the endings: an `ExecutionEnded` per execution ended, in the order given, then a
/// `TaskDone` for each task that has no open execution left.
pub(super) fn on_executions_ended(tx: &Transaction<'_>, ended: &[i64]) -> StoreResult<()> {
    if ended.is_empty() || !has_streams(tx)? {
        return Ok(());
    }
    let mut tasks: Vec<(i64, i64, i64)> = Vec::new();
    for id in ended {
        let fact: Option<EndedFact> = tx
            .prepare_cached(
                "SELECT e.org_id, e.task_id, t.number, e.id, d.sn, e.state, e.result, e.key_id, e.kcv, e.ended_at
                 FROM executions e JOIN tasks t ON t.id = e.task_id JOIN devices d ON d.id = e.device_id
                 JOIN event_streams s ON s.org_id = e.org_id
                 WHERE e.id = ?1",
            )
            .map_err(backend)?
            .query_row([id], |r| {
                Ok(EndedFact {
                    org_id: r.get(0)?,
                    task_id: r.get(1)?,
                    task_number: r.get(2)?,
                    execution_id: r.get(3)?,
                    sn: r.get(4)?,
                    state: r.get(5)?,
                    result: r.get(6)?,
                    key_id: r.get(7)?,
                    kcv: r.get(8)?,
                    at: r.get::<_, Option<i64>>(9)?.unwrap_or(0),
                })
            })
            .optional()
            .map_err(backend)?;
        let Some(fact) = fact else { continue };
        append_event(tx, fact.org_id, fact.at, &ended_event(&fact)?)?;
        if !tasks.iter().any(|(task, _, _)| *task == fact.task_id) {
            tasks.push((fact.task_id, fact.org_id, fact.task_number));
        }
    }
    for (task_id, org_id, number) in tasks {
        let counts = task_counts(tx, task_id)?;
        if counts.open() == 0 {
            let at: i64 = tx
                .query_row("SELECT COALESCE(MAX(ended_at), 0) FROM executions WHERE task_id = ?1", [task_id], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            append_event(tx, org_id, at, &task_done_event(number, &counts)?)?;
        }
    }
    Ok(())
}

impl ChannelStore for SqliteStore {
    fn create_backend(&self, b: &NewBackend, audit: &Audit) -> StoreResult<BackendRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO backends (org_id, name, sealed_mac_key, password_hash, created_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![b.org_id, b.name, b.sealed_mac_key, b.password_hash, b.at, b.created_by],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("backend {:?} exists", b.name)),
                other => other,
            })?;
            tx.execute(
                "INSERT INTO event_streams (org_id, last_seq) VALUES (?1, 0) ON CONFLICT DO NOTHING",
                [b.org_id],
            )
            .map_err(backend)?;
            audit_in(tx, &audit.entry(None, Some(b.org_id), &[]))?;
            backend_in(tx, b.org_id, &b.name)?.ok_or_else(|| StoreError::Backend("backend not read back".into()))
        })
    }

    fn list_backends(&self, org_id: i64) -> StoreResult<Vec<BackendRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {BACKEND_COLUMNS} FROM backends WHERE org_id = ?1 ORDER BY name"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], backend_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn backend_by_name(&self, org_id: i64, name: &str) -> StoreResult<Option<BackendRow>> {
        self.read(|c| backend_in(c, org_id, name))
    }

    fn broker_backends(&self) -> StoreResult<Vec<BrokerBackend>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT o.name, b.name, b.password_hash FROM backends b JOIN organizations o ON o.id = b.org_id
                     WHERE b.revoked_at IS NULL ORDER BY o.name, b.name",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok(BrokerBackend { org: r.get(0)?, name: r.get(1)?, password_hash: r.get(2)? }))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn revoke_backend(&self, org_id: i64, name: &str, at: Millis, audit: &Audit) -> StoreResult<BackendRow> {
        self.write(|tx| {
            let row = backend_in(tx, org_id, name)?.ok_or_else(|| StoreError::NotFound(format!("backend {name:?}")))?;
            if row.revoked_at.is_some() {
                return Err(StoreError::Conflict(format!("backend {name:?} is revoked already")));
            }
            tx.execute("UPDATE backends SET revoked_at = ?2 WHERE id = ?1", params![row.id, at]).map_err(backend)?;
            audit_in(tx, &audit.entry(None, Some(org_id), &[]))?;
            Ok(BackendRow { revoked_at: Some(at), ..row })
        })
    }

    fn accept_backend_counter(&self, backend_id: i64, counter: u64) -> StoreResult<bool> {
        self.write(|tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE backends SET last_counter = ?2 WHERE id = ?1 AND last_counter < ?2 AND revoked_at IS NULL",
                )
                .map_err(backend)?
                .execute(params![backend_id, as_sql(counter)])
                .map_err(backend)?;
            Ok(changed == 1)
        })
    }

    fn claim_backend_request(&self, c: &RequestClaim) -> StoreResult<Option<RememberedRequest>> {
        self.write(|tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO backend_requests (backend_id, request_id, org_id, digest, task_request_id, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    params![c.backend_id, as_sql(c.request_id), c.org_id, c.digest, c.task_request_id, c.at],
                )
                .map_err(backend)?;
            if inserted == 1 {
                return Ok(None);
            }
            remembered_in(tx, c.backend_id, c.request_id)
        })
    }

    fn remember_backend_answer(&self, backend_id: i64, request_id: u64, answer: &[u8]) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE backend_requests SET answer = ?3 WHERE backend_id = ?1 AND request_id = ?2 AND answer IS NULL",
                params![backend_id, as_sql(request_id), answer],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn forget_backend_request(&self, backend_id: i64, request_id: u64) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM backend_requests WHERE backend_id = ?1 AND request_id = ?2 AND answer IS NULL",
                params![backend_id, as_sql(request_id)],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn event_bounds(&self, org_id: i64) -> StoreResult<EventBounds> {
        self.read(|c| {
            let last: Option<i64> = c
                .query_row("SELECT last_seq FROM event_streams WHERE org_id = ?1", [org_id], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            let oldest: Option<i64> = c
                .query_row("SELECT MIN(seq) FROM backend_events WHERE org_id = ?1", [org_id], |r| r.get(0))
                .map_err(backend)?;
            Ok(EventBounds { last: last.map_or(0, from_sql), oldest: oldest.map(from_sql) })
        })
    }

    fn events_after(&self, org_id: i64, after: u64, limit: u64) -> StoreResult<Vec<StoredEvent>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, at, payload FROM backend_events WHERE org_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![org_id, as_sql(after), as_sql(limit.min(i64::MAX as u64))], |r| {
                    Ok(StoredEvent { seq: from_sql(r.get(0)?), at: r.get(1)?, payload: r.get(2)? })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn prune_channel(&self, retention: &Retention) -> StoreResult<(u64, u64)> {
        self.write(|tx| {
            let rows_max = as_sql(retention.rows_max);
            let mut events = tx
                .execute(
                    "DELETE FROM backend_events WHERE (org_id, seq) IN
                         (SELECT org_id, seq FROM backend_events WHERE at < ?1 LIMIT ?2)",
                    params![retention.events_before, rows_max],
                )
                .map_err(backend)? as u64;
            events += tx
                .execute(
                    "DELETE FROM backend_events WHERE (org_id, seq) IN
                         (SELECT e.org_id, e.seq FROM backend_events e JOIN event_streams s ON s.org_id = e.org_id
                          WHERE e.seq <= s.last_seq - ?1 LIMIT ?2)",
                    params![as_sql(retention.events_per_org_max), rows_max],
                )
                .map_err(backend)? as u64;
            let requests = tx
                .execute(
                    "DELETE FROM backend_requests WHERE (backend_id, request_id) IN
                         (SELECT backend_id, request_id FROM backend_requests WHERE at < ?1 AND answer IS NOT NULL LIMIT ?2)",
                    params![retention.requests_before, rows_max],
                )
                .map_err(backend)? as u64;
            Ok((events, requests))
        })
    }
}

fn remembered_in(conn: &Connection, backend_id: i64, request_id: u64) -> StoreResult<Option<RememberedRequest>> {
    conn.query_row(
        "SELECT digest, answer FROM backend_requests WHERE backend_id = ?1 AND request_id = ?2",
        params![backend_id, as_sql(request_id)],
        |r| Ok(RememberedRequest { digest: r.get(0)?, answer: r.get(1)? }),
    )
    .optional()
    .map_err(backend)
}
