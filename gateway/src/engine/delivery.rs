//! Downloads and unlocks out: sealing under the device's key, re-delivery on the backoff that
//! [`super::session::retry_backoff_ms`] gives, re-wrapping after a re-initialisation, the expiry
//! sweep, and the sweeper task that drives them.

use super::*;

/// Runs the retry and expiry sweeps.
pub(super) async fn sweeper(engine: Arc<Engine>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    let mut ticks: u64 = 0;
    let mut expired_at: u64 = 0;
    loop {
        let woken = tokio::select! {
            _ = ticker.tick() => {
                ticks += 1;
                false
            }
            // No expiry on these wake-ups: it keeps its every-5-ticks pace.
            _ = engine.sweep_now.notified() => true,
        };
        engine.restore_unrecorded_endings().await;
        engine.persist_clock_floor().await;
        if engine.is_shared() {
            let sweep = if woken { engine.take_wake() } else { Sweep::Tick };
            engine.cluster_sweep(sweep).await;
        } else {
            engine.retry_sweep().await;
        }
        if ticks % 5 == 0 && ticks != expired_at {
            expired_at = ticks;
            if let Err(e) = engine.expire_now().await {
                warn!(error = %e, "expiry sweep failed");
            }
        }
    }
}

impl Engine {
    /// Publishes every open execution of the device that is due: all of them on a hello, the
    /// ones whose backoff elapsed on a retry sweep.
    pub(super) async fn deliver_open(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        key: &MacKey,
        hello_at: Option<Instant>,
        reason: SendReason,
    ) {
        let now = self.clock.now_ms();
        let ticks = self.clock.ticks_ms();
        let mut delivered = Vec::new();
        {
            let mut h = lock(hot);
            let generation = h.generation;
            for e in h.open.iter_mut() {
                if !session::deliverable(e, now, generation, reason, ticks, self.retry_initial_ms()) {
                    continue;
                }
                if self.publish_download(sn, key, e, hello_at) {
                    delivered.push((e.id, e.deadline));
                }
            }
        }
        for (id, deadline) in delivered {
            metrics::counter!(m::DELIVERIES_TOTAL).increment(1);
            self.defer_delivered(id, now, deadline);
        }
    }

    /// Seals and publishes one download; whether it went out.
    pub(super) fn publish_download(
        &self,
        sn: &str,
        key: &MacKey,
        e: &mut OpenExecution,
        hello_at: Option<Instant>,
    ) -> bool {
        // The store checks the key type on read; a value it let through is still refused here.
        let Some(key_type) = KeyType::parse(&e.key_type) else {
            error!(execution = e.id, key_type = %e.key_type, "cannot deliver: unknown key type");
            return false;
        };
        let Some(counter) = self.next_down_counter() else { return false };
        let body = Body {
            party: sn.to_string(),
            counter,
            message: Message::Download(message::Download {
                execution_id: e.id as u64,
                slot: KeySlot(e.slot),
                key_type,
                key_block: e.key_block.clone(),
                key_id: e.key_id.clone(),
                kcv: hex::decode(&e.kcv).unwrap_or_default(),
            }),
        };
        match frame::seal(key, &body) {
            Ok(bytes) => {
                self.outbound.publish_download(topic::device_down(sn), bytes, e.id);
                e.last_sent = Some(self.clock.ticks_ms());
                e.sends = e.sends.saturating_add(1);
                if hello_at.is_some() {
                    e.hello_at = hello_at;
                }
                true
            }
            Err(err) => {
                error!(execution = e.id, error = %err, "cannot seal a download");
                false
            }
        }
    }

    /// Re-wraps executions whose key block was made for an older initialisation of the device.
    pub(super) async fn rewrap(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>, stale: Vec<OpenExecution>) {
        let generation = lock(hot).generation;
        let owned = sn.to_string();
        let (kbpk_aes, kbpk_tdes) = match self.blocking(move |s| s.credentials(&owned)).await {
            Ok(Some(creds)) if creds.generation == generation => (creds.kbpk_aes, creds.kbpk_tdes),
            // Re-initialised meanwhile: the next hello re-wraps for the newer credentials.
            Ok(_) => return warn!(sn, generation, "re-wrap: the device's credentials changed; not re-wrapped"),
            Err(err) => return error!(sn, error = %err, "re-wrap: the device's credentials are unreadable"),
        };
        for e in stale {
            let (org, ks) = (e.org_id, e.key_source_id);
            let source = match self.blocking(move |s| s.key_source(org, ks)).await {
                Ok(s) => s,
                Err(err) => {
                    error!(execution = e.id, error = %err, "re-wrap: key source missing");
                    continue;
                }
            };
            let Some(algorithm) = KeyAlgorithm::parse(&source.algorithm) else {
                error!(execution = e.id, algorithm = %source.algorithm, "re-wrap: unknown key algorithm");
                continue;
            };
            let kbpk = if algorithm.is_aes() { kbpk_aes.clone() } else { kbpk_tdes.clone() };
            let keys = self.keys.clone();
            let key_id = e.key_id.clone();
            let sealed_bdk = source.sealed.clone();
            let wrapped = tokio::task::spawn_blocking(move || {
                keys.derive_and_wrap(&sealed_bdk, &[DeriveRequest { key_id: &key_id, sealed_kbpk: &kbpk }])
            })
            .await;
            let Ok(Ok(mut results)) = wrapped else {
                error!(execution = e.id, "re-wrap failed");
                continue;
            };
            let Some(Ok(w)) = results.pop() else {
                error!(execution = e.id, "re-wrap failed");
                continue;
            };
            let block = w.key_block.clone();
            let id = e.id;
            if let Err(err) = self.blocking(move |s| s.rewrap_execution(id, &block, generation)).await {
                error!(execution = e.id, error = %err, "re-wrap not stored");
                continue;
            }
            let mut h = lock(hot);
            if let Some(open) = h.open.iter_mut().find(|o| o.id == e.id) {
                open.key_block = w.key_block;
                open.generation = generation;
            }
            info!(sn, execution = e.id, "re-wrapped for the device's new initialisation");
        }
    }

    pub(super) fn send_unlock(&self, sn: &str, key: &MacKey, device_id: i64) {
        let Some(counter) = self.next_down_counter() else {
            return warn!(sn, "unlock not sent: no downlink counter (the next hello sends it)");
        };
        let body = Body {
            party: sn.to_string(),
            counter,
            message: Message::Unlock(message::Unlock { unlock_id: device_id as u64 }),
        };
        match frame::seal(key, &body) {
            Ok(bytes) => self.outbound.publish(topic::device_down(sn), bytes),
            Err(e) => error!(error = %e, "cannot seal an unlock"),
        }
    }

    /// The gateway's own connection to the broker came back (external broker mode). Around the
    /// outage acks may have been dropped (published before the gateway subscribed again) and
    /// last wills published late, so the gateway's view of who is online is not trusted: every
    /// device with a download sent and not acked is re-delivered on its backoff, online or not,
    /// until an ack, the expiry, or its next hello, from which presence is rebuilt. Returns how
    /// many devices that concerns.
    pub fn on_broker_reconnected(&self) -> usize {
        let mut unsure = 0;
        for entry in self.devices.iter() {
            let mut h = lock(entry.value());
            if h.open.iter().any(|e| e.last_sent.is_some()) {
                h.presence_unsure = true;
                unsure += 1;
            }
        }
        metrics::counter!(m::BROKER_RECONNECTS_TOTAL).increment(1);
        info!(devices = unsure, "broker connection back: unacked downloads are re-delivered whatever the presence");
        unsure
    }

    /// Seals and publishes the open executions of these online terminals, on one task per core:
    /// each download is signed with its terminal's key, and a fleet-wide task is thousands of
    /// them.
    pub(super) async fn deliver_to_online(&self, mut online: Vec<(String, Arc<Mutex<DeviceHot>>)>) {
        let Some(engine) = self.arc() else { return };
        let workers =
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(online.len().div_ceil(256)).max(1);
        let per_worker = online.len().div_ceil(workers);
        let mut running = Vec::with_capacity(workers);
        while !online.is_empty() {
            let share = online.split_off(online.len().saturating_sub(per_worker));
            let engine = engine.clone();
            running.push(tokio::spawn(async move {
                for (sn, hot) in share {
                    let key = { engine.signing_key(&mut lock(&hot)) };
                    if let Some(key) = key {
                        engine.deliver_open(&sn, &hot, &key, None, SendReason::Presence).await;
                    }
                }
            }));
        }
        for worker in running {
            if let Err(e) = worker.await {
                error!(error = %e, "a delivery worker failed");
            }
        }
    }

    /// Expires every open execution past its deadline (on the injected clock).
    pub async fn expire_now(&self) -> EngineResult<usize> {
        let now = self.clock.now_ms();
        // The deferred sends of executions that may expire now, so that their rows count them.
        let unwritten = self.due_sends(DueSends::DeadlineBy(now));
        if !unwritten.is_empty() {
            self.write_sends_durably(unwritten).await?;
        }
        let due = self.blocking(move |s| s.expire_due(now)).await?;
        let ids: Vec<i64> = due.iter().map(|(id, _)| *id).collect();
        self.forget(&ids);
        if !ids.is_empty() {
            metrics::counter!(m::EXECUTIONS_ENDED_TOTAL, "state" => "expired").increment(ids.len() as u64);
            info!(expired = ids.len(), "executions expired");
        }
        Ok(ids.len())
    }

    /// Re-publishes unacked downloads whose backoff elapsed (on [`Clock::ticks_ms`]) to online
    /// devices, and to devices whose presence is unsure since the broker connection came back.
    pub(super) async fn retry_sweep(&self) {
        let ticks = self.clock.ticks_ms();
        let due: Vec<(String, Arc<Mutex<DeviceHot>>)> = self
            .devices
            .iter()
            .filter(|entry| {
                let h = lock(entry.value());
                (h.online || h.presence_unsure)
                    && h.open.iter().any(|e| session::due_for_retry(e, ticks, self.retry_initial_ms()))
            })
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        if due.is_empty() {
            return;
        }
        if self.is_shared() {
            // Another node may have ended some of them: re-check before re-delivering.
            let ids: Vec<i64> =
                due.iter().flat_map(|(_, h)| lock(h).open.iter().map(|e| e.id).collect::<Vec<_>>()).collect();
            let Ok(open) = self.blocking(move |s| s.still_open(&ids)).await else { return };
            let open: std::collections::HashSet<i64> = open.into_iter().collect();
            let mut ended = Vec::new();
            for (_, hot) in &due {
                let mut h = lock(hot);
                ended.extend(h.open.iter().filter(|e| !open.contains(&e.id)).map(|e| e.id));
                h.open.retain(|e| open.contains(&e.id));
            }
            for id in ended {
                self.execution_sn.remove(&id);
                self.refusals.remove(&id);
            }
        }
        for (sn, hot) in due {
            let key = { self.signing_key(&mut lock(&hot)) };
            if let Some(key) = key {
                self.deliver_open(&sn, &hot, &key, None, SendReason::Retry).await;
            }
        }
    }
}
