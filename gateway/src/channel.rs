//! The backend channel (`docs/PROTOCOL.md` §12): an RKI backend's signed requests in, answers and
//! the organization's numbered events out.
//!
//! Layout:
//! - [`BackendChannel::handle`]: a request frame, checked in the order of §12.3 (size and
//!   decoding, party, tag under the backend's sealed MAC key, counter), then answered. A frame
//!   that fails a check is dropped unanswered (no oracle) and counted by reason.
//! - `answer`: what a request does, through [`Service`] (the HTTP API's validation, audit entries
//!   naming the backend as `backend:{name}`), and the idempotency of §12.5.
//! - the pump: the events after each backend's cursor, published as they are committed, within a
//!   window of [`EVENTS_BATCH_MAX`] unacknowledged events.
//!
//! One worker task runs all of it, in arrival order: a backend's requests keep their counter
//! order, and the pump never races a backend's `Events` request.
//!
//! Which node pushes: the one that served the backend's latest `Events` request holds its cursor
//! for [`PUSH_LEASE`]; the backend sends one at least every 10 s. With several nodes behind a
//! shared subscription the pusher may move; a backend drops what it has seen by `seq`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rki_protocol::backend::{request_digest, BackendId, EVENTS_BATCH_MAX, REQUESTS_REMEMBERED_DAYS_MIN};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::message::limits::NOT_READY_LISTED_MAX;
use rki_protocol::message::{
    Answer, BackendAnswer, BackendEvent, BackendRefusalCode, BackendRequest, Body, Event, ExecutionCounts, Message,
    NotReady, NotReadyReason, Request, TaskOrder, TaskTarget,
};
use rki_protocol::topic;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::engine::{EngineError, InboundMessage, Outbound, Target, TaskSpec};
use crate::metrics as m;
use crate::service::{Service, ServiceError};
use crate::store::channel::{Answering, PendingAnswer, RequestClaim, Retention};
use crate::store::Actor;

/// Requests queued for the worker at most; over it a request is dropped (`overloaded`) and the
/// backend asks again after its 10 s.
pub const REQUEST_QUEUE_LEN: usize = 256;
/// How often the pump looks for new events.
const PUMP_INTERVAL: Duration = Duration::from_millis(100);
/// How long a node keeps pushing to a backend after its latest `Events` request.
pub const PUSH_LEASE: Duration = Duration::from_secs(60);
/// Backends one node pushes to at most: each holds a cursor; past it the oldest lease goes.
const PUSHERS_MAX: usize = 1024;
/// How often the pump re-reads whether its backends are still live (a revocation stops pushes).
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the retention sweep deletes old events and remembered requests.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const MS_PER_DAY: i64 = 86_400_000;
/// Rows one prune deletes at most per kind, so that it never holds the store's writer long; a
/// backlog goes over the following minutes.
const PRUNE_ROWS_MAX: u64 = 20_000;

/// Every reason a request is dropped or refused: `rki_backend_requests_refused_total{reason}`.
pub const REFUSAL_REASONS: &[&str] = &[
    "bad_frame",
    "party_mismatch",
    "unknown_backend",
    "bad_mac",
    "replay",
    "wrong_message",
    "overloaded",
    "bad_request",
    "not_found",
    "forbidden",
    "conflict",
    "unavailable",
    "expiry_out_of_range",
    "slot_not_writable",
    "no_device_ready",
    "no_key_source",
    "too_many_devices",
    "request_id_reused",
];

/// How long events and remembered requests are kept (`[backend]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    /// Events younger than this are kept (at least `EVENTS_RETAINED_DAYS_MIN`).
    pub events_retention_days: u32,
    /// Events kept per organization at most, the newest.
    pub events_per_org_max: u64,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self { events_retention_days: 30, events_per_org_max: 10_000_000 }
    }
}

fn refused(reason: &'static str) {
    metrics::counter!(m::BACKEND_REQUESTS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A frame dropped unanswered.
fn dropped(reason: &'static str) {
    refused(reason);
    metrics::counter!(m::REJECTED_MESSAGES_TOTAL, "kind" => "backend_request", "reason" => reason).increment(1);
    debug!(reason, "backend request dropped");
}

/// One backend's event cursor on this node.
struct Pusher {
    org_id: i64,
    backend_id: i64,
    /// Its frame MAC key, opened when its `Events` request was verified.
    key: MacKey,
    /// The last `seq` the backend acknowledged.
    acked: u64,
    /// The last `seq` published to it.
    cursor: u64,
    until: Instant,
}

/// The backend channel's worker state.
pub struct BackendChannel {
    service: Service,
    outbound: Arc<dyn Outbound>,
    settings: ChannelSettings,
    /// Last counter of a gateway → backend frame: microseconds since the epoch, strictly
    /// increasing on this node.
    counter: AtomicU64,
    /// (org slug, backend name) → its cursor.
    pushers: HashMap<(String, String), Pusher>,
}

/// A verified request, ready to be answered.
struct Accepted {
    org_id: i64,
    org: String,
    name: String,
    backend_id: i64,
    key: MacKey,
    request: BackendRequest,
}

impl BackendChannel {
    /// Starts the worker; returns the queue the engine forwards request messages to.
    pub fn start(
        service: Service,
        outbound: Arc<dyn Outbound>,
        settings: ChannelSettings,
    ) -> mpsc::Sender<InboundMessage> {
        for reason in REFUSAL_REASONS {
            metrics::counter!(m::BACKEND_REQUESTS_REFUSED_TOTAL, "reason" => *reason).increment(0);
        }
        metrics::counter!(m::BACKEND_EVENTS_PUBLISHED_TOTAL).increment(0);
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE_LEN);
        let channel =
            BackendChannel { service, outbound, settings, counter: AtomicU64::new(0), pushers: HashMap::new() };
        tokio::spawn(channel.run(rx));
        tx
    }

    async fn run(mut self, mut rx: mpsc::Receiver<InboundMessage>) {
        let mut pump = tokio::time::interval(PUMP_INTERVAL);
        pump.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = Instant::now();
        let mut pruned = Instant::now() - PRUNE_INTERVAL;
        loop {
            tokio::select! {
                message = rx.recv() => {
                    let Some(message) = message else { return };
                    self.handle(message).await;
                }
                _ = pump.tick() => {
                    if liveness.elapsed() >= LIVENESS_INTERVAL {
                        liveness = Instant::now();
                        self.check_liveness().await;
                    }
                    if pruned.elapsed() >= PRUNE_INTERVAL {
                        pruned = Instant::now();
                        self.prune().await;
                    }
                    self.pump().await;
                }
            }
        }
    }

    /// The next gateway → backend counter.
    fn next_counter(&self) -> u64 {
        let now = (self.service.now().max(0) as u64).saturating_mul(1000);
        let mut last = self.counter.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self.counter.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn publish(&self, topic_name: String, org: &str, key: &MacKey, message: Message) {
        let body = Body { party: org.to_string(), counter: self.next_counter(), message };
        match frame::seal(key, &body) {
            Ok(bytes) => self.outbound.publish(topic_name, bytes),
            Err(e) => warn!(error = %e, "backend frame not sealed"),
        }
    }

    /// One request frame from `rki/v1/backend/{org}/{name}/req`.
    async fn handle(&mut self, message: InboundMessage) {
        let Some(topic::Inbound::BackendRequest { org, name }) = topic::parse_inbound(&message.topic) else {
            return dropped("bad_frame");
        };
        let (org, name) = (org.to_string(), name.to_string());
        let accepted = match self.accept(&org, &name, &message.payload).await {
            Ok(accepted) => accepted,
            Err(reason) => return dropped(reason),
        };
        metrics::counter!(m::BACKEND_REQUESTS_TOTAL, "request" => request_label(&accepted.request.request))
            .increment(1);
        let answer = self.answer(&accepted).await;
        if let Answer::Refused { code, .. } = &answer {
            refused(BackendRefusalCode::from_code(*code).map_or("bad_request", BackendRefusalCode::as_str));
        }
        let events = match (&accepted.request.request, &answer) {
            (Request::Events { after }, Answer::Events { last, .. }) => Some((*after, *last)),
            _ => None,
        };
        let reply = BackendAnswer { request_id: accepted.request.request_id, answer };
        self.publish(topic::backend_reply(&org, &name), &org, &accepted.key, Message::BackendAnswer(reply));
        if let Some((after, last)) = events {
            self.serve_events(&accepted, after, last).await;
        }
    }

    /// The checks of §12.3, in order; the reason of the first that fails.
    async fn accept(&self, org: &str, name: &str, payload: &[u8]) -> Result<Accepted, &'static str> {
        let unverified = frame::open_backend(payload).map_err(|_| "bad_frame")?;
        if unverified.peek().party != org {
            return Err("party_mismatch");
        }
        BackendId::new(org, name).map_err(|_| "unknown_backend")?;
        let (org_owned, name_owned) = (org.to_string(), name.to_string());
        let found = self
            .service
            .blocking(move |s| {
                let Some(org) = s.org_by_name(&org_owned)? else { return Ok(None) };
                Ok(s.backend_by_name(org.id, &name_owned)?.map(|b| (org.id, b)))
            })
            .await
            .map_err(|_| "unavailable")?;
        let Some((org_id, backend)) = found else { return Err("unknown_backend") };
        if backend.revoked_at.is_some() {
            return Err("unknown_backend");
        }
        let key = self.service.engine.keys.open_backend_mac_key(&backend.sealed_mac_key).map_err(|_| "unavailable")?;
        let verified = unverified.verify(&key).map_err(|_| "bad_mac")?;
        let Message::BackendRequest(request) = verified.body.message else { return Err("wrong_message") };
        let counter = verified.body.counter;
        if counter > i64::MAX as u64 {
            return Err("replay");
        }
        let backend_id = backend.id;
        let fresh = self
            .service
            .blocking(move |s| s.accept_backend_counter(backend_id, counter))
            .await
            .map_err(|_| "unavailable")?;
        if !fresh {
            return Err("replay");
        }
        Ok(Accepted { org_id, org: org.to_string(), name: name.to_string(), backend_id, key, request })
    }

    /// The answer, remembered under the request id when the request changes state (§12.5).
    async fn answer(&mut self, a: &Accepted) -> Answer {
        let request = &a.request;
        if let Err(code) = request.check() {
            let answer = Answer::refused(code, refusal_reason(code));
            if request.request.changes_state() && request.request_id != 0 {
                self.remember_refusal(a, &answer).await;
            }
            return answer;
        }
        if !request.request.changes_state() {
            return self.read_only(a).await;
        }
        let digest = request_digest(&request.request).to_vec();
        let task_request_id = matches!(request.request, Request::CreateTask(_))
            .then(|| task_request_id(a.backend_id, request.request_id));
        let claim = RequestClaim {
            org_id: a.org_id,
            backend_id: a.backend_id,
            request_id: request.request_id,
            digest: digest.clone(),
            task_request_id,
            at: self.service.now(),
        };
        let remembered = match self.service.blocking(move |s| s.claim_backend_request(&claim)).await {
            Ok(r) => r,
            Err(e) => return refusal_of(e),
        };
        if let Some(remembered) = remembered {
            if !rki_protocol::secret::ct_eq(&remembered.digest, &digest) {
                return Answer::refused(BackendRefusalCode::RequestIdReused, "request_id was used for another request");
            }
            if let Some(answer) = remembered.answer.as_deref().and_then(|b| postcard::from_bytes::<Answer>(b).ok()) {
                return answer;
            }
            // Claimed, unanswered: cut short by a crash or an outage, or under way on another
            // node. Carrying it out again is safe: a task is found again by its request id, a
            // stop and an unlock do nothing twice.
        }
        let answer = self.change(a, task_request_id).await;
        // A task, a stop or an unlock that changed something has its answer written by its own
        // transaction already (`Audit::answering`): the write below is then a no-op. It stays
        // for the answers that changed nothing (a refusal, an unlock of no device).
        let (backend_id, request_id) = (a.backend_id, request.request_id);
        let unavailable =
            matches!(&answer, Answer::Refused { code, .. } if *code == BackendRefusalCode::Unavailable.code());
        let stored = if unavailable {
            self.service.blocking(move |s| s.forget_backend_request(backend_id, request_id)).await
        } else {
            match postcard::to_stdvec(&answer) {
                Ok(bytes) => {
                    self.service.blocking(move |s| s.remember_backend_answer(backend_id, request_id, &bytes)).await
                }
                Err(e) => Err(ServiceError::internal(e.to_string())),
            }
        };
        if let Err(e) = stored {
            warn!(error = %e, "backend answer not remembered");
        }
        if unavailable {
            return answer;
        }
        // What the store remembers wins: when two nodes carried out one request at once (a
        // duplicate delivery), the first write's answer is the answer, for both copies.
        let again =
            RequestClaim { org_id: a.org_id, backend_id, request_id, digest, task_request_id, at: self.service.now() };
        match self.service.blocking(move |s| s.claim_backend_request(&again)).await {
            Ok(Some(remembered)) => remembered
                .answer
                .as_deref()
                .and_then(|bytes| postcard::from_bytes::<Answer>(bytes).ok())
                .unwrap_or(answer),
            _ => answer,
        }
    }

    async fn remember_refusal(&self, a: &Accepted, answer: &Answer) {
        let claim = RequestClaim {
            org_id: a.org_id,
            backend_id: a.backend_id,
            request_id: a.request.request_id,
            digest: request_digest(&a.request.request).to_vec(),
            task_request_id: None,
            at: self.service.now(),
        };
        let (backend_id, request_id) = (a.backend_id, a.request.request_id);
        let Ok(bytes) = postcard::to_stdvec(answer) else { return };
        let _ = self
            .service
            .blocking(move |s| {
                s.claim_backend_request(&claim)?;
                s.remember_backend_answer(backend_id, request_id, &bytes)
            })
            .await;
    }

    fn actor(a: &Accepted) -> Actor {
        Actor::named(format!("backend:{}", a.name))
    }

    /// `CreateTask`, `StopTask`, `Unlock`.
    async fn change(&self, a: &Accepted, task_request_id: Option<i64>) -> Answer {
        let actor = Self::actor(a);
        match &a.request.request {
            Request::CreateTask(order) => {
                let spec = task_spec(order, task_request_id);
                match self.service.create_task(a.org_id, &spec, &actor).await {
                    Ok((task, _)) => Answer::TaskCreated {
                        task_id: task.number as u64,
                        executions: u32::try_from(task.counts.total).unwrap_or(u32::MAX),
                    },
                    Err(e) => refusal_of(e),
                }
            }
            Request::StopTask { task_id } => {
                let Ok(number) = i64::try_from(*task_id) else {
                    return Answer::refused(BackendRefusalCode::NotFound, "no such task");
                };
                let answering = Answering {
                    backend_id: a.backend_id,
                    request_id: a.request.request_id,
                    answer: PendingAnswer::Stopped { task_id: *task_id },
                };
                match self.service.stop_task_answering(a.org_id, number, &actor, Some(answering)).await {
                    Ok((terminated, _)) => {
                        Answer::Stopped { task_id: *task_id, terminated: u32::try_from(terminated).unwrap_or(u32::MAX) }
                    }
                    Err(e) => refusal_of(e),
                }
            }
            Request::Unlock { sns } => self.unlock(a, sns, &actor).await,
            _ => Answer::refused(BackendRefusalCode::BadRequest, "not a state-changing request"),
        }
    }

    /// `Unlock`: the devices are sorted out first (not the organization's: `unknown`; not
    /// initialised: nothing to unlock), so that the answer is known before the writes and goes
    /// into the last unlock's transaction. Each device's unlock is its own transaction (as from
    /// the API): a crash part-way leaves no answer, and the repeat unlocks each again, which
    /// changes nothing twice (the flag is set already).
    async fn unlock(&self, a: &Accepted, sns: &[String], actor: &Actor) -> Answer {
        let mut unknown = Vec::new();
        let mut to_unlock = Vec::new();
        for sn in sns {
            match self.service.engine.device(a.org_id, sn).await {
                Ok(device) if device.initialised => to_unlock.push(sn.clone()),
                Ok(_) => {}
                Err(EngineError::NotFound(_)) => unknown.push(sn.clone()),
                Err(e) => return refusal_of(e.into()),
            }
        }
        let answer = Answer::Unlocked { unlocked: u32::try_from(to_unlock.len()).unwrap_or(u32::MAX), unknown };
        let Ok(encoded) = postcard::to_stdvec(&answer) else {
            return Answer::refused(BackendRefusalCode::Unavailable, refusal_reason(BackendRefusalCode::Unavailable));
        };
        let last = to_unlock.len().saturating_sub(1);
        for (i, sn) in to_unlock.iter().enumerate() {
            let answering = (i == last).then(|| Answering {
                backend_id: a.backend_id,
                request_id: a.request.request_id,
                answer: PendingAnswer::Encoded(encoded.clone()),
            });
            if let Err(e) = self.service.unlock_answering(a.org_id, sn, actor, answering).await {
                // Gone or changed since it was sorted out (nothing deletes a device today): the
                // request is not answered as planned; asking again sorts the devices out afresh.
                return refusal_of(e);
            }
        }
        answer
    }

    /// `Preview`, `QueryTask`, `Events`: answered afresh each time.
    async fn read_only(&self, a: &Accepted) -> Answer {
        match &a.request.request {
            Request::Preview(order) => match self.service.preview(a.org_id, &task_spec(order, None)).await {
                Ok(preview) => {
                    let mut not_ready: Vec<NotReady> = preview
                        .not_ready
                        .iter()
                        .map(|d| NotReady {
                            sn: d.sn.clone(),
                            reasons: d
                                .reasons
                                .iter()
                                .filter_map(|r| NotReadyReason::ALL.into_iter().find(|n| n.as_str() == *r))
                                .collect(),
                        })
                        .collect();
                    not_ready.sort_by(|x, y| x.sn.cmp(&y.sn));
                    let not_ready_total = u32::try_from(not_ready.len()).unwrap_or(u32::MAX);
                    not_ready.truncate(NOT_READY_LISTED_MAX);
                    Answer::Preview {
                        ready: u32::try_from(preview.ready.len()).unwrap_or(u32::MAX),
                        not_ready_total,
                        not_ready,
                    }
                }
                Err(e) => refusal_of(e),
            },
            Request::QueryTask { task_id } => {
                let Ok(number) = i64::try_from(*task_id) else {
                    return Answer::refused(BackendRefusalCode::NotFound, "no such task");
                };
                let org = a.org_id;
                let task = match self.service.task_id(org, number).await {
                    Ok(id) => self.service.blocking(move |s| s.task(org, id)).await,
                    Err(e) => Err(e),
                };
                match task {
                    Ok(task) => {
                        let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
                        let c = &task.counts;
                        Answer::TaskState {
                            task_id: *task_id,
                            state: if c.open() > 0 { "unfinished" } else { "done" }.into(),
                            counts: ExecutionCounts {
                                pending: n(c.queued),
                                delivered: n(c.delivered),
                                succeeded: n(c.succeeded),
                                failed: n(c.failed),
                                expired: n(c.expired),
                                terminated: n(c.terminated),
                            },
                        }
                    }
                    Err(e) => refusal_of(e),
                }
            }
            Request::Events { after } => {
                let org = a.org_id;
                let bounds = match self.service.blocking(move |s| s.event_bounds(org)).await {
                    Ok(b) => b,
                    Err(e) => return refusal_of(e),
                };
                let after = *after;
                if after > bounds.last {
                    return Answer::refused(BackendRefusalCode::Conflict, "after is above the latest event");
                }
                if after == bounds.last {
                    return Answer::Events { after, last: after };
                }
                let oldest = bounds.oldest.unwrap_or(bounds.last + 1);
                if after + 1 < oldest {
                    return Answer::Gap { after, oldest };
                }
                Answer::Events { after, last: bounds.last.min(after + EVENTS_BATCH_MAX) }
            }
            _ => Answer::refused(BackendRefusalCode::BadRequest, "not a read-only request"),
        }
    }

    /// After an `Events` answer: the events `after + 1 ..= last`, then live ones from the pump.
    async fn serve_events(&mut self, a: &Accepted, after: u64, last: u64) {
        let key = (a.org.clone(), a.name.clone());
        // An acknowledgement that moves forward within what this node has published: the events
        // after it are on their way already, so they are not published twice; the window moves
        // on. Any other `after` (a first request, a step back, no progress since the last one: a
        // backend that misses an event) publishes again from `after + 1`.
        if let Some(p) = self.pushers.get_mut(&key) {
            if after > p.acked && after <= p.cursor {
                p.acked = after;
                p.until = Instant::now() + PUSH_LEASE;
                self.push(&key, last).await;
                return;
            }
        }
        if !self.pushers.contains_key(&key) && self.pushers.len() >= PUSHERS_MAX {
            if let Some(oldest) = self.pushers.iter().min_by_key(|(_, p)| p.until).map(|(k, _)| k.clone()) {
                self.pushers.remove(&oldest);
            }
        }
        let pusher = Pusher {
            org_id: a.org_id,
            backend_id: a.backend_id,
            key: a.key.clone_secret(),
            acked: after,
            cursor: after,
            until: Instant::now() + PUSH_LEASE,
        };
        self.pushers.insert(key.clone(), pusher);
        self.push(&key, last).await;
    }

    /// Publishes the backend's events after its cursor up to `up_to`, within its window.
    async fn push(&mut self, key: &(String, String), up_to: u64) {
        let Some(p) = self.pushers.get(key) else { return };
        let window_end = p.acked.saturating_add(EVENTS_BATCH_MAX);
        let end = up_to.min(window_end);
        if end <= p.cursor {
            return;
        }
        let (org_id, cursor) = (p.org_id, p.cursor);
        let limit = end - cursor;
        let events = match self.service.blocking(move |s| s.events_after(org_id, cursor, limit)).await {
            Ok(events) => events,
            Err(e) => return warn!(error = %e, "backend events not read"),
        };
        let Some(mac) = self.pushers.get(key).map(|p| p.key.clone_secret()) else { return };
        let mut published = cursor;
        for stored in events {
            // Numbers have no holes: a missing one was pruned meanwhile, the backend sees the jump
            // and asks again (the answer is then a Gap).
            let Ok(event) = postcard::from_bytes::<Event>(&stored.payload) else { continue };
            let message = Message::BackendEvent(BackendEvent { seq: stored.seq, event });
            self.publish(topic::backend_events(&key.0, &key.1), &key.0, &mac, message);
            metrics::counter!(m::BACKEND_EVENTS_PUBLISHED_TOTAL).increment(1);
            published = stored.seq;
        }
        if let Some(p) = self.pushers.get_mut(key) {
            p.cursor = p.cursor.max(published);
        }
    }

    /// Publishes new events to every backend this node pushes to.
    async fn pump(&mut self) {
        let now = Instant::now();
        self.pushers.retain(|_, p| p.until > now);
        let mut orgs: Vec<i64> = self.pushers.values().map(|p| p.org_id).collect();
        orgs.sort_unstable();
        orgs.dedup();
        for org in orgs {
            let Ok(bounds) = self.service.blocking(move |s| s.event_bounds(org)).await else { continue };
            let keys: Vec<(String, String)> = self
                .pushers
                .iter()
                .filter(|(_, p)| p.org_id == org && p.cursor < bounds.last)
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                self.push(&key, bounds.last).await;
            }
        }
    }

    /// Drops the cursors of revoked backends.
    async fn check_liveness(&mut self) {
        let ids: Vec<(i64, i64)> = self.pushers.values().map(|p| (p.org_id, p.backend_id)).collect();
        if ids.is_empty() {
            return;
        }
        let live = self
            .service
            .blocking(move |s| {
                let mut live = Vec::new();
                for (org, id) in ids {
                    if s.list_backends(org)?.iter().any(|b| b.id == id && b.revoked_at.is_none()) {
                        live.push(id);
                    }
                }
                Ok(live)
            })
            .await;
        if let Ok(live) = live {
            self.pushers.retain(|_, p| live.contains(&p.backend_id));
        }
    }

    async fn prune(&self) {
        let now = self.service.now();
        let days = i64::from(self.settings.events_retention_days);
        let retention = Retention {
            events_before: now - days * MS_PER_DAY,
            events_per_org_max: self.settings.events_per_org_max,
            requests_before: now - (REQUESTS_REMEMBERED_DAYS_MIN as i64) * MS_PER_DAY,
            rows_max: PRUNE_ROWS_MAX,
        };
        match self.service.blocking(move |s| s.prune_channel(&retention)).await {
            Ok((events, requests)) if events + requests > 0 => {
                debug!(events, requests, "backend channel history pruned")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "backend channel prune failed"),
        }
    }
}

fn request_label(request: &Request) -> &'static str {
    match request {
        Request::CreateTask(_) => "create_task",
        Request::Preview(_) => "preview",
        Request::StopTask { .. } => "stop_task",
        Request::Unlock { .. } => "unlock",
        Request::QueryTask { .. } => "query_task",
        Request::Events { .. } => "events",
    }
}

/// The `request_id` of the task a backend's `CreateTask` creates: a one-way digest of the
/// backend's row and its request id, negative (the sign bit set), so that two backends of one
/// organization using the same request ids never meet, nor meet the HTTP API's ids. The task's
/// `UNIQUE (org_id, request_id)` makes a repeated request find its first task again.
pub fn task_request_id(backend_id: i64, request_id: u64) -> i64 {
    let mut hash = Sha256::new();
    hash.update(b"rki/v1 backend task");
    hash.update(backend_id.to_be_bytes());
    hash.update(request_id.to_be_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first) | i64::MIN
}

fn task_spec(order: &TaskOrder, request_id: Option<i64>) -> TaskSpec {
    TaskSpec {
        target: match &order.target {
            TaskTarget::Devices(sns) => Target::Devices(sns.clone()),
            TaskTarget::Group(name) => Target::Group(name.clone()),
        },
        key_source: (!order.key_source.is_empty()).then(|| order.key_source.clone()),
        slot: order.slot.0,
        expiry_days: Some(order.expiry_days_effective()),
        request_id,
    }
}

fn refusal_reason(code: BackendRefusalCode) -> &'static str {
    match code {
        BackendRefusalCode::BadRequest => "the request is not valid as asked",
        BackendRefusalCode::NotFound => "not found",
        BackendRefusalCode::Forbidden => "forbidden",
        BackendRefusalCode::Conflict => "the state forbids it",
        BackendRefusalCode::Unavailable => "unavailable; ask again with the same request_id",
        BackendRefusalCode::ExpiryOutOfRange => "expiry_days is at most 180",
        BackendRefusalCode::SlotNotWritable => "RKI writes slots 1, 4 and 8 only",
        BackendRefusalCode::NoDeviceReady => "no device is ready",
        BackendRefusalCode::NoKeySource => "no single key source",
        BackendRefusalCode::TooManyDevices => "too many devices for one task",
        BackendRefusalCode::RequestIdReused => "request_id was used for another request",
    }
}

/// The stable refusal of a service error (§12.4).
fn refusal_of(e: ServiceError) -> Answer {
    let code = match &e {
        ServiceError::NotFound { .. } | ServiceError::Engine(EngineError::NotFound(_)) => BackendRefusalCode::NotFound,
        ServiceError::Engine(EngineError::Conflict(text)) if text.starts_with("no device is ready") => {
            BackendRefusalCode::NoDeviceReady
        }
        ServiceError::Engine(EngineError::Conflict(text)) if text.starts_with("no key source") => {
            BackendRefusalCode::NoKeySource
        }
        ServiceError::Engine(EngineError::Invalid(text)) if text.contains("different key sources") => {
            BackendRefusalCode::NoKeySource
        }
        ServiceError::Engine(EngineError::Invalid(text)) if text.contains("at most") && text.contains("devices") => {
            BackendRefusalCode::TooManyDevices
        }
        ServiceError::Engine(EngineError::Invalid(text)) if text.starts_with("slot") => {
            BackendRefusalCode::SlotNotWritable
        }
        ServiceError::Engine(EngineError::Invalid(text)) if text.starts_with("expiry") => {
            BackendRefusalCode::ExpiryOutOfRange
        }
        ServiceError::Engine(EngineError::Conflict(_)) => BackendRefusalCode::Conflict,
        ServiceError::Invalid { .. }
        | ServiceError::Unprocessable { .. }
        | ServiceError::Engine(EngineError::Invalid(_)) => BackendRefusalCode::BadRequest,
        ServiceError::Engine(EngineError::Store(_)) | ServiceError::Engine(EngineError::Internal(_)) => {
            BackendRefusalCode::Unavailable
        }
    };
    let detail = match code {
        BackendRefusalCode::Unavailable => refusal_reason(code).to_string(),
        _ => e.to_string(),
    };
    Answer::refused(code, &detail)
}
