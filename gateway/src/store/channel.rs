//! What the store keeps for the backend channel (`docs/PROTOCOL.md` §12): the backend identities,
//! the answers of their state-changing requests, and each organization's numbered events.
//!
//! [`ChannelStore`] is a supertrait of [`Store`]: the SQLite and PostgreSQL implementations live in
//! `sqlite_channel.rs` and `postgres_channel.rs`. The events are written by hooks that the
//! stores' own transactions call (`create_task_with`, `stop_task`, `expire_due`, `apply_batch`),
//! so that an event exists if and only if the change it reports does.
//!
//! Only organizations with an *event stream* get events: the stream (its last `seq`) is opened
//! when the organization's first backend is created, so a fleet without backends pays nothing.
//! An event's payload is the postcard encoding of its [`rki_protocol::message::Event`], built
//! here; the store keeps it as opaque bytes.

use rki_protocol::message::{Answer, Event};
use rki_protocol::terminal::result_meaning;
use serde::Serialize;

use super::*;

/// One backend identity of an organization. The MAC key is stored only sealed under the master
/// key and the MQTT password only as a salted hash: a copy of the store cannot act as a backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendRow {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    pub created_at: Millis,
    pub created_by: String,
    pub revoked_at: Option<Millis>,
    /// The last request counter accepted from it (every node shares it).
    pub last_counter: u64,
    /// The frame MAC key, sealed (`KeyService::seal_backend_mac_key`).
    #[serde(skip)]
    pub sealed_mac_key: String,
    /// `$7$` PBKDF2 hash of the MQTT password (`mosquitto::password_hash`).
    #[serde(skip)]
    pub password_hash: String,
}

/// A live backend as the external broker's files and registry need it
/// ([`ChannelStore::broker_backends`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerBackend {
    pub org: String,
    pub name: String,
    /// `$7$` PBKDF2 hash of the MQTT password.
    pub password_hash: String,
}

/// A backend credential to store ([`ChannelStore::create_backend`]).
#[derive(Debug, Clone)]
pub struct NewBackend {
    pub org_id: i64,
    pub name: String,
    pub sealed_mac_key: String,
    pub password_hash: String,
    pub created_by: String,
    pub at: Millis,
}

/// A state-changing request as remembered under its backend and request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RememberedRequest {
    /// `rki_protocol::backend::request_digest` of the request.
    pub digest: Vec<u8>,
    /// The answer (postcard of [`Answer`]) once there is one; `None` while the request is under
    /// way (or was cut short by a crash: asking again finishes it).
    pub answer: Option<Vec<u8>>,
}

/// A request about to be carried out ([`ChannelStore::claim_backend_request`]).
#[derive(Debug, Clone)]
pub struct RequestClaim {
    pub org_id: i64,
    pub backend_id: i64,
    pub request_id: u64,
    pub digest: Vec<u8>,
    /// For a `CreateTask`: the task's `request_id`, by which the task's own transaction finds
    /// this row and writes the answer beside the task.
    pub task_request_id: Option<i64>,
    pub at: Millis,
}

/// The backend request an action answers (`Audit::answering`): the action's own transaction
/// writes the answer beside what it changes, so a crash leaves both or neither (§12.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answering {
    pub backend_id: i64,
    pub request_id: u64,
    pub answer: PendingAnswer,
}

/// An answer as the action hands it to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingAnswer {
    /// `Answer::Stopped` of this task (its number), with the `terminated` the transaction counts.
    Stopped { task_id: u64 },
    /// An answer known before the transaction: postcard of an [`Answer`].
    Encoded(Vec<u8>),
}

impl Answering {
    /// The answer's bytes, given what only the transaction knows (`terminated` of a stop).
    pub(crate) fn encode(&self, terminated: usize) -> StoreResult<Vec<u8>> {
        match &self.answer {
            PendingAnswer::Encoded(bytes) => Ok(bytes.clone()),
            PendingAnswer::Stopped { task_id } => postcard::to_stdvec(&Answer::Stopped {
                task_id: *task_id,
                terminated: u32::try_from(terminated).unwrap_or(u32::MAX),
            })
            .map_err(|e| StoreError::Backend(format!("answer encoding: {e}"))),
        }
    }
}

/// One kept event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub at: Millis,
    /// Postcard of the [`Event`].
    pub payload: Vec<u8>,
}

/// The events an organization has: the last `seq` given (0: none yet) and the oldest one kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventBounds {
    pub last: u64,
    pub oldest: Option<u64>,
}

/// How much of the channel's history is kept ([`ChannelStore::prune_channel`]).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events written before this time are deleted.
    pub events_before: Millis,
    /// At most this many events per organization are kept (the newest).
    pub events_per_org_max: u64,
    /// Remembered requests older than this are forgotten.
    pub requests_before: Millis,
    /// Rows one prune deletes at most per statement (it holds the store's writer meanwhile).
    pub rows_max: u64,
}

/// The store's side of the backend channel. Every method is one transaction.
pub trait ChannelStore {
    /// Stores a new backend of the organization, audited (`backend.create`) in the same
    /// transaction, and opens the organization's event stream if it has none. `Conflict` if the
    /// name is taken in the organization (revoked ones included: a name is never reused).
    fn create_backend(&self, backend: &NewBackend, audit: &Audit) -> StoreResult<BackendRow>;
    /// The organization's backends, by name.
    fn list_backends(&self, org_id: i64) -> StoreResult<Vec<BackendRow>>;
    fn backend_by_name(&self, org_id: i64, name: &str) -> StoreResult<Option<BackendRow>>;
    /// Every backend not revoked, of every organization, as an external broker must know it:
    /// (organization slug, backend name, `$7$` hash of its MQTT password), by slug and name.
    fn broker_backends(&self) -> StoreResult<Vec<BrokerBackend>>;
    /// Revokes a backend, audited (`backend.revoke`) in the same transaction. `NotFound` for an
    /// unknown name, `Conflict` if already revoked.
    fn revoke_backend(&self, org_id: i64, name: &str, at: Millis, audit: &Audit) -> StoreResult<BackendRow>;
    /// Accepts `counter` from the backend if it is above the last accepted one (and the backend
    /// is not revoked), raising it; `false` for a replay. Atomic across nodes.
    fn accept_backend_counter(&self, backend_id: i64, counter: u64) -> StoreResult<bool>;
    /// Records that the request is being carried out, unless it is remembered already: `None`
    /// if this call claimed it, else what is remembered (from an earlier call, or another node).
    fn claim_backend_request(&self, claim: &RequestClaim) -> StoreResult<Option<RememberedRequest>>;
    /// Writes the answer of a claimed request that changed nothing (a refusal, an unlock of no
    /// device); a no-op once an answer is there. A `CreateTask`'s, a `StopTask`'s and an
    /// `Unlock`'s answers are written by the action's own transaction (`Audit::answering`).
    fn remember_backend_answer(&self, backend_id: i64, request_id: u64, answer: &[u8]) -> StoreResult<()>;
    /// Forgets a claim that got no answer (an outage): asking again starts over.
    fn forget_backend_request(&self, backend_id: i64, request_id: u64) -> StoreResult<()>;
    fn event_bounds(&self, org_id: i64) -> StoreResult<EventBounds>;
    /// The organization's events with `seq > after`, in order, at most `limit`.
    fn events_after(&self, org_id: i64, after: u64, limit: u64) -> StoreResult<Vec<StoredEvent>>;
    /// Deletes events and remembered requests past retention. Returns (events, requests) deleted.
    fn prune_channel(&self, retention: &Retention) -> StoreResult<(u64, u64)>;
}

/// An execution's ending as the event hooks read it back inside the ending's transaction.
#[derive(Debug, Clone)]
pub(crate) struct EndedFact {
    pub org_id: i64,
    pub task_id: i64,
    pub task_number: i64,
    pub execution_id: i64,
    pub sn: String,
    pub state: String,
    pub result: Option<i32>,
    pub key_id: Vec<u8>,
    /// Hex, as the execution row keeps it.
    pub kcv: String,
    pub at: Millis,
}

fn encode(event: &Event) -> StoreResult<Vec<u8>> {
    postcard::to_stdvec(event).map_err(|e| StoreError::Backend(format!("event encoding: {e}")))
}

/// The `ExecutionEnded` payload of an ending: the download record in brief.
pub(crate) fn ended_event(fact: &EndedFact) -> StoreResult<Vec<u8>> {
    let succeeded = fact.state == ExecutionState::Succeeded.as_str();
    let error_code = if fact.state == ExecutionState::Failed.as_str() { fact.result.unwrap_or(0) } else { 0 };
    let meaning = match fact.state.as_str() {
        "succeeded" | "failed" => result_meaning(error_code),
        "expired" => "not acknowledged before the task's expiry",
        _ => "manually terminated",
    };
    let (ksn, kcv) = if succeeded {
        (fact.key_id.clone(), hex::decode(&fact.kcv).unwrap_or_default())
    } else {
        (Vec::new(), Vec::new())
    };
    encode(&Event::ExecutionEnded {
        task_id: fact.task_number as u64,
        execution_id: fact.execution_id as u64,
        sn: fact.sn.clone(),
        outcome: fact.state.clone(),
        error_code,
        meaning: meaning.to_string(),
        ksn,
        kcv,
        at_ms: fact.at.max(0) as u64,
    })
}

/// The `TaskDone` payload of a task whose last open execution just ended.
pub(crate) fn task_done_event(task_number: i64, counts: &TaskCounts) -> StoreResult<Vec<u8>> {
    let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    encode(&Event::TaskDone {
        task_id: task_number as u64,
        succeeded: n(counts.succeeded),
        failed: n(counts.failed),
        expired: n(counts.expired),
        terminated: n(counts.terminated),
    })
}

/// The `TaskCreated` payload; `backend` is empty and `request_id` 0 for an operator's task.
pub(crate) fn task_created_event(
    task_number: i64,
    backend: &str,
    request_id: u64,
    executions: usize,
) -> StoreResult<Vec<u8>> {
    encode(&Event::TaskCreated {
        task_id: task_number as u64,
        backend: backend.to_string(),
        request_id,
        executions: u32::try_from(executions).unwrap_or(u32::MAX),
    })
}

/// The `TaskCreated` answer a backend's `CreateTask` gets, written by the task's transaction.
pub(crate) fn task_created_answer(task_number: i64, executions: usize) -> StoreResult<Vec<u8>> {
    postcard::to_stdvec(&Answer::TaskCreated {
        task_id: task_number as u64,
        executions: u32::try_from(executions).unwrap_or(u32::MAX),
    })
    .map_err(|e| StoreError::Backend(format!("answer encoding: {e}")))
}

/// A request id or counter as the store keeps it (SQL integers are signed): the same 64 bits.
pub(crate) fn as_sql(value: u64) -> i64 {
    value as i64
}

/// The inverse of [`as_sql`].
pub(crate) fn from_sql(value: i64) -> u64 {
    value as u64
}
