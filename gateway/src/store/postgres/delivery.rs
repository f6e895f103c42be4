//! PostgreSQL: the message path's batches, re-delivery claims, re-wraps, expiry and marks.

use super::*;

impl Delivery for PostgresStore {
    fn claim_redeliveries(
        &self,
        now: Millis,
        first_ms: i64,
        initial_ms: i64,
        max_ms: i64,
        limit: i64,
        after: i64,
    ) -> StoreResult<Vec<ExecutionRow>> {
        self.write(|s| {
            let found = s.query(CLAIM_REDELIVERIES, &[&now, &first_ms, &initial_ms, &max_ms, &limit, &after])?;
            rows(found, execution_row)
        })
    }

    fn watch_due(&self, watch: DueWatch) -> StoreResult<()> {
        listen::spawn_due_listener(&self.pool.config, self.pool.tls.clone(), watch)
    }

    fn rewrap_execution(&self, id: i64, key_block: &str, generation: i64) -> StoreResult<()> {
        self.write(|s| {
            s.execute(
                "UPDATE executions SET key_block = $2, generation = $3 WHERE id = $1 AND state IN ('queued', 'delivered')",
                &[&id, &key_block, &generation],
            )?;
            Ok(())
        })
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<(i64, i64)>> {
        let expired = ExecutionState::Expired;
        let from = states_that_can_become(expired);
        self.write(|s| {
            let ended = s.query(EXPIRE_DUE, &[&now, &expired.as_str(), &from])?;
            let due: Vec<(i64, i64)> = rows(ended, pair_row)?;
            let ids: Vec<i64> = due.iter().map(|(id, _)| *id).collect();
            crate::store::postgres_channel::on_executions_ended(s, &ids)?;
            Ok(due)
        })
    }

    fn apply_batch(&self, writes: &[Write]) -> StoreResult<BatchOutcome> {
        // An ending to an open state would leave the execution open with a record, and a second
        // ending would then break `UNIQUE (execution_id)`. The engine never writes one; the
        // rounds' "first ending wins" relies on it. (SQLite's store accepts it.)
        for w in writes {
            if let Write::End(e) = w {
                if e.state.is_open() {
                    return Err(StoreError::Invalid(format!(
                        "execution {}: an ending must be a final state, not {}",
                        e.execution_id, e.state
                    )));
                }
            }
        }
        let lock_endings: Vec<i64> = writes
            .iter()
            .filter_map(|w| match w {
                Write::End(e) if e.lock_device => Some(e.execution_id),
                _ => None,
            })
            .collect();
        let has_reports = writes.iter().any(|w| matches!(w, Write::Report(_)));
        self.write(|s| {
            // A device-locking ending and a report on the same device must keep their order;
            // the ending names only its execution, so look the devices up (executions never
            // change device). Not needed when there is nothing to order them against.
            let mut device_of = HashMap::new();
            if has_reports && !lock_endings.is_empty() {
                for r in s.query("SELECT id, device_id FROM executions WHERE id = ANY ($1)", &[&lock_endings])? {
                    device_of.insert(r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?);
                }
            }
            let mut ended = Vec::new();
            let mut initialised = Vec::new();
            for round in plan_rounds(writes, &device_of) {
                apply_round(s, &round, &mut ended, &mut initialised)?;
            }
            ended.sort_by_key(|(index, _, _)| *index);
            let ids: Vec<i64> = ended.iter().map(|(_, id, _)| *id).collect();
            crate::store::postgres_channel::on_executions_ended(s, &ids)?;
            initialised.sort_by_key(|(index, _, _)| *index);
            Ok(BatchOutcome {
                ended: ended.into_iter().map(|(_, id, state)| (id, state)).collect(),
                initialised: initialised.into_iter().map(|(_, gudid, creds)| (gudid, creds)).collect(),
            })
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn mark(&self, key: &str) -> StoreResult<Option<i64>> {
        Ok(parse_mark(self.meta(key)?))
    }

    fn raise_mark(&self, key: &str, value: i64) -> StoreResult<i64> {
        // One statement: nodes raising the mark at once keep the highest (a row lock orders them).
        let text = value.to_string();
        let raised: String = self.write(|s| {
            Ok(s.query_one(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
                 SET value = GREATEST(meta.value::bigint, EXCLUDED.value::bigint)::text RETURNING value",
                &[&key, &text],
            )?
            .try_get(0)?)
        })?;
        parse_mark(Some(raised)).ok_or_else(|| StoreError::Backend(format!("meta {key}: not a number")))
    }
}
