//! Device frames in: each is opened, verified and sorted by the pure decisions of
//! [`super::session`], then carried out here (hot state, writes through the committer, metrics).
//! Messages are sharded by SN so that one device's frames are handled in order.

use super::*;

pub(super) fn reject(kind: &'static str, why: Rejection) {
    metrics::counter!(m::REJECTED_MESSAGES_TOTAL, "kind" => kind, "reason" => why.reason()).increment(1);
    debug!(kind, reason = why.reason(), "message rejected");
}

/// What a refusal code means to an operator.
pub(super) fn refusal_meaning(code: RefusalCode) -> &'static str {
    match code {
        RefusalCode::Replay => {
            "the terminal accepted a higher gateway counter before (the gateway's clock or store went back); \
             the next re-delivery uses a counter above it"
        }
        RefusalCode::BadTag => "the frame's tag did not verify under the terminal's key",
        RefusalCode::Malformed => "the terminal could not decode the frame",
        _ => "see docs/PROTOCOL.md §6",
    }
}

pub(super) fn shard_of(topic: &str) -> usize {
    // FNV-1a over the topic: the SN is its only varying part.
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in topic.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    (hash % SHARDS as u64) as usize
}

pub(super) async fn shard_worker(engine: Arc<Engine>, mut rx: mpsc::Receiver<InboundMessage>) {
    while let Some(message) = rx.recv().await {
        metrics::histogram!(m::INBOUND_WAIT_SECONDS).record(message.received.elapsed().as_secs_f64());
        engine.handle(message).await;
    }
}

impl Engine {
    /// Queues an inbound message on its device's shard. Waits when the shard is full, which
    /// slows the broker link down rather than dropping.
    pub async fn submit(&self, message: InboundMessage) {
        let shard = shard_of(&message.topic);
        if self.shards[shard].send(message).await.is_err() {
            warn!("inbound shard closed");
        }
    }

    pub(super) async fn handle(&self, msg: InboundMessage) {
        match topic::parse_inbound(&msg.topic) {
            Some(topic::Inbound::DeviceUp { sn }) => self.handle_device_up(sn, &msg.payload).await,
            Some(topic::Inbound::Init { sn }) => {
                // Initialisations are independent of the device's other messages and wait for a
                // durable commit: run them beside the shard, bounded by INIT_CONCURRENCY_MAX.
                let Some(engine) = self.arc() else { return };
                let Ok(permit) = self.init_permits.clone().acquire_owned().await else { return };
                let sn = sn.to_string();
                tokio::spawn(async move {
                    engine.handle_init(&sn, &msg.payload).await;
                    drop(permit);
                });
            }
            Some(topic::Inbound::BackendRequest { .. }) => match self.backend_requests.get() {
                // Never waits: a full queue drops the request, and the backend asks again.
                Some(requests) => {
                    if requests.try_send(msg).is_err() {
                        metrics::counter!(m::BACKEND_REQUESTS_REFUSED_TOTAL, "reason" => "overloaded").increment(1);
                    }
                }
                None => reject("backend_request", Rejection::WrongTopic),
            },
            None => reject("unknown", Rejection::WrongTopic),
        }
    }

    pub(super) async fn handle_device_up(&self, sn: &str, payload: &[u8]) {
        let unverified = match session::open_frame(sn, payload) {
            Ok(u) => u,
            Err((kind, why)) => return reject(kind, why),
        };
        let kind = unverified.peek().message.kind().as_str();
        let hot = match self.hot_device(sn).await {
            Ok(hot) => hot,
            Err(why) => return reject(kind, why),
        };
        let (key, generation, last_counter) = {
            let mut guard = lock(&hot);
            let Some(key) = self.signing_key(&mut guard) else { return reject(kind, Rejection::NotInitialised) };
            (key, guard.generation, guard.last_counter)
        };
        // The generation of the credentials the message is verified with: what it proves.
        let (verified, generation) = match session::verify(unverified, &key) {
            Ok(v) => (v, generation),
            // Several nodes: the device may have re-initialised through another one since this
            // node cached its keys; read them again and check once more.
            Err(_) if self.is_shared() && self.refresh_credentials(sn, &hot).await => {
                let (key, generation) = {
                    let mut guard = lock(&hot);
                    let Some(key) = self.signing_key(&mut guard) else {
                        return reject(kind, Rejection::NotInitialised);
                    };
                    (key, guard.generation)
                };
                match session::open_frame(sn, payload) {
                    Ok(u) => match session::verify(u, &key) {
                        Ok(v) => (v, generation),
                        Err(why) => return reject(kind, why),
                    },
                    Err((kind, why)) => return reject(kind, why),
                }
            }
            Err(why) => return reject(kind, why),
        };
        // The device holds the secrets of the initialisation `generation`: its GUDID is spent for
        // good, unless a newer initialisation has replaced them meanwhile (then the proof is due
        // for those, and the store ignores one of a generation it no longer has).
        let proven = {
            let mut guard = lock(&hot);
            let due = guard.proof_due && guard.generation == generation;
            if due {
                guard.proof_due = false;
            }
            due.then_some(guard.device_id)
        };
        if let Some(device_id) = proven {
            self.queue(Write::ProveGudid { device_id, generation, at: self.clock.now_ms() }, None).await;
        }
        let proof = verified.proof;
        match session::classify(verified.body, last_counter) {
            Ok(DeviceMessage::Bye { counter }) => self.on_bye(&hot, counter),
            Ok(DeviceMessage::Hello { counter, hello }) => self.on_hello(sn, &hot, &key, counter, hello, proof).await,
            Ok(DeviceMessage::Ack { counter, ack }) => self.on_ack(sn, &hot, counter, ack, proof).await,
            Ok(DeviceMessage::Refusal { counter, refusal }) => {
                self.on_device_refusal(sn, &hot, counter, refusal, proof).await
            }
            Err(why) => reject(kind, why),
        }
    }

    /// The MQTT endpoint saw the device's connection end (DISCONNECT, a dropped socket or a
    /// keep-alive time-out): the device is offline at once, as after a `Bye`.
    pub fn device_disconnected(&self, sn: &str) {
        if let Some(hot) = self.devices.get(sn).map(|h| h.clone()) {
            // The endpoint saw it end: newer than any message of the device.
            self.on_bye(&hot, u64::MAX);
        }
    }

    /// A bye counts only if it is not older than the device's latest hello: the last will is
    /// sealed at CONNECT with the counter that the session's first hello then carries
    /// (docs/PROTOCOL.md §5.6), so a will of an earlier session, published late (a broker
    /// shutting down publishes every will), is below the hello of the session that followed it.
    pub(super) fn on_bye(&self, hot: &Arc<Mutex<DeviceHot>>, counter: u64) {
        let mut h = lock(hot);
        if !session::bye_counts(counter, h.hello_counter) {
            drop(h);
            return reject("bye", Rejection::StaleBye);
        }
        if h.online {
            h.online = false;
            self.online.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(m::DEVICES_CONNECTED).set(self.online.load(Ordering::Relaxed) as f64);
        }
    }

    pub(super) async fn on_hello(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        key: &MacKey,
        counter: u64,
        hello: message::Hello,
        _proof: MacVerified,
    ) {
        let now = self.clock.now_ms();
        let hello_at = Instant::now();
        let debug_key_present = hello.slots.iter().any(|s| s.slot == KeySlot::DEBUG);
        let slots_json = serde_json::to_string(
            &hello
                .slots
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "slot": s.slot.0,
                        "key_type": s.key_type.as_str(),
                        "key_id": hex::encode_upper(&s.key_id),
                        "kcv": hex::encode_upper(&s.kcv),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|_| "[]".into());
        let (device_id, stale, unlock, connected) = {
            let mut h = lock(hot);
            h.last_counter = counter;
            h.hello_counter = counter;
            // The device's own word on its presence replaces any doubt after a broker outage.
            h.presence_unsure = false;
            // Asked under the device's lock: the endpoint ends a connection (detach) before it
            // takes this lock to mark the device offline, so either the answer here is no, or
            // that mark comes after this one.
            let connected = self.outbound.device_connected(sn) != Some(false);
            if connected && !h.online {
                h.online = true;
                self.online.fetch_add(1, Ordering::Relaxed);
                metrics::gauge!(m::DEVICES_CONNECTED).set(self.online.load(Ordering::Relaxed) as f64);
            }
            if !hello.locked {
                h.unlock_pending = false;
                // Unlocked: an earlier refusal of an unlock is history.
                self.unlock_refusals.remove(sn);
            }
            let generation = h.generation;
            let stale: Vec<OpenExecution> = h.open.iter().filter(|e| e.generation != generation).cloned().collect();
            (h.device_id, stale, h.unlock_pending && hello.locked, connected)
        };
        self.queue(Write::Counter { device_id, counter }, None).await;
        self.queue(
            Write::Report(DeviceReport {
                device_id,
                model: hello.model.clone(),
                rom_version: hello.rom_version.clone(),
                app_version: hello.app_version.clone(),
                region: hello.region.as_str().into(),
                debug_mode: hello.debug_mode,
                debug_key_present,
                locked: hello.locked,
                slots_json,
                at: now,
            }),
            None,
        )
        .await;
        if self.is_shared() {
            self.refresh_open(sn, hot).await;
        }
        let stale: Vec<OpenExecution> = if self.is_shared() {
            let h = lock(hot);
            h.open.iter().filter(|e| e.generation != h.generation).cloned().collect()
        } else {
            stale
        };
        if !stale.is_empty() {
            self.rewrap(sn, hot, stale).await;
        }
        if !connected {
            // Gone already: its next connection's hello delivers.
            return;
        }
        if unlock {
            self.send_unlock(sn, key, device_id);
        }
        self.deliver_open(sn, hot, key, Some(hello_at), SendReason::Presence).await;
    }

    pub(super) async fn on_ack(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        counter: u64,
        ack: message::Ack,
        _proof: MacVerified,
    ) {
        let now = self.clock.now_ms();
        let id = ack.execution_id as i64;
        // Every check first; only a fully valid ack changes state (the counter included).
        let decided = {
            let mut h = lock(hot);
            match session::decide_ack(&h.open, &ack) {
                AckDecision::End { index, outcome } => {
                    let e = h.open.swap_remove(index);
                    h.last_counter = counter;
                    Ok((h.device_id, e, outcome))
                }
                AckDecision::NotOpenHere => Err(None),
                AckDecision::Reject(why) => Err(Some(why)),
            }
        };
        let (device_id, execution, outcome) = match decided {
            Ok(found) => found,
            Err(Some(why)) => return reject("ack", why),
            Err(None) => return self.on_ack_for_closed(sn, hot, counter, &ack, _proof).await,
        };
        self.execution_sn.remove(&id);
        self.refusals.remove(&id);
        let succeeded = outcome.succeeded();
        let state = outcome.state();
        let injection = match ack.injection {
            InjectionType::Auto => "auto",
            InjectionType::Manual => "manual",
        };
        self.queue(Write::Counter { device_id, counter }, None).await;
        self.queue(
            Write::End(Ending {
                execution_id: id,
                state,
                result: Some(ack.result),
                injection: injection.into(),
                at: now,
                lock_device: succeeded,
                sends: self.take_sends(id),
            }),
            Some(AckDone {
                org: self.org_label(execution.org_id),
                created_at: execution.created_at,
                hello_at: execution.hello_at,
                succeeded,
            }),
        )
        .await;
        if ack.result != 0 {
            let meaning = rki_protocol::terminal::result_meaning(ack.result);
            info!(sn, execution = id, code = ack.result, meaning, "device reported an error");
        }
    }

    /// A terminal refused a down frame whose tag verified (docs/PROTOCOL.md §5.9). Counted, and
    /// kept on the execution (or the device, for an unlock) for the operator; a refusal of a
    /// replayed counter also moves the downlink counter above the one the terminal accepted, when
    /// that is not absurdly far ahead, so that the next re-delivery is accepted.
    pub(super) async fn on_device_refusal(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        counter: u64,
        refusal: message::DeviceRefusal,
        _proof: MacVerified,
    ) {
        let device_id = lock(hot).device_id;
        // Checks first: a refusal of another device's execution changes nothing.
        let (what, execution) = match refusal.frame {
            RefusedFrame::Download { execution_id } => {
                let id = execution_id as i64;
                let known = lock(hot).open.iter().any(|e| e.id == id);
                if !known {
                    match self.blocking(move |s| s.execution(id)).await {
                        Ok(row) if row.device_id == device_id && row.sn == sn => {}
                        Ok(_) => return reject("device_refusal", Rejection::ForeignExecution),
                        Err(EngineError::Store(_)) => return reject("device_refusal", Rejection::StoreUnavailable),
                        Err(_) => return reject("device_refusal", Rejection::UnknownExecution),
                    }
                }
                ("download", Some(id))
            }
            RefusedFrame::Unlock { .. } => ("unlock", None),
        };
        lock(hot).last_counter = counter;
        self.queue(Write::Counter { device_id, counter }, None).await;
        let seen = LastRefusal {
            frame: what,
            code: refusal.code.as_str(),
            meaning: refusal_meaning(refusal.code),
            refused_counter: refusal.refused_counter,
            accepted_counter: refusal.accepted_counter,
            at: self.clock.now_ms(),
        };
        metrics::counter!(m::DEVICE_REFUSALS_TOTAL, "frame" => what, "code" => seen.code).increment(1);
        warn!(
            sn,
            execution = execution,
            frame = what,
            code = seen.code,
            refused_counter = seen.refused_counter,
            accepted_counter = seen.accepted_counter,
            "a terminal refused a frame"
        );
        if refusal.code == RefusalCode::Replay {
            let now_us = (self.clock.now_ms().max(0) as u64).saturating_mul(1000);
            if refusal.accepted_counter <= now_us.saturating_add(REFUSAL_COUNTER_AHEAD_MAX_US) {
                self.down_counter.fetch_max(refusal.accepted_counter, Ordering::Relaxed);
            }
        }
        match execution {
            Some(id) => {
                self.refusals.insert(id, seen);
            }
            None => {
                self.unlock_refusals.insert(sn.to_string(), seen);
            }
        }
    }

    /// The latest refusal of an open execution's download, if its terminal sent one.
    pub fn last_refusal(&self, execution_id: i64) -> Option<LastRefusal> {
        self.refusals.get(&execution_id).map(|r| r.clone())
    }

    /// The latest refusal of an unlock by this device, if it sent one.
    pub fn last_unlock_refusal(&self, sn: &str) -> Option<LastRefusal> {
        self.unlock_refusals.get(sn).map(|r| r.clone())
    }

    /// An ack whose execution is not open here: a duplicate of a recorded ack, another device's
    /// execution, or an unknown one.
    pub(super) async fn on_ack_for_closed(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        counter: u64,
        ack: &message::Ack,
        proof: MacVerified,
    ) {
        let id = ack.execution_id as i64;
        let device_id = lock(hot).device_id;
        let row = self.blocking(move |s| s.execution(id)).await;
        match row {
            Err(EngineError::Store(_)) => reject("ack", Rejection::StoreUnavailable),
            Err(_) => reject("ack", Rejection::UnknownExecution),
            Ok(row) => match session::decide_closed_ack(row.device_id, &row.sn, row.state, device_id, sn) {
                ClosedAck::Foreign => reject("ack", Rejection::ForeignExecution),
                ClosedAck::LoadAndRetry => {
                    // Open in the store but not in this node's cache: load it and retry once.
                    self.insert_open(&row);
                    let again = lock(hot).open.iter().any(|e| e.id == id);
                    if again {
                        Box::pin(self.on_ack(sn, hot, counter, ack.clone(), proof)).await;
                    } else {
                        reject("ack", Rejection::NotOpen);
                    }
                }
                ClosedAck::Duplicate => {
                    // Already ended: an idempotent re-ack. Not an error; nothing changes but the
                    // counter.
                    metrics::counter!(m::DUPLICATE_ACKS_TOTAL).increment(1);
                    lock(hot).last_counter = counter;
                    self.queue(Write::Counter { device_id, counter }, None).await;
                }
            },
        }
    }
}
