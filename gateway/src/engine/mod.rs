//! The task engine: device messages in, downloads out, every outcome durable.
//!
//! - Inbound device messages are sharded by SN over [`SHARDS`] workers, so one device's messages
//!   are handled in order (its counter only goes up) while devices proceed in parallel.
//! - Hot state lives in concurrent maps: per device its credentials (the signing key is unsealed
//!   on first use and cached), its last counter, its online flag and its open executions. The
//!   store is the truth; the maps are rebuilt from it at start.
//! - Writes go through the committer: it gathers many writes into one [`Store::apply_batch`]
//!   (one transaction, one fsync). Metrics for an ack are updated only once its batch is durable.
//! - Delivery is driven by the device's signed hello and by retry timers with doubling backoff;
//!   it never relies on the broker remembering a session.
//!
//! The rooms, and what each may do:
//! - `session`: the per-device decisions, pure (no clock, no I/O, no locks). Every other room
//!   asks it what a frame, an ack or a retry means, and carries the answer out.
//! - `inbound` (frames in), `delivery` (downloads out, retries, expiry), `init` (the GUDID
//!   exchange), `tasks` (preview and creation): the message path and the operator actions; they
//!   write only through `commit` or in one store call, and publish only through [`Outbound`].
//! - `commit`: the only writer of the message path (batches, the barrier, deferred sends).
//! - `state` (the hot maps and how they follow the store), `marks` (durable counters and the
//!   clock's floor), `auth` (CONNECT), `cluster` (several nodes on one store, chosen at build).
//! - The shared vocabulary (types, constants, the `Engine` struct) lives here; each room
//!   imports it with `use super::*`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rki_protocol::frame::{self, MacKey, MacVerified};
use rki_protocol::init::{Ephemeral, GUDID_VALIDITY_SECONDS};
use rki_protocol::message::{self, Body, CreateKey, Message, RefusalCode, RefusedFrame};
use rki_protocol::terminal::{firmware_refusal, InjectionType, KeySlot, KeyType, Region, TerminalError};
use rki_protocol::{topic, Kcv, KeyAlgorithm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use crate::clock::{Clock, Millis};
use crate::domain::{ExecutionState, NotReady, EXPIRY_DAYS_DEFAULT, EXPIRY_DAYS_MAX, SECONDS_PER_DAY};
use crate::keyservice::{aes_initial_key_id, tdes_initial_ksn, DeriveRequest, KeyService};
use crate::metrics as m;
use crate::store::health::{StoreFault, StoreHealth};
use crate::store::*;

mod auth;
mod cluster;
mod commit;
mod delivery;
mod inbound;
mod init;
mod marks;
mod session;
mod state;
mod tasks;
#[cfg(test)]
mod tests;

pub use cluster::{Coordination, Sweep};
use commit::*;
use delivery::*;
use inbound::*;
use session::{AckDecision, ClosedAck, DeviceMessage, SendReason};
use state::*;

/// Inbound workers. Each handles the devices whose SN hashes to it, in arrival order.
pub const SHARDS: usize = 8;
/// Messages queued per shard before the broker link is slowed down.
const SHARD_QUEUE_LEN: usize = 16_384;
/// Writes in one store transaction at most.
const BATCH_WRITES_MAX: usize = 8_192;
/// Writes queued for the committer before producers wait.
const COMMIT_QUEUE_LEN: usize = 65_536;
/// First re-delivery of an unacked download to an online device, then doubling.
pub const RETRY_INITIAL_MS: i64 = 15_000;
/// Longest pause between re-deliveries to an online device.
pub const RETRY_MAX_MS: i64 = 600_000;
/// How often the retry and expiry sweeps run.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a send's `Delivered` write waits for an ack that would carry it in its ending instead
/// ([`Ending::sends`]); at most half the first retry delay, so that a node sharing the store
/// finds the send written before it could take the execution for a re-delivery.
const DELIVERED_WRITE_DELAY_MS: i64 = 1_000;
/// How often the deferred `Delivered` writes are looked at.
const DELIVERED_WRITE_TICK: Duration = Duration::from_millis(200);
/// Executions one claim of the cluster sweep takes at most; it claims again, after the last one's
/// highest id, while they come full (and, woken by a new task, until it has its share).
const CLAIM_BATCH_MAX: i64 = 2_000;
/// Several nodes: how long after a task's creation the sweep's tick leaves its executions that
/// were never sent to the nodes the task's notification woke, each claiming its share at once
/// (a tick falling between the commit and their claims would take the shares of the nodes not
/// yet there). After it, a tick claims what is left: the share of a node that died or did not
/// hear, a task whose notification was lost.
const TICK_CLAIMS_NEW_AFTER_MS: i64 = 2_000;
/// Initialisations handled at once.
const INIT_CONCURRENCY_MAX: usize = 256;
/// Downlink counters reserved ahead in the store: a new high-water mark is written only when
/// the block is used up. The counter follows the clock in microseconds, so this is two seconds of
/// sending per write; a new block is reserved in the background when half of one is left.
pub const DOWN_COUNTER_BLOCK: u64 = 2_000_000;
/// A terminal's refusal may move the downlink counter up to its accepted counter only if that is
/// at most this far ahead of the clock (400 days): further than any clock error, and far below
/// the counter's range, so that a terminal cannot push the gateway's counter to its end.
const REFUSAL_COUNTER_AHEAD_MAX_US: u64 = 400 * 86_400 * 1_000_000;
/// How far ahead of the clock's reading its floor is written to the store, so that a restarted
/// gateway's wall reading does not go below anything this one stamped: the sweeper writes a new
/// floor each second once less than half of this is left (a write every 5 s), as does a step of
/// the adjustable clock. A restart therefore holds the wall reading for up to this long.
const CLOCK_FLOOR_AHEAD_MS: i64 = 10_000;
/// Largest number of devices one task may target (the engine benchmark uses 1,000,000).
pub const TASK_DEVICES_MAX: usize = 2_000_000;
/// A preview reads its devices in two parallel halves from this many on.
const PARALLEL_READ_MIN: usize = 20_000;
/// Devices per chunk of a task's creation: their credentials are read, their keys derived and
/// wrapped and their executions inserted before the next chunk starts, all in the task's one
/// transaction, so memory grows with the chunk, not with the task.
pub const TASK_CHUNK: usize = 20_000;

/// Publishes to the broker. Non-blocking: implementations queue.
pub trait Outbound: Send + Sync + 'static {
    fn publish(&self, topic: String, payload: Vec<u8>);

    /// Whether the device `sn` has a live connection now, where the transport knows it (the
    /// embedded endpoint); `None` where it does not (an external broker: presence comes from the
    /// hellos and the last wills). A hello handled after its connection ended (it waited in its
    /// shard while the endpoint saw the socket close) must not mark the device online again: the
    /// endpoint's disconnect, already handled, would never come a second time, and the device
    /// would stay online, with downloads queued into its kept session, until its next connection.
    fn device_connected(&self, _sn: &str) -> Option<bool> {
        None
    }

    /// Publishes a `Download` of `execution_id`: as [`Outbound::publish`], tagged so that a
    /// session kept for a terminal that went away can drop it once the execution has ended.
    fn publish_download(&self, topic: String, payload: Vec<u8>, _execution_id: i64) {
        self.publish(topic, payload);
    }

    /// The execution has ended (stopped, expired): its download is not sent again from a kept
    /// session. Nothing to do where the transport keeps no session of ours (an external broker's
    /// are its own: see docs/SECURITY.md).
    fn withdraw(&self, _sn: &str, _execution_id: i64) {}
    /// Hands new broker passwords to an external broker that keeps its own registry (Mosquitto's
    /// dynamic security plugin); resolves once they are applied or given up. The default (the
    /// embedded endpoint, the file mode) has nothing to do.
    fn broker_passwords(
        &self,
        _changes: Vec<(crate::dynsec::BrokerIdentity, rki_protocol::secret::SecretBytes)>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Takes revoked identities away from the broker at once: an external broker that keeps its
    /// own registry deletes their clients (which disconnects them); resolves once done or given
    /// up. The default (the file mode: the next rewrite drops them) has nothing to do.
    fn broker_revoked(
        &self,
        _identities: Vec<crate::dynsec::BrokerIdentity>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Why a device message was rejected: the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Frame(&'static str),
    PartyMismatch,
    UnknownDevice,
    NotInitialised,
    BadMac,
    Replay,
    WrongTopic,
    UnknownExecution,
    ForeignExecution,
    KcvMismatch,
    SlotMismatch,
    KeyIdMismatch,
    NotOpen,
    /// The store could not be read to check the message: not the device's fault, and not lost
    /// (the device acks again when the download is re-delivered).
    StoreUnavailable,
    /// A bye older than the device's latest hello: a last will the broker published late.
    StaleBye,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Frame(r) => r,
            Rejection::PartyMismatch => "party_mismatch",
            Rejection::UnknownDevice => "unknown_device",
            Rejection::NotInitialised => "not_initialised",
            Rejection::BadMac => "bad_mac",
            Rejection::Replay => "replay",
            Rejection::WrongTopic => "wrong_topic",
            Rejection::UnknownExecution => "unknown_execution",
            Rejection::ForeignExecution => "foreign_execution",
            Rejection::KcvMismatch => "kcv_mismatch",
            Rejection::SlotMismatch => "slot_mismatch",
            Rejection::KeyIdMismatch => "key_id_mismatch",
            Rejection::NotOpen => "not_open",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::StaleBye => "stale_bye",
        }
    }
}

/// A terminal's signed refusal of a down frame, as the operator sees it on the execution.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastRefusal {
    /// `download` or `unlock`.
    pub frame: &'static str,
    /// The refusal code (`replay`, …).
    pub code: &'static str,
    pub meaning: &'static str,
    /// The counter of the refused frame, and the last one the terminal had accepted.
    pub refused_counter: u64,
    pub accepted_counter: u64,
    /// When the gateway received it.
    pub at: Millis,
}

/// An inbound MQTT message.
pub struct InboundMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When the broker handed the message to the gateway; the wait until its shard takes it up
    /// is the `rki_inbound_wait_seconds` histogram.
    pub received: Instant,
}

impl InboundMessage {
    pub fn new(topic: String, payload: Vec<u8>) -> Self {
        Self { topic, payload, received: Instant::now() }
    }
}

/// Operator-facing errors of the engine, each with a stable code for the API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The store is full, unavailable or too slow: an outage, answered with 503 or 507.
    #[error("{}", .0.detail())]
    Store(StoreFault),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(s) => EngineError::NotFound(s),
            StoreError::Conflict(s) => EngineError::Conflict(s),
            StoreError::Invalid(s) => EngineError::Invalid(s),
            StoreError::Full(s) => EngineError::Store(StoreFault::Full(s)),
            StoreError::Unavailable(s) => EngineError::Store(StoreFault::Unavailable(s)),
            StoreError::Backend(s) => EngineError::Internal(s),
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// Which devices a task targets.
#[derive(Debug, Clone)]
pub enum Target {
    Devices(Vec<String>),
    Group(String),
}

#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub target: Target,
    /// Defaults to the key source assigned to the devices.
    pub key_source: Option<String>,
    pub slot: u16,
    pub expiry_days: Option<u16>,
    pub request_id: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NotReadyDevice {
    pub sn: String,
    pub reasons: Vec<&'static str>,
    /// Each reason as an operator reads it, in the same order.
    pub meanings: Vec<&'static str>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Preview {
    pub key_source: Option<String>,
    pub slot: u16,
    pub expiry_days: u16,
    pub ready: Vec<String>,
    pub not_ready: Vec<NotReadyDevice>,
    /// Devices that are ready but have never reported their firmware.
    pub never_seen: Vec<String>,
    #[serde(skip)]
    ready_ids: Vec<i64>,
    #[serde(skip)]
    key_source_id: Option<i64>,
}

pub struct Engine {
    pub store: Arc<dyn Store>,
    pub keys: Arc<dyn KeyService>,
    pub clock: Arc<Clock>,
    outbound: Arc<dyn Outbound>,
    /// Hot device state by SN.
    devices: DashMap<String, Arc<Mutex<DeviceHot>>>,
    /// Open execution → SN, to route acks and stops.
    execution_sn: DashMap<i64, String>,
    /// CONNECT authentication cache: SN → password hash.
    passwords: DashMap<String, [u8; 32]>,
    /// Organization names for metric labels.
    org_names: DashMap<i64, Arc<str>>,
    commits: mpsc::Sender<Pending>,
    shards: Vec<mpsc::Sender<InboundMessage>>,
    /// Last counter used on a gateway → device frame: microseconds since the epoch of the clock,
    /// strictly increasing, and above every counter of a previous run (see `down_mark`).
    down_counter: AtomicU64,
    /// The durable high-water mark ([`MARK_DOWN_COUNTER`]): no counter above it is used before
    /// the store holds a higher one, so a restart, whatever the wall clock says, starts above
    /// every counter a terminal has seen.
    down_mark: AtomicU64,
    /// A background reservation of the next block is under way.
    down_reserving: AtomicBool,
    /// The last clock floor written ([`MARK_CLOCK_FLOOR_MS`]).
    clock_floor_written: AtomicI64,
    /// The latest signed refusal of each open execution's download, for the operator (in memory:
    /// a refusal repeats at the next delivery after a restart).
    refusals: DashMap<i64, LastRefusal>,
    /// The latest signed refusal of an unlock, by SN.
    unlock_refusals: DashMap<String, LastRefusal>,
    online: AtomicI64,
    /// Bounds initialisations in flight (each holds an X25519 exchange and a pending commit).
    init_permits: Arc<tokio::sync::Semaphore>,
    /// A weak handle to itself, for work spawned beyond `&self` ([`Engine::arc`]).
    me: std::sync::OnceLock<std::sync::Weak<Engine>>,
    /// Woken when devices are registered or (re)initialised (the external broker's ACL sync).
    registry: tokio::sync::Notify,
    /// Wakes the sweeper at once (several nodes: a task was created, as the store tells
    /// [`Engine::watch_due`]: claim this node's share of it now rather than at the next tick).
    sweep_now: tokio::sync::Notify,
    /// Several nodes: executions this node is to claim at its next wake-up (its shares of the
    /// tasks created since), and whether it is to claim whatever is due instead (the store's
    /// listener came up, or cannot say how much is this node's).
    due_share: AtomicI64,
    due_claim_all: AtomicBool,
    /// Several nodes: whether the store's listener is up. While it is not, a task created here
    /// wakes this node's sweep itself, which then claims all of it.
    due_listening: AtomicBool,
    /// Whether other gateway nodes share the store ([`Coordination`]); fixed when the engine is
    /// built, before any worker runs.
    coordination: Coordination,
    /// First re-delivery delay to an online device ([`RETRY_INITIAL_MS`] unless configured).
    retry_initial_ms: i64,
    /// Sends not yet written as `Delivered`.
    unwritten: Mutex<UnwrittenSends>,
    /// The store's health as the engine's own reads and commits find it (`/healthz`).
    pub health: Arc<StoreHealth>,
    /// Where backend request messages go (`crate::channel`), once its worker runs; before, they
    /// are dropped as on a wrong topic.
    backend_requests: std::sync::OnceLock<mpsc::Sender<InboundMessage>>,
    /// Executions whose ending was in a batch that failed to commit (a full disk, an outage):
    /// they left the hot state with their ack, so the sweeper reads them back and, if they are
    /// still open, delivers them again until the device re-acks.
    unrecorded_endings: Mutex<Vec<i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How an engine is built: what cannot change once its workers run.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub coordination: Coordination,
    /// First re-delivery delay to an online device (1 s at least); it doubles up to
    /// [`RETRY_MAX_MS`].
    pub retry_initial_ms: i64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { coordination: Coordination::Single, retry_initial_ms: RETRY_INITIAL_MS }
    }
}

impl Engine {
    /// Builds the engine with the default options (one node, the default retry delay).
    pub async fn start(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyService>,
        clock: Arc<Clock>,
        outbound: Arc<dyn Outbound>,
    ) -> EngineResult<Arc<Engine>> {
        Self::start_with(store, keys, clock, outbound, EngineOptions::default()).await
    }

    /// Builds the engine, loads open executions from the store and starts its workers.
    pub async fn start_with(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyService>,
        clock: Arc<Clock>,
        outbound: Arc<dyn Outbound>,
        options: EngineOptions,
    ) -> EngineResult<Arc<Engine>> {
        let (commit_tx, commit_rx) = mpsc::channel(COMMIT_QUEUE_LEN);
        let mut shard_rx = Vec::new();
        let mut shards = Vec::new();
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE_LEN);
            shards.push(tx);
            shard_rx.push(rx);
        }
        let engine = Arc::new(Engine {
            store,
            keys,
            clock,
            outbound,
            devices: DashMap::new(),
            execution_sn: DashMap::new(),
            passwords: DashMap::new(),
            org_names: DashMap::new(),
            commits: commit_tx,
            shards,
            down_counter: AtomicU64::new(0),
            down_mark: AtomicU64::new(0),
            down_reserving: AtomicBool::new(false),
            clock_floor_written: AtomicI64::new(i64::MIN),
            refusals: DashMap::new(),
            unlock_refusals: DashMap::new(),
            online: AtomicI64::new(0),
            init_permits: Arc::new(tokio::sync::Semaphore::new(INIT_CONCURRENCY_MAX)),
            me: std::sync::OnceLock::new(),
            registry: tokio::sync::Notify::new(),
            sweep_now: tokio::sync::Notify::new(),
            due_share: AtomicI64::new(0),
            due_claim_all: AtomicBool::new(false),
            due_listening: AtomicBool::new(false),
            coordination: options.coordination,
            retry_initial_ms: options.retry_initial_ms.clamp(1000, RETRY_MAX_MS),
            unwritten: Mutex::new(UnwrittenSends::default()),
            health: Arc::new(StoreHealth::default()),
            backend_requests: std::sync::OnceLock::new(),
            unrecorded_endings: Mutex::new(Vec::new()),
        });
        let _ = engine.me.set(Arc::downgrade(&engine));
        engine.load().await?;
        tokio::spawn(committer(engine.clone(), commit_rx));
        for rx in shard_rx {
            tokio::spawn(shard_worker(engine.clone(), rx));
        }
        tokio::spawn(sweeper(engine.clone()));
        tokio::spawn(delivered_writer(engine.clone()));
        if engine.is_shared() {
            engine.watch_due()?;
        }
        Ok(engine)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    ) -> EngineResult<T> {
        let store = self.store.clone();
        let out = tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| EngineError::Internal(format!("store task: {e}")))?;
        self.health.record(out.as_ref().map(|_| ()));
        Ok(out?)
    }

    /// This engine as an `Arc`, for work spawned beyond `&self`; `None` once it is being dropped.
    fn arc(&self) -> Option<Arc<Engine>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }

    fn org_label(&self, org_id: i64) -> Arc<str> {
        if let Some(name) = self.org_names.get(&org_id) {
            return name.clone();
        }
        // A blocking store call (PostgreSQL's client must not run on the async threads).
        let lookup = || self.store.org(org_id);
        let found = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(lookup)
            }
            _ => lookup(),
        };
        let name: Arc<str> = match found {
            Ok(org) => Arc::from(org.name.as_str()),
            Err(_) => Arc::from("unknown"),
        };
        self.org_names.insert(org_id, name.clone());
        name
    }

    pub async fn device(&self, org_id: i64, sn: &str) -> EngineResult<DeviceRow> {
        let owned = sn.to_string();
        self.blocking(move |s| s.device(org_id, &owned)).await
    }

    /// Whether the device is online (its last presence message was a hello).
    pub fn is_online(&self, sn: &str) -> bool {
        self.devices.get(sn).map(|h| lock(&h).online).unwrap_or(false)
    }

    fn retry_initial_ms(&self) -> i64 {
        self.retry_initial_ms
    }

    /// Signals that devices were registered or (re)initialised.
    pub fn notify_registry_changed(&self) {
        self.registry.notify_one();
    }

    /// A backend credential was created: the broker learns its password and access rules
    /// (dynamic security: before this returns, or given up; the file mode: at the rewrite woken
    /// now). `password` is the clear MQTT password, which only the creation holds.
    pub async fn backend_created(
        &self,
        id: &rki_protocol::backend::BackendId,
        password: rki_protocol::secret::SecretBytes,
    ) {
        self.notify_registry_changed();
        let identity = crate::dynsec::BrokerIdentity::Backend(id.clone());
        self.outbound.broker_passwords(vec![(identity, password)]).await;
    }

    /// A backend credential was revoked (the store says so already): the broker forgets it and
    /// its live connection ends.
    pub async fn backend_revoked(&self, id: &rki_protocol::backend::BackendId) {
        self.notify_registry_changed();
        self.outbound.broker_revoked(vec![crate::dynsec::BrokerIdentity::Backend(id.clone())]).await;
    }

    /// Waits for the next registry change.
    pub async fn registry_changed(&self) {
        self.registry.notified().await;
    }

    pub fn online_count(&self) -> i64 {
        self.online.load(Ordering::Relaxed)
    }

    /// The broker link the engine publishes through, for the backend channel's answers and events.
    pub fn outbound(&self) -> Arc<dyn Outbound> {
        self.outbound.clone()
    }

    /// Hands backend request messages to the backend channel's worker from now on.
    pub fn attach_backend_channel(&self, requests: mpsc::Sender<InboundMessage>) {
        let _ = self.backend_requests.set(requests);
    }
}
