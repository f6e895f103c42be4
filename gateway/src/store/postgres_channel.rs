//! PostgreSQL implementation of [`ChannelStore`], and the event hooks the PostgreSQL store's own
//! transactions call.
//!
//! **Several nodes.** An event's `seq` comes from its organization's `event_streams` row, locked
//! (`FOR UPDATE`) by the transaction that appends, and the events are inserted in the same
//! transaction: numbers are given in commit order, with no hole and no repeat. The hooks run
//! last in their transaction, after every execution row it changes, and take the stream locks in
//! organization order, so that they add no lock cycle. Whether a task is done is read *after*
//! the stream's lock is held: at READ COMMITTED each statement sees what committed before it
//! began, so of two transactions ending a task's last two executions the second to take the lock
//! sees the first's ending and writes the one `TaskDone`.

use std::collections::BTreeMap;

use ::postgres::Row;

use super::channel::*;
use super::postgres::{audit_in, not_found, Failure, PostgresStore, Tx};

/// Maps every row with `f` (whose failures keep their transient/permanent kind).
fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T, Failure>) -> Result<Vec<T>, Failure> {
    rows.iter().map(f).collect()
}
use super::*;

macro_rules! backend_select {
    () => {
        "SELECT id, org_id, name, created_at, created_by, revoked_at, last_counter, sealed_mac_key, password_hash
         FROM backends"
    };
}

fn backend_row(r: &Row) -> Result<BackendRow, Failure> {
    Ok(BackendRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        name: r.try_get(2)?,
        created_at: r.try_get(3)?,
        created_by: r.try_get(4)?,
        revoked_at: r.try_get(5)?,
        last_counter: from_sql(r.try_get(6)?),
        sealed_mac_key: r.try_get(7)?,
        password_hash: r.try_get(8)?,
    })
}

/// Appends `payloads` (with their times) to the organization's stream, which the caller has
/// locked and whose last `seq` is `last`.
fn append_events(s: &mut Tx<'_, '_>, org_id: i64, last: i64, events: &[(Millis, Vec<u8>)]) -> Result<(), Failure> {
    if events.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = (1..=events.len() as i64).map(|i| last + i).collect();
    let ats: Vec<i64> = events.iter().map(|(at, _)| *at).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|(_, p)| p.as_slice()).collect();
    s.execute("UPDATE event_streams SET last_seq = $2 WHERE org_id = $1", &[&org_id, &(last + events.len() as i64)])?;
    s.execute(
        "INSERT INTO backend_events (org_id, seq, at, payload)
         SELECT $1, u.seq, u.at, u.payload FROM unnest($2::bigint[], $3::bigint[], $4::bytea[]) AS u(seq, at, payload)",
        &[&org_id, &seqs, &ats, &payloads],
    )?;
    Ok(())
}

/// The stream's last `seq`, locked until the transaction ends; `None` without a stream.
fn lock_stream(s: &mut Tx<'_, '_>, org_id: i64) -> Result<Option<i64>, Failure> {
    Ok(s.query_opt("SELECT last_seq FROM event_streams WHERE org_id = $1 FOR UPDATE", &[&org_id])?
        .map(|r| r.try_get(0))
        .transpose()?)
}

/// Hook of the actions that may answer a backend request (`stop_task`, `set_unlock_pending`),
/// inside their transaction: the remembered answer, if the audit carries one, written only on a
/// claimed row without an answer yet (the first answer wins).
pub(super) fn on_answered(s: &mut Tx<'_, '_>, audit: &Audit, terminated: usize) -> Result<(), Failure> {
    let Some(answering) = &audit.answering else { return Ok(()) };
    let answer = answering.encode(terminated)?;
    s.execute(
        "UPDATE backend_requests SET answer = $3 WHERE backend_id = $1 AND request_id = $2 AND answer IS NULL",
        &[&answering.backend_id, &as_sql(answering.request_id), &answer],
    )?;
    Ok(())
}

/// Hook of `create_task_with`, last in its transaction: the answer of the backend request that
/// asked for the task, and the `TaskCreated` event.
pub(super) fn on_task_created(
    s: &mut Tx<'_, '_>,
    task: &NewTask,
    number: i64,
    executions: usize,
) -> Result<(), Failure> {
    let mut asked_by = (String::new(), 0u64);
    if let Some(task_request_id) = task.request_id {
        let found = s.query_opt(
            "SELECT r.backend_id, r.request_id, b.name FROM backend_requests r JOIN backends b ON b.id = r.backend_id
             WHERE r.org_id = $1 AND r.task_request_id = $2",
            &[&task.org_id, &task_request_id],
        )?;
        if let Some(row) = found {
            let (backend_id, request_id, name): (i64, i64, String) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let answer = task_created_answer(number, executions)?;
            s.execute(
                "UPDATE backend_requests SET answer = $3 WHERE backend_id = $1 AND request_id = $2",
                &[&backend_id, &request_id, &answer],
            )?;
            asked_by = (name, from_sql(request_id));
        }
    }
    let Some(last) = lock_stream(s, task.org_id)? else { return Ok(()) };
    let payload = task_created_event(number, &asked_by.0, asked_by.1, executions)?;
    append_events(s, task.org_id, last, &[(task.created_at, payload)])
}

/// Hook of every ending (`apply_batch`, `stop_task`, `expire_due`), last in its transaction: an
/// `ExecutionEnded` per execution ended, in the order given, then a `TaskDone` for each task
/// with no open execution left. Set-based: a few statements per organization with a stream,
/// one when none has.
pub(super) fn on_executions_ended(s: &mut Tx<'_, '_>, ended: &[i64]) -> Result<(), Failure> {
    if ended.is_empty() {
        return Ok(());
    }
    let found = s.query(
        "SELECT e.org_id, e.task_id, t.number, e.id, d.sn, e.state, e.result, e.key_id, e.kcv, e.ended_at
         FROM executions e JOIN tasks t ON t.id = e.task_id JOIN devices d ON d.id = e.device_id
         WHERE e.id = ANY ($1) AND EXISTS (SELECT 1 FROM event_streams x WHERE x.org_id = e.org_id)",
        &[&ended],
    )?;
    if found.is_empty() {
        return Ok(());
    }
    let position: std::collections::HashMap<i64, usize> = ended.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut facts = rows(found, |r| {
        Ok(EndedFact {
            org_id: r.try_get(0)?,
            task_id: r.try_get(1)?,
            task_number: r.try_get(2)?,
            execution_id: r.try_get(3)?,
            sn: r.try_get(4)?,
            state: r.try_get(5)?,
            result: r.try_get(6)?,
            key_id: r.try_get(7)?,
            kcv: r.try_get(8)?,
            at: r.try_get::<_, Option<i64>>(9)?.unwrap_or(0),
        })
    })?;
    facts.sort_by_key(|f| position.get(&f.execution_id).copied().unwrap_or(usize::MAX));
    let mut by_org: BTreeMap<i64, Vec<EndedFact>> = BTreeMap::new();
    for fact in facts {
        by_org.entry(fact.org_id).or_default().push(fact);
    }
    for (org_id, facts) in by_org {
        let Some(last) = lock_stream(s, org_id)? else { continue };
        let mut tasks: Vec<(i64, i64)> = Vec::new();
        let mut events = Vec::with_capacity(facts.len() + 1);
        for fact in &facts {
            events.push((fact.at, ended_event(fact)?));
            if !tasks.iter().any(|(id, _)| *id == fact.task_id) {
                tasks.push((fact.task_id, fact.task_number));
            }
        }
        // After the stream's lock: see the endings that committed while this one waited.
        let ids: Vec<i64> = tasks.iter().map(|(id, _)| *id).collect();
        let mut counts: BTreeMap<i64, (TaskCounts, i64)> = BTreeMap::new();
        for r in s.query(
            "SELECT task_id, state, count(*), COALESCE(MAX(ended_at), 0) FROM executions
             WHERE task_id = ANY ($1) GROUP BY task_id, state",
            &[&ids],
        )? {
            let (task_id, state, n, at): (i64, String, i64, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let entry = counts.entry(task_id).or_default();
            if let Some(state) = ExecutionState::parse(&state) {
                entry.0.add(state, n);
            }
            entry.1 = entry.1.max(at);
        }
        for (task_id, number) in tasks {
            if let Some((c, at)) = counts.get(&task_id) {
                if c.open() == 0 {
                    events.push((*at, task_done_event(number, c)?));
                }
            }
        }
        append_events(s, org_id, last, &events)?;
    }
    Ok(())
}

fn remembered(s: &mut Tx<'_, '_>, backend_id: i64, request_id: u64) -> Result<Option<RememberedRequest>, Failure> {
    s.query_opt(
        "SELECT digest, answer FROM backend_requests WHERE backend_id = $1 AND request_id = $2",
        &[&backend_id, &as_sql(request_id)],
    )?
    .map(|r| Ok(RememberedRequest { digest: r.try_get(0)?, answer: r.try_get(1)? }))
    .transpose()
}

impl ChannelStore for PostgresStore {
    fn create_backend(&self, b: &NewBackend, audit: &Audit) -> StoreResult<BackendRow> {
        self.write(|s| {
            let exists = s
                .query_opt("SELECT id FROM backends WHERE org_id = $1 AND name = $2", &[&b.org_id, &b.name])?
                .is_some();
            if exists {
                return Err(Failure::Store(StoreError::Conflict(format!("backend {:?} exists", b.name))));
            }
            let row = s
                .query_one(
                    "INSERT INTO backends (org_id, name, sealed_mac_key, password_hash, created_at, created_by)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     RETURNING id, org_id, name, created_at, created_by, revoked_at, last_counter, sealed_mac_key,
                               password_hash",
                    &[&b.org_id, &b.name, &b.sealed_mac_key, &b.password_hash, &b.at, &b.created_by],
                )
                .map_err(|f| match f {
                    Failure::Store(StoreError::Conflict(_)) => {
                        Failure::Store(StoreError::Conflict(format!("backend {:?} exists", b.name)))
                    }
                    other => other,
                })?;
            s.execute(
                "INSERT INTO event_streams (org_id, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                &[&b.org_id],
            )?;
            audit_in(s, &audit.entry(None, Some(b.org_id), &[]))?;
            backend_row(&row)
        })
    }

    fn list_backends(&self, org_id: i64) -> StoreResult<Vec<BackendRow>> {
        self.read(|s| {
            let found =
                s.query(concat!(backend_select!(), " WHERE org_id = $1 ORDER BY name COLLATE \"C\""), &[&org_id])?;
            rows(found, backend_row)
        })
    }

    fn broker_backends(&self) -> StoreResult<Vec<BrokerBackend>> {
        self.read(|s| {
            let found = s.query(
                "SELECT o.name, b.name, b.password_hash FROM backends b JOIN organizations o ON o.id = b.org_id
                 WHERE b.revoked_at IS NULL ORDER BY o.name COLLATE \"C\", b.name COLLATE \"C\"",
                &[],
            )?;
            rows(found, |r| Ok(BrokerBackend { org: r.try_get(0)?, name: r.try_get(1)?, password_hash: r.try_get(2)? }))
        })
    }

    fn backend_by_name(&self, org_id: i64, name: &str) -> StoreResult<Option<BackendRow>> {
        self.read(|s| {
            s.query_opt(concat!(backend_select!(), " WHERE org_id = $1 AND name = $2"), &[&org_id, &name])?
                .map(|r| backend_row(&r))
                .transpose()
        })
    }

    fn revoke_backend(&self, org_id: i64, name: &str, at: Millis, audit: &Audit) -> StoreResult<BackendRow> {
        self.write(|s| {
            let row = s
                .query_opt(
                    concat!(backend_select!(), " WHERE org_id = $1 AND name = $2 FOR UPDATE"),
                    &[&org_id, &name],
                )?
                .ok_or_else(|| not_found(format!("backend {name:?}")))?;
            let row = backend_row(&row)?;
            if row.revoked_at.is_some() {
                return Err(Failure::Store(StoreError::Conflict(format!("backend {name:?} is revoked already"))));
            }
            s.execute("UPDATE backends SET revoked_at = $2 WHERE id = $1", &[&row.id, &at])?;
            audit_in(s, &audit.entry(None, Some(org_id), &[]))?;
            Ok(BackendRow { revoked_at: Some(at), ..row })
        })
    }

    fn accept_backend_counter(&self, backend_id: i64, counter: u64) -> StoreResult<bool> {
        self.write(|s| {
            let changed = s.execute(
                "UPDATE backends SET last_counter = $2 WHERE id = $1 AND last_counter < $2 AND revoked_at IS NULL",
                &[&backend_id, &as_sql(counter)],
            )?;
            Ok(changed == 1)
        })
    }

    fn claim_backend_request(&self, c: &RequestClaim) -> StoreResult<Option<RememberedRequest>> {
        self.write(|s| {
            let inserted = s.execute(
                "INSERT INTO backend_requests (backend_id, request_id, org_id, digest, task_request_id, at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&c.backend_id, &as_sql(c.request_id), &c.org_id, &c.digest, &c.task_request_id, &c.at],
            )?;
            if inserted == 1 {
                return Ok(None);
            }
            remembered(s, c.backend_id, c.request_id)
        })
    }

    fn remember_backend_answer(&self, backend_id: i64, request_id: u64, answer: &[u8]) -> StoreResult<()> {
        self.write(|s| {
            s.execute(
                "UPDATE backend_requests SET answer = $3 WHERE backend_id = $1 AND request_id = $2 AND answer IS NULL",
                &[&backend_id, &as_sql(request_id), &answer],
            )?;
            Ok(())
        })
    }

    fn forget_backend_request(&self, backend_id: i64, request_id: u64) -> StoreResult<()> {
        self.write(|s| {
            s.execute(
                "DELETE FROM backend_requests WHERE backend_id = $1 AND request_id = $2 AND answer IS NULL",
                &[&backend_id, &as_sql(request_id)],
            )?;
            Ok(())
        })
    }

    fn event_bounds(&self, org_id: i64) -> StoreResult<EventBounds> {
        self.read(|s| {
            let row = s.query_one(
                "SELECT (SELECT last_seq FROM event_streams WHERE org_id = $1),
                        (SELECT MIN(seq) FROM backend_events WHERE org_id = $1)",
                &[&org_id],
            )?;
            let (last, oldest): (Option<i64>, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
            Ok(EventBounds { last: last.map_or(0, from_sql), oldest: oldest.map(from_sql) })
        })
    }

    fn events_after(&self, org_id: i64, after: u64, limit: u64) -> StoreResult<Vec<StoredEvent>> {
        let limit = as_sql(limit.min(i64::MAX as u64));
        self.read(|s| {
            let found = s.query(
                "SELECT seq, at, payload FROM backend_events WHERE org_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&org_id, &as_sql(after), &limit],
            )?;
            rows(found, |r| Ok(StoredEvent { seq: from_sql(r.try_get(0)?), at: r.try_get(1)?, payload: r.try_get(2)? }))
        })
    }

    fn prune_channel(&self, retention: &Retention) -> StoreResult<(u64, u64)> {
        let keep = as_sql(retention.events_per_org_max);
        let rows_max = as_sql(retention.rows_max);
        self.write(|s| {
            let mut events = s.execute(
                "DELETE FROM backend_events WHERE (org_id, seq) IN
                     (SELECT org_id, seq FROM backend_events WHERE at < $1 LIMIT $2)",
                &[&retention.events_before, &rows_max],
            )?;
            events += s.execute(
                "DELETE FROM backend_events WHERE (org_id, seq) IN
                     (SELECT e.org_id, e.seq FROM backend_events e JOIN event_streams x ON x.org_id = e.org_id
                      WHERE e.seq <= x.last_seq - $1 LIMIT $2)",
                &[&keep, &rows_max],
            )?;
            let requests = s.execute(
                "DELETE FROM backend_requests WHERE (backend_id, request_id) IN
                     (SELECT backend_id, request_id FROM backend_requests WHERE at < $1 AND answer IS NOT NULL LIMIT $2)",
                &[&retention.requests_before, &rows_max],
            )?;
            Ok((events, requests))
        })
    }
}
