//! SQLite: the message path's batches, re-wraps, expiry and marks.

use super::*;

impl Delivery for SqliteStore {
    fn rewrap_execution(&self, id: i64, key_block: &str, generation: i64) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE executions SET key_block = ?2, generation = ?3 WHERE id = ?1 AND state IN ('queued','delivered')",
                params![id, key_block, generation],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<(i64, i64)>> {
        self.write(|tx| {
            let due: Vec<(i64, i64)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, org_id FROM executions WHERE state IN ('queued','delivered') AND deadline <= ?1",
                    )
                    .map_err(backend)?;
                let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            let ids: Vec<i64> = due.iter().map(|(id, _)| *id).collect();
            end_without_ack(tx, &ids, ExecutionState::Expired, now)?;
            Ok(due)
        })
    }

    fn apply_batch(&self, writes: &[Write]) -> StoreResult<BatchOutcome> {
        self.write(|tx| {
            let mut outcome = BatchOutcome::default();
            // The message path's statements, each prepared once for the batch (see `Ender`).
            let mut ender: Option<Ender<'_>> = None;
            let (mut counter, mut seen, mut delivered) = (None, None, None);
            for w in writes {
                match w {
                    Write::Report(r) => {
                        tx.prepare_cached(
                            "UPDATE devices SET model = ?2, rom_version = ?3, app_version = ?4, region = ?5, debug_mode = ?6,
                                    debug_key_present = ?7, locked = ?8, slots = ?9, last_seen = ?10,
                                    unlock_pending = CASE WHEN ?8 THEN unlock_pending ELSE 0 END WHERE id = ?1",
                        )
                        .map_err(backend)?
                        .execute(params![
                            r.device_id,
                            r.model,
                            r.rom_version,
                            r.app_version,
                            r.region,
                            r.debug_mode,
                            r.debug_key_present,
                            r.locked,
                            r.slots_json,
                            r.at
                        ])
                        .map_err(backend)?;
                    }
                    Write::Counter { device_id, counter: value } => {
                        prepared(&mut counter, tx, "UPDATE devices SET last_counter = MAX(last_counter, ?2) WHERE id = ?1")?
                            .execute(params![device_id, *value as i64])
                            .map_err(backend)?;
                    }
                    Write::Seen { device_id, at } => {
                        prepared(&mut seen, tx, "UPDATE devices SET last_seen = ?2 WHERE id = ?1")?
                            .execute(params![device_id, at])
                            .map_err(backend)?;
                    }
                    Write::Delivered { execution_id, at } => {
                        prepared(
                            &mut delivered,
                            tx,
                            "UPDATE executions SET state = 'delivered', delivered_at = COALESCE(delivered_at, ?2),
                                    delivery_count = delivery_count + 1
                             WHERE id = ?1 AND state IN ('queued','delivered')",
                        )?
                        .execute(params![execution_id, at])
                        .map_err(backend)?;
                    }
                    Write::End(ending) => {
                        if lazily(&mut ender, || Ender::new(tx))?.end(ending)? {
                            outcome.ended.push((ending.execution_id, ending.state));
                        }
                    }
                    Write::Initialise { gudid_row, device_id, creds, at } => {
                        let installed = spend_gudid_in(tx, *gudid_row, *device_id, creds, *at)?;
                        outcome.initialised.push((*gudid_row, installed));
                    }
                    Write::ProveGudid { device_id, generation, at } => {
                        tx.prepare_cached(
                            "UPDATE gudids SET proven_at = ?2
                             WHERE device_id = ?1 AND used_at IS NOT NULL AND proven_at IS NULL
                               AND (SELECT generation FROM devices WHERE id = ?1) = ?3",
                        )
                        .map_err(backend)?
                        .execute(params![device_id, at, generation])
                        .map_err(backend)?;
                    }
                }
            }
            drop((ender, counter, seen, delivered));
            let ended: Vec<i64> = outcome.ended.iter().map(|(id, _)| *id).collect();
            crate::store::sqlite_channel::on_executions_ended(tx, &ended)?;
            Ok(outcome)
        })
    }

    fn mark(&self, key: &str) -> StoreResult<Option<i64>> {
        Ok(parse_mark(self.meta(key)?))
    }

    fn raise_mark(&self, key: &str, value: i64) -> StoreResult<i64> {
        self.write(|tx| {
            let current: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            let current = parse_mark(current);
            let raised = current.map_or(value, |c| c.max(value));
            if current != Some(raised) {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                    params![key, raised.to_string()],
                )
                .map_err(backend)?;
            }
            Ok(raised)
        })
    }
}

/// The statement in `slot`, prepared on first use.
fn prepared<'s, 't>(
    slot: &'s mut Option<rusqlite::CachedStatement<'t>>,
    tx: &'t Transaction<'_>,
    sql: &str,
) -> StoreResult<&'s mut rusqlite::CachedStatement<'t>> {
    lazily(slot, || tx.prepare_cached(sql).map_err(backend))
}

/// What `slot` holds, made by `make` on first use.
fn lazily<T>(slot: &mut Option<T>, make: impl FnOnce() -> StoreResult<T>) -> StoreResult<&mut T> {
    Ok(match slot {
        Some(made) => made,
        None => slot.insert(make()?),
    })
}
