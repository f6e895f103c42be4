//! SQLite: tasks, their executions (streamed in by a [`TaskSink`]), records and counts.

use super::*;

/// [`TaskSink`] inside `create_task_with`'s transaction on the writer connection.
struct SqliteTaskSink<'a> {
    tx: &'a Transaction<'a>,
    task: &'a NewTask,
    task_id: i64,
    inserted: usize,
}

/// Executions per INSERT statement of a task: fewer statements to step, one `RETURNING` each.
pub(super) const EXECUTIONS_PER_INSERT: usize = 64;

/// `INSERT … VALUES` of `rows` executions: `?1`–`?4` the task's columns, then five per row.
fn insert_executions_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO executions (task_id, org_id, state, created_at, deadline, device_id, key_block, key_id, kcv, generation) VALUES ",
    );
    for r in 0..rows {
        let p = 5 + r * 5;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("(?1, ?2, 'queued', ?3, ?4, ?{}, ?{}, ?{}, ?{}, ?{})", p, p + 1, p + 2, p + 3, p + 4));
    }
    sql.push_str(" RETURNING id, device_id");
    sql
}

impl TaskSink for SqliteTaskSink<'_> {
    fn derive_targets(&mut self, device_ids: &[i64], aes: bool) -> StoreResult<Vec<DeriveTarget>> {
        let kbpk = if aes { "kbpk_aes" } else { "kbpk_tdes" };
        let mut out = Vec::with_capacity(device_ids.len());
        for chunk in device_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT d.id, d.sn, d.generation, c.{kbpk} FROM devices d JOIN device_credentials c ON c.device_id = d.id
                 WHERE d.id IN ({})",
                in_list(chunk.len())
            );
            let mut stmt = self.tx.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(chunk.iter()), |r| mapped(r, derive_target_row))
                .map_err(backend)?;
            for row in rows {
                out.push(row.map_err(backend)?);
            }
        }
        Ok(out)
    }

    fn insert(&mut self, executions: &[NewExecution]) -> StoreResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(executions.len());
        let mut by_device: HashMap<i64, i64> = HashMap::with_capacity(EXECUTIONS_PER_INSERT);
        for rows in executions.chunks(EXECUTIONS_PER_INSERT) {
            let mut insert = self.tx.prepare_cached(&insert_executions_sql(rows.len())).map_err(backend)?;
            let task = [
                &self.task_id as &dyn rusqlite::ToSql,
                &self.task.org_id,
                &self.task.created_at,
                &self.task.expires_at,
            ];
            let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(4 + rows.len() * 5);
            params.extend_from_slice(&task);
            for e in rows {
                params.extend_from_slice(&[
                    &e.device_id as &dyn rusqlite::ToSql,
                    &e.key_block,
                    &e.key_id,
                    &e.kcv,
                    &e.generation,
                ]);
            }
            // RETURNING promises no order: each id comes back with its device (one execution per
            // device and task).
            by_device.clear();
            let returned = insert
                .query_map(params.as_slice(), |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(0)?)))
                .map_err(backend)?;
            for row in returned {
                let (device, id) = row.map_err(backend)?;
                by_device.insert(device, id);
            }
            for e in rows {
                let id = by_device.get(&e.device_id).ok_or_else(|| {
                    StoreError::Backend(format!("no execution id returned for device {}", e.device_id))
                })?;
                ids.push(*id);
            }
        }
        self.inserted += executions.len();
        Ok(ids)
    }
}

pub(crate) fn task_counts(conn: &Connection, task_id: i64) -> StoreResult<TaskCounts> {
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM executions WHERE task_id = ?1 GROUP BY state")
        .map_err(backend)?;
    let mut counts = TaskCounts::default();
    let rows = stmt.query_map([task_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(backend)?;
    for row in rows {
        let (state, n) = row.map_err(backend)?;
        count_state(&mut counts, &state, n)?;
    }
    Ok(counts)
}

impl Tasks for SqliteStore {
    fn create_task_with(
        &self,
        task: &NewTask,
        audit: &Audit,
        fill: &mut dyn FnMut(&mut dyn TaskSink) -> StoreResult<()>,
    ) -> StoreResult<TaskRow> {
        let (task_id, inserted) = self.write(|tx| {
            tx.execute(
                "INSERT INTO tasks (org_id, key_source_id, slot, key_type, created_at, expires_at, created_by, request_id, number)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, (SELECT COALESCE(MAX(number), 0) + 1 FROM tasks WHERE org_id = ?1))",
                params![
                    task.org_id,
                    task.key_source_id,
                    task.slot,
                    task.key_type,
                    task.created_at,
                    task.expires_at,
                    task.created_by,
                    task.request_id
                ],
            )
            .map_err(backend)?;
            let mut sink = SqliteTaskSink { tx, task, task_id: tx.last_insert_rowid(), inserted: 0 };
            sink.insert(&task.executions)?;
            fill(&mut sink)?;
            let (task_id, inserted) = (sink.task_id, sink.inserted);
            let number: i64 =
                tx.query_row("SELECT number FROM tasks WHERE id = ?1", [task_id], |r| r.get(0)).map_err(backend)?;
            audit_in(tx, &audit.entry(Some(format!("task:{number}")), None, &[("executions", inserted.into())]))?;
            crate::store::sqlite_channel::on_task_created(tx, task, number, inserted)?;
            Ok((task_id, inserted))
        })?;
        committed_task(self.task(task.org_id, task_id)?, inserted)
    }

    fn task_by_request_id(&self, org_id: i64, request_id: i64) -> StoreResult<Option<TaskRow>> {
        let id: Option<i64> = self.read(|c| {
            c.query_row(
                "SELECT id FROM tasks WHERE org_id = ?1 AND request_id = ?2",
                params![org_id, request_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })?;
        id.map(|id| self.task(org_id, id)).transpose()
    }

    fn list_tasks(
        &self,
        org_id: i64,
        unfinished: Option<bool>,
        limit: i64,
        before: Option<i64>,
    ) -> StoreResult<Vec<TaskRow>> {
        self.read(|c| {
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM tasks t JOIN key_sources k ON k.id = t.key_source_id
                 WHERE t.org_id = ?1 AND (?2 IS NULL OR
                    (EXISTS (SELECT 1 FROM executions e WHERE e.task_id = t.id AND e.state IN ('queued','delivered'))) = ?2)
                   AND (?4 IS NULL OR t.number < ?4)
                 ORDER BY t.number DESC LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt.query_map(params![org_id, unfinished, limit, before], |r| mapped(r, task_row)).map_err(backend)?;
            let mut tasks = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
            for t in &mut tasks {
                t.counts = task_counts(c, t.id)?;
            }
            Ok(tasks)
        })
    }

    fn task_id_by_number(&self, org_id: i64, number: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT id FROM tasks WHERE org_id = ?1 AND number = ?2", params![org_id, number], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("task {number}")))
        })
    }

    fn task(&self, org_id: i64, id: i64) -> StoreResult<TaskRow> {
        self.read(|c| {
            let mut t = c
                .query_row(
                    &format!("SELECT {TASK_COLUMNS} FROM tasks t JOIN key_sources k ON k.id = t.key_source_id WHERE t.org_id = ?1 AND t.id = ?2"),
                    params![org_id, id],
                    |r| mapped(r, task_row),
                )
                .map_err(or_not_found(format!("task {id}")))?;
            t.counts = task_counts(c, id)?;
            Ok(t)
        })
    }

    fn task_executions_page(&self, task_id: i64, offset: i64, limit: Option<i64>) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.task_id = ?1 ORDER BY e.id LIMIT ?2 OFFSET ?3"
                ))
                .map_err(backend)?;
            // SQLite: a negative LIMIT is no limit.
            let rows = stmt.query_map(params![task_id, limit.unwrap_or(-1), offset.max(0)], |r| mapped(r, execution_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn open_executions(&self) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.state IN ('queued','delivered') ORDER BY e.id"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| mapped(r, execution_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn open_executions_for_device(&self, device_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.device_id = ?1 AND e.state IN ('queued','delivered') ORDER BY e.id"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([device_id], |r| mapped(r, execution_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn still_open(&self, ids: &[i64]) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut out = Vec::new();
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let sql = format!(
                    "SELECT id FROM executions WHERE state IN ('queued','delivered') AND id IN ({})",
                    in_list(chunk.len())
                );
                let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(chunk.iter()), |r| r.get(0)).map_err(backend)?;
                for row in rows {
                    out.push(row.map_err(backend)?);
                }
            }
            Ok(out)
        })
    }

    fn open_execution_device_ids(&self, org_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT device_id FROM executions WHERE org_id = ?1 AND state IN ('queued','delivered')",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn execution(&self, id: i64) -> StoreResult<ExecutionRow> {
        self.read(|c| {
            cached_row(c, &format!("SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.id = ?1"), [id], |r| {
                mapped(r, execution_row)
            })
            .map_err(or_not_found(format!("execution {id}")))
        })
    }

    fn stop_task(&self, org_id: i64, task_id: i64, at: Millis, audit: &Audit) -> StoreResult<Vec<i64>> {
        self.write(|tx| {
            let owned: Option<i64> = tx
                .query_row("SELECT id FROM tasks WHERE org_id = ?1 AND id = ?2", params![org_id, task_id], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if owned.is_none() {
                return Err(StoreError::NotFound(format!("task {task_id}")));
            }
            let ids: Vec<i64> = {
                let mut stmt = tx
                    .prepare("SELECT id FROM executions WHERE task_id = ?1 AND state IN ('queued','delivered')")
                    .map_err(backend)?;
                let rows = stmt.query_map([task_id], |r| r.get(0)).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            end_without_ack(tx, &ids, ExecutionState::Terminated, at)?;
            tx.execute("UPDATE tasks SET stopped_at = COALESCE(stopped_at, ?2) WHERE id = ?1", params![task_id, at])
                .map_err(backend)?;
            audit_in(tx, &audit.entry(None, None, &[("terminated", ids.len().into())]))?;
            crate::store::sqlite_channel::on_answered(tx, audit, ids.len())?;
            Ok(ids)
        })
    }

    fn list_records(&self, org_id: i64, f: &RecordFilter) -> StoreResult<Vec<RecordRow>> {
        self.read(|c| {
            let sql = format!(
                "SELECT {RECORD_COLUMNS} FROM records WHERE org_id = ?1 AND (?2 IS NULL OR sn = ?2) AND (?3 IS NULL OR task_id = ?3)
                 AND (?6 IS NULL OR id < ?6)
                 ORDER BY id DESC LIMIT ?4 OFFSET ?5"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let limit = if f.limit <= 0 { i64::MAX } else { f.limit };
            let rows = stmt.query_map(params![org_id, f.sn, f.task_id, limit, f.offset, f.before_id], |r| mapped(r, record_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn billing(&self, org_id: i64) -> StoreResult<Vec<BillingRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT key_source, strftime('%Y-%m', at / 1000, 'unixepoch') AS month, COUNT(*) FROM records
                     WHERE org_id = ?1 AND result = 'succeeded' GROUP BY key_source, month ORDER BY month, key_source",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| mapped(r, billing_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn count_records_for_execution(&self, execution_id: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM records WHERE execution_id = ?1", [execution_id], |r| r.get(0))
                .map_err(backend)
        })
    }

    fn execution_state_counts(&self) -> StoreResult<Vec<(i64, ExecutionState, i64)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT org_id, state, COUNT(*) FROM executions GROUP BY org_id, state")
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| mapped(r, state_count_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn expiring_within(&self, now: Millis, within_ms: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM executions WHERE state IN ('queued','delivered') AND deadline <= ?1",
                [now + within_ms],
                |r| r.get(0),
            )
            .map_err(backend)
        })
    }
}
