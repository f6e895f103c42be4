//! Several gateway nodes on one store: which node delivers what.
//!
//! One node ([`Coordination::Single`]) keeps its open executions in memory and retries them on
//! its own timers. Several nodes sharing a PostgreSQL store ([`Coordination::Shared`]) re-read the
//! open executions on every hello and claim re-deliveries in the store, so that each retry fires
//! once across the cluster and a dead node's executions are taken over.

use super::*;

/// Whether other gateway nodes share the engine's store. Chosen when the engine is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Coordination {
    /// The only node on its store (SQLite, or PostgreSQL with one node).
    #[default]
    Single,
    /// Other nodes share the store (an external broker and PostgreSQL): the open executions are
    /// re-read from it on every hello and re-checked before a retry, since another node may have
    /// created, ended or stopped them.
    Shared,
}

/// What one sweep of a node sharing the store claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// The sweeper's tick: what is due, but not the never-sent executions of a task created less
    /// than [`TICK_CLAIMS_NEW_AFTER_MS`] ago (the woken nodes' shares).
    Tick,
    /// Woken by new tasks: what is due, new executions included, up to this node's shares of
    /// them.
    Share(i64),
    /// Woken to claim whatever is due, new executions included (the listener came up, or a task
    /// was created here while it was down).
    All,
}

impl Engine {
    pub(super) fn is_shared(&self) -> bool {
        self.coordination == Coordination::Shared
    }

    /// Several nodes: the store wakes this node's sweep whenever a task is created, on any node
    /// ([`Store::watch_due`]), with the task's size and the number of nodes listening, so that
    /// every node claims its share of the new executions at once (the work of publishing them is
    /// spread, and the claims, made before the first acks come back, do not queue behind their
    /// commits), instead of the creating node publishing them all before the others' next tick.
    /// Until the engine is dropped.
    pub(super) fn watch_due(self: &Arc<Self>) -> EngineResult<()> {
        let me = Arc::downgrade(self);
        metrics::gauge!(m::STORE_LISTENER_UP).set(0.0);
        self.store.watch_due(Box::new(move |signal| {
            let Some(engine) = me.upgrade() else { return false };
            match signal {
                DueSignal::Listening => {
                    engine.due_listening.store(true, Ordering::Relaxed);
                    metrics::gauge!(m::STORE_LISTENER_UP).set(1.0);
                    // A task created while this node was not listening: claim what is due.
                    engine.wake_to_claim_all();
                }
                DueSignal::Due { executions, nodes } => engine.wake_for_share(executions, nodes),
                DueSignal::Quiet => {}
                DueSignal::Lost => {
                    engine.due_listening.store(false, Ordering::Relaxed);
                    metrics::gauge!(m::STORE_LISTENER_UP).set(0.0);
                }
            }
            true
        }))?;
        Ok(())
    }

    /// A task of `executions` open executions was created, and `nodes` nodes heard of it: this
    /// node claims its share, `executions / nodes` rounded up, at once. If the store could not
    /// say, it claims whatever is due.
    fn wake_for_share(&self, executions: i64, nodes: i64) {
        if executions < 0 || nodes <= 0 {
            return self.wake_to_claim_all();
        }
        let share = (executions + nodes - 1) / nodes;
        if share > 0 {
            self.due_share.fetch_add(share, Ordering::Relaxed);
            self.sweep_now.notify_one();
        }
    }

    /// Wakes the sweep to claim whatever is due, new executions included, with no share.
    pub(super) fn wake_to_claim_all(&self) {
        self.due_claim_all.store(true, Ordering::Relaxed);
        self.sweep_now.notify_one();
    }

    /// What a wake-up of the sweeper is to claim: the shares gathered since the last one (a
    /// wake-up whose share an earlier sweep took claims nothing more).
    pub(super) fn take_wake(&self) -> Sweep {
        let share = self.due_share.swap(0, Ordering::Relaxed);
        if self.due_claim_all.swap(false, Ordering::Relaxed) {
            Sweep::All
        } else {
            Sweep::Share(share)
        }
    }

    /// Several nodes: delivers the executions this node claims in the store (see
    /// [`Store::claim_redeliveries`]): new ones at once, unacked ones after their backoff, whoever
    /// delivered them before. Each claim is this node's alone, so every retry fires once across
    /// the cluster, and the executions of a node that died (its acks lost with it) are taken
    /// over by the others. Claims up to [`CLAIM_BATCH_MAX`] at a time, each after the last one's
    /// highest id, until a claim comes back short or, woken by a new task, this node has its
    /// share. Returns how many downloads went out.
    pub async fn cluster_sweep(&self, sweep: Sweep) -> usize {
        let (first_ms, mut left) = match sweep {
            Sweep::Tick => (TICK_CLAIMS_NEW_AFTER_MS, i64::MAX),
            Sweep::Share(share) => (0, share),
            Sweep::All => (0, i64::MAX),
        };
        let mut sent = 0;
        let mut after = 0;
        while left > 0 {
            let now = self.clock.now_ms();
            let initial = self.retry_initial_ms();
            let limit = left.min(CLAIM_BATCH_MAX);
            let claimed = match self
                .blocking(move |s| s.claim_redeliveries(now, first_ms, initial, RETRY_MAX_MS, limit, after))
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "re-delivery claim failed");
                    return sent;
                }
            };
            let got = claimed.len() as i64;
            // The rows come in id order; the next claim starts after the last.
            after = claimed.iter().map(|r| r.id).max().unwrap_or(after);
            sent += self.deliver_claimed(now, claimed).await;
            if got < limit {
                break;
            }
            left -= got;
        }
        sent
    }

    pub(super) async fn deliver_claimed(&self, now: Millis, claimed: Vec<ExecutionRow>) -> usize {
        if claimed.is_empty() {
            return 0;
        }
        // Devices not in the maps yet: their credentials in one read.
        let mut missing: Vec<i64> =
            claimed.iter().filter(|r| !self.devices.contains_key(&r.sn)).map(|r| r.device_id).collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            match self.blocking(move |s| s.credentials_for(&missing)).await {
                Ok(creds) => {
                    for c in &creds {
                        self.devices
                            .entry(c.sn.clone())
                            .or_insert_with(|| Arc::new(Mutex::new(DeviceHot::from_credentials(c))));
                    }
                }
                Err(e) => warn!(error = %e, "re-delivery: cannot read credentials"),
            }
        }
        // An execution made for a newer initialisation than this node cached: another node
        // initialised the device since; read its credentials again.
        let mut stale: Vec<&ExecutionRow> = claimed
            .iter()
            .filter(|r| self.devices.get(&r.sn).is_some_and(|h| lock(&h).generation < r.generation))
            .collect();
        stale.dedup_by_key(|r| r.device_id);
        for row in stale {
            if let Some(hot) = self.devices.get(&row.sn).map(|h| h.clone()) {
                self.refresh_credentials(&row.sn, &hot).await;
            }
        }
        let mut delivered = Vec::with_capacity(claimed.len());
        for row in &claimed {
            let Some(hot) = self.devices.get(&row.sn).map(|h| h.clone()) else {
                warn!(execution = row.id, sn = row.sn, "claimed execution not delivered: no credentials");
                continue;
            };
            self.insert_open(row);
            let mut h = lock(&hot);
            let Some(key) = self.signing_key(&mut h) else { continue };
            if row.generation != h.generation {
                // Made for an older initialisation: the device's next hello re-wraps it.
                warn!(
                    execution = row.id,
                    sn = row.sn,
                    "claimed execution not delivered: wrapped for an older initialisation"
                );
                continue;
            }
            // A hello's refresh may have replaced the cached list since `insert_open`.
            if !h.open.iter().any(|e| e.id == row.id) {
                self.execution_sn.insert(row.id, row.sn.clone());
                h.open.push(OpenExecution::from_row(row));
            }
            if let Some(e) = h.open.iter_mut().find(|e| e.id == row.id) {
                if self.publish_download(&row.sn, &key, e, None) {
                    delivered.push((row.id, row.deadline));
                }
            }
        }
        let n = delivered.len();
        for (id, deadline) in delivered {
            metrics::counter!(m::DELIVERIES_TOTAL).increment(1);
            self.defer_delivered(id, now, deadline);
        }
        n
    }
}
