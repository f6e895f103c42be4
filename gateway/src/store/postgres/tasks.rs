//! PostgreSQL: tasks, their executions (streamed in by a [`TaskSink`]), records and counts.

use super::*;

/// [`TaskSink`] inside `create_task_with`'s transaction. A database failure is kept in
/// `failure` (the trait speaks `StoreError`), so the transaction can still tell a transient one.
struct PostgresTaskSink<'a, 's, 't> {
    s: &'a mut Tx<'s, 't>,
    task: &'a NewTask,
    task_id: i64,
    inserted: usize,
    failure: Option<Failure>,
}

impl PostgresTaskSink<'_, '_, '_> {
    fn keep<T>(&mut self, result: Result<T, Failure>) -> StoreResult<T> {
        result.map_err(|failure| {
            let error = match &failure {
                Failure::Store(StoreError::NotFound(m)) => StoreError::NotFound(m.clone()),
                Failure::Store(StoreError::Conflict(m)) => StoreError::Conflict(m.clone()),
                Failure::Store(StoreError::Invalid(m)) => StoreError::Invalid(m.clone()),
                Failure::Store(StoreError::Full(m)) => StoreError::Full(m.clone()),
                Failure::Store(StoreError::Unavailable(m)) | Failure::Transient { reason: m, .. } => {
                    StoreError::Unavailable(m.clone())
                }
                Failure::Store(StoreError::Backend(m)) => StoreError::Backend(m.clone()),
            };
            self.failure = Some(failure);
            error
        })
    }
}

impl TaskSink for PostgresTaskSink<'_, '_, '_> {
    fn derive_targets(&mut self, device_ids: &[i64], aes: bool) -> StoreResult<Vec<DeriveTarget>> {
        let sql = if aes {
            "SELECT d.id, d.sn, d.generation, c.kbpk_aes FROM devices d JOIN device_credentials c ON c.device_id = d.id
             WHERE d.id = ANY ($1)"
        } else {
            "SELECT d.id, d.sn, d.generation, c.kbpk_tdes FROM devices d JOIN device_credentials c ON c.device_id = d.id
             WHERE d.id = ANY ($1)"
        };
        let found = self.s.query(sql, &[&device_ids]);
        let found = self.keep(found)?;
        let targets = rows(found, derive_target_row);
        self.keep(targets)
    }

    fn insert(&mut self, executions: &[NewExecution]) -> StoreResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(executions.len());
        for chunk in executions.chunks(EXECUTIONS_PER_STATEMENT) {
            let devices: Vec<i64> = chunk.iter().map(|e| e.device_id).collect();
            let blocks: Vec<&str> = chunk.iter().map(|e| e.key_block.as_str()).collect();
            let key_ids: Vec<&[u8]> = chunk.iter().map(|e| e.key_id.as_slice()).collect();
            let kcvs: Vec<&str> = chunk.iter().map(|e| e.kcv.as_str()).collect();
            let generations: Vec<i64> = chunk.iter().map(|e| e.generation).collect();
            // RETURNING promises no order: each id comes back with its device (one execution per
            // device and task).
            let found = self.s.query(
                "INSERT INTO executions (task_id, org_id, device_id, state, key_block, key_id, kcv, generation,
                                         created_at, deadline)
                 SELECT $1, $2, i.device_id, $3, i.key_block, i.key_id, i.kcv, i.generation, $4, $5
                 FROM unnest($6::bigint[], $7::text[], $8::bytea[], $9::text[], $10::bigint[])
                      WITH ORDINALITY AS i(device_id, key_block, key_id, kcv, generation, ord)
                 ORDER BY i.ord
                 RETURNING id, device_id",
                &[
                    &self.task_id,
                    &self.task.org_id,
                    &ExecutionState::Queued.as_str(),
                    &self.task.created_at,
                    &self.task.expires_at,
                    &devices,
                    &blocks,
                    &key_ids,
                    &kcvs,
                    &generations,
                ],
            );
            let found = self.keep(found)?;
            let returned: Vec<(i64, i64)> = self.keep(rows(found, pair_row))?;
            let by_device: HashMap<i64, i64> = returned.into_iter().map(|(id, device)| (device, id)).collect();
            for e in chunk {
                match by_device.get(&e.device_id) {
                    Some(id) => ids.push(*id),
                    None => {
                        return self.keep(Err(corrupt(format!("no execution id returned for device {}", e.device_id))))
                    }
                }
            }
        }
        self.inserted += executions.len();
        Ok(ids)
    }
}

impl Tasks for PostgresStore {
    fn create_task_with(
        &self,
        task: &NewTask,
        audit: &Audit,
        fill: &mut dyn FnMut(&mut dyn TaskSink) -> StoreResult<()>,
    ) -> StoreResult<TaskRow> {
        let (task_id, inserted) = self.write(|s| {
            // The organization's row, locked, orders the nodes numbering its tasks at once.
            s.execute("SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE", &[&task.org_id])?;
            let task_id: i64 = s
                .query_one(
                    "INSERT INTO tasks (org_id, key_source_id, slot, key_type, created_at, expires_at, created_by, request_id, number)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                             (SELECT COALESCE(MAX(number), 0) + 1 FROM tasks WHERE org_id = $1)) RETURNING id",
                    &[
                        &task.org_id,
                        &task.key_source_id,
                        &i32::from(task.slot),
                        &task.key_type,
                        &task.created_at,
                        &task.expires_at,
                        &task.created_by,
                        &task.request_id,
                    ],
                )?
                .try_get(0)?;
            // Every node's sweep is woken when, and only if, this transaction commits (PostgreSQL
            // holds the notification until then).
            listen::notify_due(s, task_id)?;
            let mut sink = PostgresTaskSink { s, task, task_id, inserted: 0, failure: None };
            // A failure inside the sink is kept whole, so a transient one retries the transaction.
            let filled = sink.insert(&task.executions).map(|_| ()).and_then(|()| fill(&mut sink));
            let PostgresTaskSink { s, inserted, failure, .. } = sink;
            match (filled, failure) {
                (Ok(()), _) => {
                    let number: i64 = s.query_one("SELECT number FROM tasks WHERE id = $1", &[&task_id])?.try_get(0)?;
                    let facts = [("executions", serde_json::Value::from(inserted))];
                    audit_in(s, &audit.entry(Some(format!("task:{number}")), None, &facts))?;
                    crate::store::postgres_channel::on_task_created(s, task, number, inserted)?;
                    Ok((task_id, inserted))
                }
                (Err(_), Some(failure)) => Err(failure),
                (Err(e), None) => Err(Failure::Store(e)),
            }
        })?;
        committed_task(self.task(task.org_id, task_id)?, inserted)
    }

    fn task_by_request_id(&self, org_id: i64, request_id: i64) -> StoreResult<Option<TaskRow>> {
        self.read(|s| {
            s.query_opt(concat!(task_select!(), " WHERE t.org_id = $1 AND t.request_id = $2"), &[&org_id, &request_id])?
                .map(|r| task_with_counts(&r).map_err(Failure::from))
                .transpose()
        })
    }

    fn list_tasks(
        &self,
        org_id: i64,
        unfinished: Option<bool>,
        limit: i64,
        before: Option<i64>,
    ) -> StoreResult<Vec<TaskRow>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    task_select!(),
                    " WHERE t.org_id = $1 AND ($2::boolean IS NULL OR
                        EXISTS (SELECT 1 FROM executions e WHERE e.task_id = t.id AND e.state IN ('queued', 'delivered')) = $2)
                      AND ($4::bigint IS NULL OR t.number < $4)
                      ORDER BY t.number DESC LIMIT $3"
                ),
                &[&org_id, &unfinished, &limit_or_all(limit), &before],
            )?;
            rows(found, task_with_counts)
        })
    }

    fn task_id_by_number(&self, org_id: i64, number: i64) -> StoreResult<i64> {
        self.read(|s| {
            s.query_opt("SELECT id FROM tasks WHERE org_id = $1 AND number = $2", &[&org_id, &number])?
                .map(|r| r.try_get(0).map_err(Failure::from))
                .unwrap_or_else(|| Err(not_found(format!("task {number}"))))
        })
    }

    fn task(&self, org_id: i64, id: i64) -> StoreResult<TaskRow> {
        self.read(|s| {
            s.query_opt(concat!(task_select!(), " WHERE t.org_id = $1 AND t.id = $2"), &[&org_id, &id])?
                .map(|r| task_with_counts(&r).map_err(Failure::from))
                .unwrap_or_else(|| Err(not_found(format!("task {id}"))))
        })
    }

    fn task_executions_page(&self, task_id: i64, offset: i64, limit: Option<i64>) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            // PostgreSQL: LIMIT NULL is no limit.
            let found = s.query(
                concat!(execution_select!(), " WHERE e.task_id = $1 ORDER BY e.id LIMIT $2 OFFSET $3"),
                &[&task_id, &limit, &offset.max(0)],
            )?;
            rows(found, execution_row)
        })
    }

    fn open_executions(&self) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            let found =
                s.query(concat!(execution_select!(), " WHERE e.state IN ('queued', 'delivered') ORDER BY e.id"), &[])?;
            rows(found, execution_row)
        })
    }

    fn open_executions_for_device(&self, device_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    execution_select!(),
                    " WHERE e.device_id = $1 AND e.state IN ('queued', 'delivered') ORDER BY e.id"
                ),
                &[&device_id],
            )?;
            rows(found, execution_row)
        })
    }

    fn still_open(&self, ids: &[i64]) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found = s.query(
                "SELECT id FROM executions WHERE state IN ('queued', 'delivered') AND id = ANY ($1) ORDER BY id",
                &[&ids],
            )?;
            rows(found, first)
        })
    }

    fn open_execution_device_ids(&self, org_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found = s.query(
                "SELECT DISTINCT device_id FROM executions WHERE org_id = $1 AND state IN ('queued', 'delivered')",
                &[&org_id],
            )?;
            rows(found, first)
        })
    }

    fn execution(&self, id: i64) -> StoreResult<ExecutionRow> {
        self.read(|s| {
            s.query_opt(concat!(execution_select!(), " WHERE e.id = $1"), &[&id])?
                .map(|r| execution_row(&r).map_err(Failure::from))
                .unwrap_or_else(|| Err(not_found(format!("execution {id}"))))
        })
    }

    fn stop_task(&self, org_id: i64, task_id: i64, at: Millis, audit: &Audit) -> StoreResult<Vec<i64>> {
        let terminated = ExecutionState::Terminated;
        let from = states_that_can_become(terminated);
        self.write(|s| {
            // The task row's lock orders two stops of one task, on any node.
            if s.query_opt("SELECT id FROM tasks WHERE org_id = $1 AND id = $2 FOR UPDATE", &[&org_id, &task_id])?
                .is_none()
            {
                return Err(not_found(format!("task {task_id}")));
            }
            let ended = s.query(STOP_TASK, &[&task_id, &at, &terminated.as_str(), &from])?;
            let ids = rows(ended, first)?;
            crate::store::postgres_channel::on_executions_ended(s, &ids)?;
            s.execute("UPDATE tasks SET stopped_at = COALESCE(stopped_at, $2) WHERE id = $1", &[&task_id, &at])?;
            audit_in(s, &audit.entry(None, None, &[("terminated", ids.len().into())]))?;
            crate::store::postgres_channel::on_answered(s, audit, ids.len())?;
            Ok(ids)
        })
    }

    fn list_records(&self, org_id: i64, f: &RecordFilter) -> StoreResult<Vec<RecordRow>> {
        let limit = (f.limit > 0).then_some(f.limit);
        let offset = f.offset.max(0);
        self.read(|s| {
            let found = s.query(
                concat!(
                    "SELECT ",
                    record_columns!(),
                    " FROM records WHERE org_id = $1 AND ($2::text IS NULL OR sn = $2) AND ($3::bigint IS NULL OR task_id = $3)
                 AND ($6::bigint IS NULL OR id < $6)
                 ORDER BY id DESC LIMIT $4 OFFSET $5"
                ),
                &[&org_id, &f.sn, &f.task_id, &limit, &offset, &f.before_id],
            )?;
            rows(found, record_row)
        })
    }

    fn billing(&self, org_id: i64) -> StoreResult<Vec<BillingRow>> {
        self.read(|s| {
            let found = s.query(
                "SELECT key_source, to_char(to_timestamp(at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM') AS month, count(*)
                 FROM records WHERE org_id = $1 AND result = 'succeeded'
                 GROUP BY key_source, month ORDER BY month, key_source COLLATE \"C\"",
                &[&org_id],
            )?;
            rows(found, billing_row)
        })
    }

    fn count_records_for_execution(&self, execution_id: i64) -> StoreResult<i64> {
        self.read(|s| {
            Ok(s.query_one("SELECT count(*) FROM records WHERE execution_id = $1", &[&execution_id])?.try_get(0)?)
        })
    }

    fn execution_state_counts(&self) -> StoreResult<Vec<(i64, ExecutionState, i64)>> {
        self.read(|s| {
            let found = s.query("SELECT org_id, state, count(*) FROM executions GROUP BY org_id, state", &[])?;
            rows(found, state_count_row)
        })
    }

    fn expiring_within(&self, now: Millis, within_ms: i64) -> StoreResult<i64> {
        self.read(|s| {
            Ok(s.query_one(
                "SELECT count(*) FROM executions WHERE state IN ('queued', 'delivered') AND deadline <= $1",
                &[&(now + within_ms)],
            )?
            .try_get(0)?)
        })
    }
}
