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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rki_protocol::frame::{self, MacKey, MacVerified};
use rki_protocol::init::{self, Ephemeral, GUDID_VALIDITY_SECONDS};
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
/// Executions one claim of the cluster sweep takes at most (it claims again while they come full).
const CLAIM_BATCH_MAX: i64 = 2_000;
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
    /// Hands new broker passwords to an external broker that keeps its own registry (Mosquitto's
    /// dynamic security plugin); resolves once they are applied or given up. The default (the
    /// embedded endpoint, the file mode) has nothing to do.
    fn broker_passwords(
        &self,
        _changes: Vec<(crate::dynsec::BrokerIdentity, rki_protocol::secret::SecretBytes)>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// One open execution, as the message path needs it.
#[derive(Debug, Clone)]
struct OpenExecution {
    id: i64,
    org_id: i64,
    key_source_id: i64,
    slot: u16,
    key_type: String,
    key_block: String,
    key_id: Vec<u8>,
    kcv: String,
    generation: i64,
    created_at: Millis,
    deadline: Millis,
    /// [`Clock::ticks_ms`] of the last publish, for the retry backoff.
    last_sent: Option<i64>,
    sends: u32,
    /// The hello that triggered the latest delivery, for the hello→ack latency.
    hello_at: Option<Instant>,
}

/// Sends whose `Delivered` write is deferred (see [`Ending::sends`]).
#[derive(Default)]
struct UnwrittenSends {
    /// Execution → its unwritten sends and its deadline.
    by_execution: HashMap<i64, (Sends, Millis)>,
    /// Executions in the order of their first unwritten send, with that send's time. An entry
    /// whose sends were taken meanwhile is skipped.
    order: VecDeque<(Instant, i64)>,
}

/// Which deferred sends to take.
enum DueSends {
    /// Those first made at least this long ago.
    OlderThan(Duration),
    /// Those of executions whose deadline is at or before this time (before an expiry sweep).
    DeadlineBy(Millis),
    /// All of them (before a task is stopped, and before a flush).
    All,
}

/// The hot state of one device.
struct DeviceHot {
    device_id: i64,
    sealed_signing_key: String,
    /// Unsealed on first use.
    signing_key: Option<MacKey>,
    generation: i64,
    sealed_kbpk_aes: String,
    sealed_kbpk_tdes: String,
    last_counter: u64,
    /// The counter of the latest accepted hello: a bye below it is older than the device's
    /// presence (a will published late) and is ignored.
    hello_counter: u64,
    online: bool,
    /// The gateway's connection to the broker came back after this device was sent a download
    /// that is not acked yet: re-deliver it on the backoff whether or not the device is believed
    /// online, until an ack, the expiry, or a hello (presence is rebuilt from the hellos).
    presence_unsure: bool,
    unlock_pending: bool,
    open: Vec<OpenExecution>,
    /// `open` holds every open execution the store had for the device when it was loaded; until
    /// then (a device made hot by its first message) [`Engine::hot_device`] reads them.
    open_loaded: bool,
}

impl DeviceHot {
    fn from_credentials(c: &DeviceCredentials) -> Self {
        Self {
            device_id: c.device_id,
            sealed_signing_key: c.signing_key.clone(),
            signing_key: None,
            generation: c.generation,
            sealed_kbpk_aes: c.kbpk_aes.clone(),
            sealed_kbpk_tdes: c.kbpk_tdes.clone(),
            last_counter: c.last_counter,
            hello_counter: 0,
            online: false,
            presence_unsure: false,
            unlock_pending: c.unlock_pending,
            open: Vec::new(),
            open_loaded: false,
        }
    }
}

impl OpenExecution {
    fn from_row(e: &ExecutionRow) -> Self {
        Self {
            id: e.id,
            org_id: e.org_id,
            key_source_id: e.key_source_id,
            slot: e.slot,
            key_type: e.key_type.clone(),
            key_block: e.key_block.clone(),
            key_id: e.key_id.clone(),
            kcv: e.kcv.clone(),
            generation: e.generation,
            created_at: e.created_at,
            deadline: e.deadline,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }

    /// The open execution `id` of a task just inserted.
    fn new_in(task: &NewTask, id: i64, e: NewExecution) -> Self {
        Self {
            id,
            org_id: task.org_id,
            key_source_id: task.key_source_id,
            slot: task.slot,
            key_type: task.key_type.clone(),
            key_block: e.key_block,
            key_id: e.key_id,
            kcv: e.kcv,
            generation: e.generation,
            created_at: task.created_at,
            deadline: task.expires_at,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }
}

/// What the chunks of a task's creation leave for after its commit.
#[derive(Default)]
struct TaskBuild {
    /// The new open executions of devices that were hot, by SN.
    hot: HashMap<String, OpenExecution>,
    /// Time spent deriving and wrapping.
    derive: Duration,
    /// Time spent in the store (credentials read, executions inserted).
    store: Duration,
    /// Why a chunk failed, when it was not the store.
    failure: Option<EngineError>,
    /// When the last chunk was in, and how long the commit (and its check) took from there.
    filled: Option<Instant>,
    committed: Option<Duration>,
}

impl TaskBuild {
    /// Keeps an engine error for the caller; the store sees a failure and rolls back.
    fn fail(&mut self, e: EngineError) -> StoreError {
        let message = e.to_string();
        self.failure = Some(e);
        StoreError::Backend(message)
    }
}

/// What every chunk of one task's creation shares.
struct ChunkJob<'a> {
    task: &'a NewTask,
    sealed_bdk: &'a str,
    algorithm: KeyAlgorithm,
    key_set_id: &'a [u8],
    /// The serial of the task's first device (serials follow the order of the ready devices).
    first_serial: u64,
}

/// A chunk of devices to derive for, with their key IDs.
struct Chunk {
    devices: Vec<DeriveTarget>,
    key_ids: Vec<Vec<u8>>,
}

/// A chunk's executions, ready to insert, and the SNs of their devices.
struct Derived {
    executions: Vec<NewExecution>,
    sns: Vec<String>,
    took: Duration,
}

/// Waits for a chunk's derivation.
fn join_chunk(
    handle: std::thread::ScopedJoinHandle<'_, EngineResult<Derived>>,
    build: &mut TaskBuild,
) -> StoreResult<Derived> {
    match handle.join() {
        Ok(Ok(derived)) => {
            build.derive += derived.took;
            Ok(derived)
        }
        Ok(Err(e)) => Err(build.fail(e)),
        Err(_) => Err(build.fail(EngineError::Internal("a derivation thread panicked".into()))),
    }
}

/// Proof that an ack's KCV, key ID and slot match the execution's derivation. Only
/// [`check_ack`] creates one; recording a success requires it.
#[derive(Debug, Clone, Copy)]
struct KcvMatched(());

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

fn reject(kind: &'static str, why: Rejection) {
    metrics::counter!(m::REJECTED_MESSAGES_TOTAL, "kind" => kind, "reason" => why.reason()).increment(1);
    debug!(kind, reason = why.reason(), "message rejected");
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

/// What a refusal code means to an operator.
fn refusal_meaning(code: RefusalCode) -> &'static str {
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

/// What an ack that became durable did, for metrics.
struct AckDone {
    org: Arc<str>,
    created_at: Millis,
    hello_at: Option<Instant>,
    succeeded: bool,
}

struct Pending {
    write: Write,
    ack: Option<AckDone>,
    reply: Option<oneshot::Sender<Result<BatchOutcome, StoreError>>>,
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
    /// Wakes the sweeper at once (several nodes: a task was created here, deliver it now rather
    /// than at the next tick).
    sweep_now: tokio::sync::Notify,
    /// Other gateway nodes share the store: the open executions are re-read from it on every
    /// hello and re-checked before a retry, since another node may have created, ended or
    /// stopped them.
    shared_store: std::sync::atomic::AtomicBool,
    /// First re-delivery delay to an online device ([`RETRY_INITIAL_MS`] unless configured).
    retry_initial_ms: AtomicI64,
    /// Sends not yet written as `Delivered`.
    unwritten: Mutex<UnwrittenSends>,
    /// The store's health as the engine's own reads and commits find it (`/healthz`).
    pub health: Arc<StoreHealth>,
    /// Executions whose ending was in a batch that failed to commit (a full disk, an outage):
    /// they left the hot state with their ack, so the sweeper reads them back and, if they are
    /// still open, delivers them again until the device re-acks.
    unrecorded_endings: Mutex<Vec<i64>>,
}

impl Engine {
    /// Builds the engine, loads open executions from the store and starts its workers.
    pub async fn start(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyService>,
        clock: Arc<Clock>,
        outbound: Arc<dyn Outbound>,
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
            shared_store: std::sync::atomic::AtomicBool::new(false),
            retry_initial_ms: AtomicI64::new(RETRY_INITIAL_MS),
            unwritten: Mutex::new(UnwrittenSends::default()),
            health: Arc::new(StoreHealth::default()),
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

    /// Restores the clock's floor and the downlink counter's high-water mark, and reserves the
    /// first block above both the mark and the clock.
    async fn restore_marks(&self) -> EngineResult<()> {
        // Not in a store that several nodes share: a floor written ahead by one node would run
        // another's clock ahead of the others', and the cluster's retry claims compare times
        // that the nodes wrote.
        let floor = if self.store.is_shared() { None } else { self.blocking(|s| s.mark(MARK_CLOCK_FLOOR_MS)).await? };
        if let Some(floor) = floor {
            self.clock.raise_floor(floor);
        }
        let mark = self.blocking(|s| s.mark(MARK_DOWN_COUNTER)).await?.unwrap_or(0).max(0) as u64;
        let now_us = (self.clock.now_ms().max(0) as u64).saturating_mul(1000);
        let start = now_us.max(mark);
        self.down_counter.store(start, Ordering::Relaxed);
        let wanted = start.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        let reserved = self.blocking(move |s| s.raise_mark(MARK_DOWN_COUNTER, wanted)).await?;
        self.down_mark.store(reserved.max(0) as u64, Ordering::Relaxed);
        info!(
            down_counter = start,
            down_counter_mark = reserved,
            clock_floor_ms = floor,
            "downlink counter resumes above its high-water mark"
        );
        self.persist_clock_floor().await;
        Ok(())
    }

    /// Writes the clock's floor, [`CLOCK_FLOOR_AHEAD_MS`] ahead of its reading, once less than
    /// half of the last one written is left.
    pub async fn persist_clock_floor(&self) {
        if self.store.is_shared() {
            return;
        }
        let now = self.clock.now_ms();
        if now.saturating_add(CLOCK_FLOOR_AHEAD_MS / 2) <= self.clock_floor_written.load(Ordering::Relaxed) {
            return;
        }
        let floor = now.saturating_add(CLOCK_FLOOR_AHEAD_MS);
        match self.blocking(move |s| s.raise_mark(MARK_CLOCK_FLOOR_MS, floor)).await {
            Ok(written) => {
                self.clock_floor_written.fetch_max(written, Ordering::Relaxed);
            }
            Err(e) => warn!(error = %e, "cannot write the clock's floor"),
        }
    }

    /// Rebuilds the hot maps from the store.
    async fn load(&self) -> EngineResult<()> {
        self.restore_marks().await?;
        let hashes = self.blocking(|s| s.all_password_hashes()).await?;
        for (sn, hash) in hashes {
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                self.passwords.insert(sn, hash);
            }
        }
        for org in self.blocking(|s| s.list_orgs()).await? {
            self.org_names.insert(org.id, Arc::from(org.name.as_str()));
        }
        let open = self.blocking(|s| s.open_executions()).await?;
        let ids: Vec<i64> =
            open.iter().map(|e| e.device_id).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let creds = self.blocking(move |s| s.credentials_for(&ids)).await?;
        for c in &creds {
            // Every open execution is inserted below, before any message is handled.
            let mut hot = DeviceHot::from_credentials(c);
            hot.open_loaded = true;
            self.devices.insert(c.sn.clone(), Arc::new(Mutex::new(hot)));
        }
        let count = open.len();
        for e in open {
            self.insert_open(&e);
        }
        info!(open_executions = count, devices = creds.len(), "engine state loaded");
        Ok(())
    }

    fn insert_open(&self, e: &ExecutionRow) {
        self.insert_open_execution(&e.sn, OpenExecution::from_row(e));
    }

    /// This engine as an `Arc`, for work spawned beyond `&self`; `None` once it is being dropped.
    fn arc(&self) -> Option<Arc<Engine>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }

    /// Adds an open execution to the device's hot state, if the device is hot (a device that
    /// is not reads its open executions from the store on its first message: `hot_device`).
    fn insert_open_execution(&self, sn: &str, open: OpenExecution) {
        let Some(hot) = self.devices.get(sn).map(|h| h.clone()) else {
            // A device without credentials cannot receive keys; its execution waits for an
            // initialisation, which loads it.
            return;
        };
        let mut hot = lock(&hot);
        if hot.open.iter().any(|o| o.id == open.id) {
            return;
        }
        self.execution_sn.insert(open.id, sn.to_string());
        hot.open.push(open);
    }

    /// Puts back into the hot state the executions whose ending failed to commit and that are
    /// still open in the store, so that they are delivered again; those that cannot be read yet
    /// are tried again at the next sweep.
    async fn restore_unrecorded_endings(&self) {
        let ids = std::mem::take(&mut *lock(&self.unrecorded_endings));
        if ids.is_empty() {
            return;
        }
        let mut again = Vec::new();
        for id in ids {
            match self.blocking(move |s| s.execution(id)).await {
                Ok(row) if row.state.is_open() => {
                    self.insert_open(&row);
                    info!(execution = id, "an ack whose record failed to commit: the download is sent again");
                    // An online device says no new hello: send it now, and the retry timer after.
                    let Some(hot) = self.devices.get(&row.sn).map(|h| h.clone()) else { continue };
                    let key = {
                        let mut h = lock(&hot);
                        if h.online {
                            self.signing_key(&mut h)
                        } else {
                            None
                        }
                    };
                    if let Some(key) = key {
                        self.deliver_open(&row.sn, &hot, &key, None, false).await;
                    }
                }
                Ok(_) | Err(EngineError::NotFound(_)) => {}
                Err(_) => again.push(id),
            }
        }
        lock(&self.unrecorded_endings).extend(again);
    }

    /// Reads the device's open executions from the store into its hot state.
    async fn load_open(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) {
        let device_id = lock(hot).device_id;
        match self.blocking(move |s| s.open_executions_for_device(device_id)).await {
            Ok(rows) => {
                for row in rows.iter().filter(|r| r.sn == sn) {
                    self.insert_open(row);
                }
                lock(hot).open_loaded = true;
            }
            Err(e) => warn!(sn, error = %e, "cannot read a device's open executions; next message retries"),
        }
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

    /// The next gateway → device counter: above the last, and within the durable mark. `None`
    /// when the mark cannot be raised (the store is down): nothing is sent, and the retry timer
    /// or the next hello sends it later.
    fn next_down_counter(&self) -> Option<u64> {
        let now_us = (self.clock.now_ms().max(0) as u64).saturating_mul(1000);
        let mut last = self.down_counter.load(Ordering::Relaxed);
        let next = loop {
            let next = now_us.max(last.saturating_add(1));
            match self.down_counter.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(actual) => last = actual,
            }
        };
        let mark = self.down_mark.load(Ordering::Relaxed);
        if next > mark && !self.reserve_down_counter_now(next) {
            return None;
        }
        if next.saturating_add(DOWN_COUNTER_BLOCK / 2) > mark {
            self.reserve_down_counter_later(next);
        }
        Some(next)
    }

    /// Raises the durable mark above `counter` before it is used (a blocking store write: it
    /// happens when the clock jumped ahead of the background reservation).
    fn reserve_down_counter_now(&self, counter: u64) -> bool {
        let wanted = counter.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        let raise = || self.store.raise_mark(MARK_DOWN_COUNTER, wanted);
        let raised = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(raise)
            }
            _ => raise(),
        };
        match raised {
            Ok(mark) => {
                self.down_mark.fetch_max(mark.max(0) as u64, Ordering::Relaxed);
                counter <= mark.max(0) as u64
            }
            Err(e) => {
                error!(error = %e, "cannot reserve downlink counters; nothing is sent until the store answers");
                false
            }
        }
    }

    /// Reserves the next block in the background, once at a time.
    fn reserve_down_counter_later(&self, counter: u64) {
        if self.down_reserving.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(engine), Ok(runtime)) = (self.arc(), tokio::runtime::Handle::try_current()) else {
            self.down_reserving.store(false, Ordering::Release);
            return;
        };
        let wanted = counter.saturating_add(DOWN_COUNTER_BLOCK).min(i64::MAX as u64) as i64;
        runtime.spawn(async move {
            match engine.blocking(move |s| s.raise_mark(MARK_DOWN_COUNTER, wanted)).await {
                Ok(mark) => {
                    engine.down_mark.fetch_max(mark.max(0) as u64, Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "cannot reserve downlink counters ahead"),
            }
            engine.down_reserving.store(false, Ordering::Release);
        });
    }

    // ---------------------------------------------------------------- MQTT authentication

    /// CONNECT check: `client_id == username == SN` with that device's password, or the bootstrap
    /// identity `init@{SN}` with the bootstrap password of a live GUDID for that SN
    /// (`Gudid::bootstrap_password`), checked against the hash stored at provisioning.
    pub fn authenticate(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if let Some(verdict) = self.authenticate_in_memory(client_id, username, password) {
            return verdict;
        }
        if let Some(sn) = topic::bootstrap_sn(client_id) {
            if topic::validate_name(sn).is_err() {
                return Err("bad_sn");
            }
            // An unknown SN and an SN without a live GUDID look the same from outside.
            let live = self.store.live_bootstrap_hashes(Some(sn), self.clock.now_ms(), None).map_err(|_| "store")?;
            if live.is_empty() {
                return Err("no_live_gudid");
            }
            let proven = live.iter().any(|(_, hash)| crate::mosquitto::verify_password_hash(password.as_bytes(), hash));
            return if proven { Ok(()) } else { Err("bad_bootstrap") };
        }
        match self.store.device_org_by_sn(client_id) {
            Ok(Some(_)) => Err("not_initialised"),
            Ok(None) => Err("unknown_sn"),
            Err(_) => Err("store"),
        }
    }

    /// The CONNECT check's verdict when memory alone decides it (a device whose password hash is
    /// cached, a malformed identity), without touching the store: the endpoint calls it on its
    /// async thread and takes a blocking thread only for `None` (a bootstrap identity, whose live
    /// GUDIDs are in the store, or an SN not cached).
    pub fn authenticate_in_memory(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Option<Result<(), &'static str>> {
        if client_id != username {
            return Some(Err("client_id_mismatch"));
        }
        if topic::bootstrap_sn(client_id).is_some() {
            return None;
        }
        if topic::validate_name(client_id).is_err() {
            return Some(Err("bad_sn"));
        }
        let expected = self.passwords.get(client_id)?;
        let given = init::password_hash(password.as_bytes());
        Some(if rki_protocol::secret::ct_eq(&given, expected.value()) { Ok(()) } else { Err("bad_password") })
    }

    // ---------------------------------------------------------------- inbound

    /// Queues an inbound message on its device's shard. Waits when the shard is full, which
    /// slows the broker link down rather than dropping.
    pub async fn submit(&self, message: InboundMessage) {
        let shard = shard_of(&message.topic);
        if self.shards[shard].send(message).await.is_err() {
            warn!("inbound shard closed");
        }
    }

    async fn handle(&self, msg: InboundMessage) {
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
            Some(topic::Inbound::BackendTasks { .. }) => reject("task_request", Rejection::WrongTopic),
            None => reject("unknown", Rejection::WrongTopic),
        }
    }

    /// The device's hot state, loaded from the store if it is not in the maps yet.
    async fn hot_device(&self, sn: &str) -> Result<Arc<Mutex<DeviceHot>>, Rejection> {
        if let Some(hot) = self.devices.get(sn).map(|h| h.clone()) {
            if !lock(&hot).open_loaded {
                self.load_open(sn, &hot).await;
            }
            return Ok(hot);
        }
        let owned = sn.to_string();
        let creds = self.blocking(move |s| s.credentials(&owned)).await.map_err(|e| match e {
            EngineError::Store(_) => Rejection::StoreUnavailable,
            _ => Rejection::UnknownDevice,
        })?;
        let Some(creds) = creds else {
            let owned = sn.to_string();
            let known = self.blocking(move |s| s.device_org_by_sn(&owned)).await.ok().flatten().is_some();
            return Err(if known { Rejection::NotInitialised } else { Rejection::UnknownDevice });
        };
        let hot = self
            .devices
            .entry(sn.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(DeviceHot::from_credentials(&creds))))
            .clone();
        // Read after the device is in the map: an execution committed later is added to the map's
        // entry by its creator (`create_task`), one committed earlier is read here.
        if !lock(&hot).open_loaded {
            self.load_open(sn, &hot).await;
        }
        Ok(hot)
    }

    fn signing_key(&self, hot: &mut DeviceHot) -> Option<MacKey> {
        if hot.signing_key.is_none() {
            match self.keys.open_signing_key(&hot.sealed_signing_key) {
                Ok(key) => hot.signing_key = Some(key),
                Err(e) => {
                    error!(device_id = hot.device_id, error = %e, "cannot open a device signing key");
                    return None;
                }
            }
        }
        hot.signing_key.as_ref().map(MacKey::clone_secret)
    }

    async fn handle_device_up(&self, sn: &str, payload: &[u8]) {
        let unverified = match frame::open(payload) {
            Ok(u) => u,
            Err(e) => return reject("device", Rejection::Frame(e.reason())),
        };
        let kind = unverified.peek().message.kind().as_str();
        if unverified.peek().party != sn {
            return reject(kind, Rejection::PartyMismatch);
        }
        let hot = match self.hot_device(sn).await {
            Ok(hot) => hot,
            Err(why) => return reject(kind, why),
        };
        let (key, last_counter) = {
            let mut guard = lock(&hot);
            let Some(key) = self.signing_key(&mut guard) else { return reject(kind, Rejection::NotInitialised) };
            (key, guard.last_counter)
        };
        let verified = match unverified.verify(&key) {
            Ok(v) => v,
            // Several nodes: the device may have re-initialised through another one since this
            // node cached its keys; read them again and check once more.
            Err(_) if self.is_shared() && self.refresh_credentials(sn, &hot).await => {
                let key = {
                    let mut guard = lock(&hot);
                    let Some(key) = self.signing_key(&mut guard) else {
                        return reject(kind, Rejection::NotInitialised);
                    };
                    key
                };
                match frame::open(payload).and_then(|u| u.verify(&key)) {
                    Ok(v) => v,
                    Err(_) => return reject(kind, Rejection::BadMac),
                }
            }
            Err(_) => return reject(kind, Rejection::BadMac),
        };
        let proof = verified.proof;
        let body = verified.body;
        match body.message {
            Message::Bye => self.on_bye(&hot, body.counter),
            Message::Hello(hello) if body.counter > last_counter => {
                self.on_hello(sn, &hot, &key, body.counter, hello, proof).await
            }
            Message::Ack(ack) if body.counter > last_counter => self.on_ack(sn, &hot, body.counter, ack, proof).await,
            Message::DeviceRefusal(refusal) if body.counter > last_counter => {
                self.on_device_refusal(sn, &hot, body.counter, refusal, proof).await
            }
            Message::Hello(_) | Message::Ack(_) | Message::DeviceRefusal(_) => reject(kind, Rejection::Replay),
            _ => reject(kind, Rejection::WrongTopic),
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
    fn on_bye(&self, hot: &Arc<Mutex<DeviceHot>>, counter: u64) {
        let mut h = lock(hot);
        if counter < h.hello_counter {
            drop(h);
            return reject("bye", Rejection::StaleBye);
        }
        if h.online {
            h.online = false;
            self.online.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(m::DEVICES_CONNECTED).set(self.online.load(Ordering::Relaxed) as f64);
        }
    }

    async fn on_hello(
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
        let (device_id, stale, unlock) = {
            let mut h = lock(hot);
            h.last_counter = counter;
            h.hello_counter = counter;
            // The device's own word on its presence replaces any doubt after a broker outage.
            h.presence_unsure = false;
            if !h.online {
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
            (h.device_id, stale, h.unlock_pending && hello.locked)
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
        if unlock {
            self.send_unlock(sn, key, device_id);
        }
        self.deliver_open(sn, hot, key, Some(hello_at), true).await;
    }

    /// Publishes every open execution of the device that is due: all of them on a hello, the
    /// ones whose backoff elapsed on a retry sweep.
    async fn deliver_open(
        &self,
        sn: &str,
        hot: &Arc<Mutex<DeviceHot>>,
        key: &MacKey,
        hello_at: Option<Instant>,
        on_hello: bool,
    ) {
        let now = self.clock.now_ms();
        let ticks = self.clock.ticks_ms();
        let mut delivered = Vec::new();
        {
            let mut h = lock(hot);
            let generation = h.generation;
            for e in h.open.iter_mut() {
                if e.deadline <= now || e.generation != generation {
                    continue;
                }
                if !on_hello {
                    let backoff = retry_backoff_ms(self.retry_initial_ms(), e.sends);
                    match e.last_sent {
                        Some(at) if ticks - at < backoff => continue,
                        _ => {}
                    }
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
    fn publish_download(&self, sn: &str, key: &MacKey, e: &mut OpenExecution, hello_at: Option<Instant>) -> bool {
        let Some(counter) = self.next_down_counter() else { return false };
        let body = Body {
            party: sn.to_string(),
            counter,
            message: Message::Download(message::Download {
                execution_id: e.id as u64,
                slot: KeySlot(e.slot),
                key_type: KeyType::parse(&e.key_type).unwrap_or(KeyType::Ipek),
                key_block: e.key_block.clone(),
                key_id: e.key_id.clone(),
                kcv: hex::decode(&e.kcv).unwrap_or_default(),
            }),
        };
        match frame::seal(key, &body) {
            Ok(bytes) => {
                self.outbound.publish(topic::device_down(sn), bytes);
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
    async fn rewrap(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>, stale: Vec<OpenExecution>) {
        let (generation, kbpk_aes, kbpk_tdes) = {
            let h = lock(hot);
            (h.generation, h.sealed_kbpk_aes.clone(), h.sealed_kbpk_tdes.clone())
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
            let algorithm = KeyAlgorithm::parse(&source.algorithm).unwrap_or(KeyAlgorithm::Tdes2);
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

    fn send_unlock(&self, sn: &str, key: &MacKey, device_id: i64) {
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

    async fn on_ack(
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
        let outcome = {
            let mut h = lock(hot);
            let position = h.open.iter().position(|e| e.id == id);
            match position {
                None => Err(()),
                Some(i) => {
                    let e = &h.open[i];
                    match check_ack(e, &ack) {
                        Err(why) => {
                            drop(h);
                            return reject("ack", why);
                        }
                        Ok(matched) => {
                            let e = h.open.swap_remove(i);
                            h.last_counter = counter;
                            Ok((h.device_id, e, matched))
                        }
                    }
                }
            }
        };
        let (device_id, execution, matched) = match outcome {
            Ok(found) => found,
            Err(()) => return self.on_ack_for_closed(sn, hot, counter, &ack, _proof).await,
        };
        self.execution_sn.remove(&id);
        self.refusals.remove(&id);
        let succeeded = matched.is_some();
        let state = if succeeded { ExecutionState::Succeeded } else { ExecutionState::Failed };
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
    async fn on_device_refusal(
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

    /// An ack whose execution is not open here: a duplicate of a recorded ack, another device's
    /// execution, or an unknown one.
    async fn on_ack_for_closed(
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
            Ok(row) if row.device_id != device_id || row.sn != sn => reject("ack", Rejection::ForeignExecution),
            Ok(row) if row.state.is_open() => {
                // Open in the store but not in this node's cache: load it and retry once.
                self.insert_open(&row);
                let again = lock(hot).open.iter().any(|e| e.id == id);
                if again {
                    Box::pin(self.on_ack(sn, hot, counter, ack.clone(), proof)).await;
                } else {
                    reject("ack", Rejection::NotOpen);
                }
            }
            Ok(_) => {
                // Already ended: an idempotent re-ack. Not an error; nothing changes but the
                // counter.
                metrics::counter!(m::DUPLICATE_ACKS_TOTAL).increment(1);
                lock(hot).last_counter = counter;
                self.queue(Write::Counter { device_id, counter }, None).await;
            }
        }
    }

    /// Records a send whose `Delivered` write waits: an ack within [`DELIVERED_WRITE_DELAY_MS`]
    /// carries it in its ending (one write of the execution's row instead of two), otherwise the
    /// delivery writer writes it.
    fn defer_delivered(&self, execution_id: i64, at: Millis, deadline: Millis) {
        let mut guard = lock(&self.unwritten);
        let unwritten = &mut *guard;
        match unwritten.by_execution.entry(execution_id) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().0.add(at),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((Sends::one(at), deadline));
                unwritten.order.push_back((Instant::now(), execution_id));
            }
        }
    }

    /// The execution's sends not written yet, for its ending.
    fn take_sends(&self, execution_id: i64) -> Option<Sends> {
        lock(&self.unwritten).by_execution.remove(&execution_id).map(|(sends, _)| sends)
    }

    /// Takes the deferred sends that `which` selects.
    fn due_sends(&self, which: DueSends) -> Vec<(i64, Sends)> {
        let mut guard = lock(&self.unwritten);
        let unwritten = &mut *guard;
        let mut due = Vec::new();
        match which {
            DueSends::OlderThan(age) => {
                while let Some((first, id)) = unwritten.order.front().copied() {
                    if first.elapsed() < age {
                        break;
                    }
                    unwritten.order.pop_front();
                    if let Some((sends, _)) = unwritten.by_execution.remove(&id) {
                        due.push((id, sends));
                    }
                }
            }
            DueSends::DeadlineBy(at) => unwritten.by_execution.retain(|id, (sends, deadline)| {
                let keep = *deadline > at;
                if !keep {
                    due.push((*id, *sends));
                }
                keep
            }),
            DueSends::All => {
                unwritten.order.clear();
                due.extend(unwritten.by_execution.drain().map(|(id, (sends, _))| (id, sends)));
            }
        }
        if unwritten.by_execution.is_empty() {
            unwritten.order.clear();
        }
        due
    }

    /// Queues the `Delivered` writes of deferred sends: one per send, the first at its time, the
    /// others at the last one's.
    async fn write_sends(&self, due: Vec<(i64, Sends)>) {
        for (execution_id, sends) in due {
            self.queue(Write::Delivered { execution_id, at: sends.first_at }, None).await;
            for _ in 1..sends.count {
                self.queue(Write::Delivered { execution_id, at: sends.last_at }, None).await;
            }
        }
    }

    fn delivered_write_delay(&self) -> Duration {
        Duration::from_millis(DELIVERED_WRITE_DELAY_MS.min(self.retry_initial_ms() / 2).max(0) as u64)
    }

    async fn queue(&self, write: Write, ack: Option<AckDone>) {
        if self.commits.send(Pending { write, ack, reply: None }).await.is_err() {
            error!("committer stopped");
        }
    }

    /// Queues writes and waits until they are durable; returns the outcome of the batch that
    /// carried the last one.
    async fn write_durably(&self, writes: Vec<Write>) -> EngineResult<BatchOutcome> {
        let mut last = None;
        let n = writes.len();
        for (i, write) in writes.into_iter().enumerate() {
            let reply = if i + 1 == n {
                let (tx, rx) = oneshot::channel();
                last = Some(rx);
                Some(tx)
            } else {
                None
            };
            self.commits
                .send(Pending { write, ack: None, reply })
                .await
                .map_err(|_| EngineError::Internal("committer stopped".into()))?;
        }
        match last {
            Some(rx) => {
                rx.await.map_err(|_| EngineError::Internal("committer stopped".into()))?.map_err(EngineError::from)
            }
            None => Ok(BatchOutcome::default()),
        }
    }

    // ---------------------------------------------------------------- initialisation

    async fn handle_init(&self, sn: &str, payload: &[u8]) {
        let unverified = match frame::open(payload) {
            Ok(u) => u,
            Err(e) => {
                metrics::counter!(m::GUDID_REFUSALS_TOTAL, "reason" => e.reason()).increment(1);
                return reject("create_key", Rejection::Frame(e.reason()));
            }
        };
        let counter = unverified.peek().counter;
        // The refusal sent names the code; the metric may be more precise (a GUDID of another
        // organization is, to the terminal, a GUDID for another device).
        let refuse_as = |code: RefusalCode, reason: &'static str| {
            metrics::counter!(m::GUDID_REFUSALS_TOTAL, "reason" => reason).increment(1);
            metrics::counter!(m::REJECTED_MESSAGES_TOTAL, "kind" => "create_key", "reason" => reason).increment(1);
            info!(sn, reason, "CreateKey refused");
            self.publish_refusal(sn, counter, code);
        };
        let refuse = |code: RefusalCode| refuse_as(code, code.as_str());
        if unverified.peek().party != sn {
            return refuse(RefusalCode::Malformed);
        }
        let Message::CreateKey(request) = unverified.peek().message.clone() else {
            return refuse(RefusalCode::Malformed);
        };
        let gudid_id = request.gudid_id.to_vec();
        let gudid = match self.blocking(move |s| s.gudid_by_id(&gudid_id)).await {
            Ok(Some(g)) => g,
            Ok(None) => return refuse(RefusalCode::UnknownGudid),
            Err(_) => return refuse(RefusalCode::UnknownGudid),
        };
        // The MAC key is kept sealed under the master key: a copy of the store cannot tag a
        // CreateKey. A row that does not open (a tampered store) is as good as unknown.
        let mac_key = match self.keys.open_gudid_mac_key(&gudid.sealed_mac_key) {
            Ok(key) => key,
            Err(e) => {
                warn!(sn, error = %e, "a GUDID's sealed MAC key does not open");
                return refuse_as(RefusalCode::UnknownGudid, "gudid_unsealable");
            }
        };
        let create_key_body = unverified.body_bytes().to_vec();
        if unverified.verify(&mac_key).is_err() {
            return refuse(RefusalCode::BadTag);
        }
        let owned = sn.to_string();
        let device = match self.blocking(move |s| s.device_org_by_sn(&owned)).await {
            Ok(Some(d)) => d,
            _ => return refuse(RefusalCode::UnknownDevice),
        };
        if gudid.org_id != device.1 {
            return refuse_as(RefusalCode::GudidWrongDevice, "gudid_foreign_org");
        }
        if gudid.device_id != device.0 {
            return refuse(RefusalCode::GudidWrongDevice);
        }
        if gudid.used_at.is_some() {
            return refuse(RefusalCode::GudidUsed);
        }
        // A revoked GUDID is, to the terminal, no longer valid: the same code as an expired one
        // (PROTOCOL.md §7.3); the metric says which.
        if gudid.revoked_at.is_some() {
            return refuse_as(RefusalCode::GudidExpired, "gudid_revoked");
        }
        if self.clock.now_ms() >= gudid.expires_at {
            return refuse(RefusalCode::GudidExpired);
        }
        if let Err(code) =
            self.answer_create_key(sn, &gudid, device.0, &mac_key, &request, counter, &create_key_body).await
        {
            refuse(code)
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer_create_key(
        &self,
        sn: &str,
        gudid: &GudidRow,
        device_id: i64,
        mac_key: &MacKey,
        request: &CreateKey,
        counter: u64,
        create_key_body: &[u8],
    ) -> Result<(), RefusalCode> {
        let ephemeral = Ephemeral::random().map_err(|_| RefusalCode::Malformed)?;
        let answer = Body {
            party: sn.to_string(),
            counter: self.next_down_counter().ok_or(RefusalCode::Malformed)?,
            message: Message::CreateKeyAnswer(message::CreateKeyAnswer {
                gudid_id: request.gudid_id,
                gateway_public: ephemeral.public(),
            }),
        };
        let answer_frame = frame::seal(mac_key, &answer).map_err(|_| RefusalCode::Malformed)?;
        let answer_body = frame::body_bytes_of(&answer_frame).ok_or(RefusalCode::Malformed)?.to_vec();
        let secrets =
            init::derive_device_secrets(ephemeral, &request.device_public, mac_key, create_key_body, &answer_body)
                .map_err(|_| RefusalCode::Malformed)?;
        let sealed = self.keys.seal_device_secrets(&secrets).map_err(|_| RefusalCode::Malformed)?;
        let password_hash = init::password_hash(secrets.mqtt_password.expose_secret());
        let broker_password_hash = crate::mosquitto::password_hash(secrets.mqtt_password.expose_secret())
            .map_err(|_| RefusalCode::Malformed)?;
        let creds = NewCredentials {
            broker_password_hash,
            signing_key: sealed.signing_key,
            kbpk_aes: sealed.kbpk_aes,
            kbpk_tdes: sealed.kbpk_tdes,
            password_hash: password_hash.to_vec(),
            counter,
            x_pos_device_id: request.x_pos_device_id.clone(),
        };
        let now = self.clock.now_ms();
        let row_id = gudid.id;
        // Through the committer, so a storm of initialisations shares fsyncs.
        let outcome = self
            .write_durably(vec![Write::Initialise { gudid_row: row_id, device_id, creds, at: now }])
            .await
            .map_err(|_| RefusalCode::Malformed)?;
        let stored = outcome
            .initialised
            .into_iter()
            .find(|(row, _)| *row == row_id)
            .and_then(|(_, creds)| creds)
            .ok_or(RefusalCode::GudidUsed)?;
        // The old signing key is invalid from here on.
        let hot = Arc::new(Mutex::new(DeviceHot::from_credentials(&stored)));
        let previous = self.devices.insert(sn.to_string(), hot.clone());
        if let Some(previous) = previous {
            let previous = lock(&previous);
            let mut h = lock(&hot);
            h.open = previous.open.clone();
            h.open_loaded = previous.open_loaded;
            h.online = previous.online;
            if previous.online {
                // Keep the online count: the device reconnects under its new identity.
            }
        } else {
            // Executions created before this device ever initialised (or while it was not hot)
            // wait in the store.
            self.load_open(sn, &hot).await;
        }
        {
            let mut h = lock(&hot);
            h.signing_key = Some(secrets.signing_key.clone_secret());
        }
        self.passwords.insert(sn.to_string(), password_hash);
        // An external broker learns the new credentials through the registry sync; a device that
        // reconnects before the broker reloaded is refused once and retries.
        self.notify_registry_changed();
        // The broker knows the new password before the answer that lets the device use it.
        let identity = crate::dynsec::BrokerIdentity::Device(sn.to_string());
        self.outbound.broker_passwords(vec![(identity, secrets.mqtt_password.clone_secret())]).await;
        self.outbound.publish(topic::device_down(sn), answer_frame);
        metrics::counter!(m::INITIALISATIONS_TOTAL).increment(1);
        info!(sn, "device initialised");
        Ok(())
    }

    fn publish_refusal(&self, sn: &str, request_counter: u64, code: RefusalCode) {
        let Some(counter) = self.next_down_counter() else { return };
        let body = Body {
            party: sn.to_string(),
            counter,
            message: Message::Refusal(message::Refusal { request_counter, code }),
        };
        if let Ok(bytes) = frame::seal(&MacKey::public_refusal_key(), &body) {
            self.outbound.publish(topic::device_down(sn), bytes);
        }
    }

    // ---------------------------------------------------------------- operator actions

    /// GUDID provisioning: one fresh GUDID per SN, each shown once (the text returned), all or
    /// nothing. Each GUDID's MAC key is sealed under the master key and its bootstrap password
    /// kept only as a salted hash; the GUDID itself is never stored. A new GUDID revokes the
    /// SN's live one. Audited by the store in the same transaction.
    pub async fn provision_gudids(
        &self,
        org_id: i64,
        sns: &[String],
        actor: Actor,
    ) -> EngineResult<Vec<(Zeroizing<String>, ProvisionedGudid)>> {
        let now = self.clock.now_ms();
        let expires_at = now + (GUDID_VALIDITY_SECONDS as i64) * 1000;
        let mut texts = Vec::with_capacity(sns.len());
        let mut rows = Vec::with_capacity(sns.len());
        let mut bootstrap_passwords = Vec::with_capacity(sns.len());
        for sn in sns {
            let gudid = init::Gudid::random().map_err(|_| EngineError::Internal("no randomness".into()))?;
            bootstrap_passwords
                .push((crate::dynsec::BrokerIdentity::Bootstrap(sn.clone()), gudid.bootstrap_password(sn)));
            let bootstrap_hash = crate::mosquitto::password_hash(gudid.bootstrap_password(sn).expose_secret())
                .map_err(EngineError::Internal)?;
            let sealed_mac_key = self
                .keys
                .seal_gudid_mac_key(&gudid.mac_key())
                .map_err(|e| EngineError::Internal(format!("sealing a GUDID: {e}")))?;
            rows.push(NewGudid {
                sn: sn.clone(),
                gudid_id: gudid.id().to_vec(),
                sealed_mac_key,
                bootstrap_hash,
                expires_at,
            });
            texts.push(gudid.expose_text());
        }
        let provisioned = self.blocking(move |s| s.provision_gudids(org_id, &rows, now, &actor)).await?;
        // Not awaited: a large import would hold the API call while the broker saves each change.
        tokio::spawn(self.outbound.broker_passwords(bootstrap_passwords));
        // An external broker's password file gains the SNs' bootstrap identities now (and loses
        // those of the GUDIDs revoked).
        self.notify_registry_changed();
        Ok(texts.into_iter().zip(provisioned).collect())
    }

    /// Revokes a live GUDID: it no longer opens `init@{SN}` nor initialises. Audited by the
    /// store in the same transaction.
    pub async fn revoke_gudid(&self, org_id: i64, id: i64, actor: Actor) -> EngineResult<GudidRow> {
        let now = self.clock.now_ms();
        let row = self.blocking(move |s| s.revoke_gudid(org_id, id, now, &actor)).await?;
        self.notify_registry_changed();
        info!(sn = %row.sn, gudid = id, "GUDID revoked");
        Ok(row)
    }

    pub async fn device(&self, org_id: i64, sn: &str) -> EngineResult<DeviceRow> {
        let owned = sn.to_string();
        self.blocking(move |s| s.device(org_id, &owned)).await
    }

    /// Whether the device is online (its last presence message was a hello).
    pub fn is_online(&self, sn: &str) -> bool {
        self.devices.get(sn).map(|h| lock(&h).online).unwrap_or(false)
    }

    /// Declares that other gateway nodes share this store (external broker mode).
    pub fn set_shared_store(&self, shared: bool) {
        self.shared_store.store(shared, Ordering::Relaxed);
    }

    /// Sets the first re-delivery delay (1 s at least); it doubles up to [`RETRY_MAX_MS`].
    pub fn set_retry_initial_ms(&self, ms: i64) {
        self.retry_initial_ms.store(ms.clamp(1000, RETRY_MAX_MS), Ordering::Relaxed);
    }

    fn retry_initial_ms(&self) -> i64 {
        self.retry_initial_ms.load(Ordering::Relaxed)
    }

    fn is_shared(&self) -> bool {
        self.shared_store.load(Ordering::Relaxed)
    }

    /// Several nodes: re-reads the device's credentials when another node may have
    /// re-initialised it (a MAC that does not verify, an execution of a newer generation).
    /// Returns whether the cached ones were stale and are replaced.
    async fn refresh_credentials(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) -> bool {
        let owned = sn.to_string();
        let Ok(Some(creds)) = self.blocking(move |s| s.credentials(&owned)).await else { return false };
        let mut h = lock(hot);
        if creds.generation == h.generation && creds.signing_key == h.sealed_signing_key {
            return false;
        }
        h.device_id = creds.device_id;
        h.sealed_signing_key = creds.signing_key;
        h.signing_key = None;
        h.generation = creds.generation;
        h.sealed_kbpk_aes = creds.kbpk_aes;
        h.sealed_kbpk_tdes = creds.kbpk_tdes;
        h.last_counter = h.last_counter.max(creds.last_counter);
        h.unlock_pending = creds.unlock_pending;
        info!(sn, generation = h.generation, "credentials re-read: the device re-initialised through another node");
        true
    }

    /// Replaces the device's cached open executions with the store's, keeping the retry state of
    /// the ones already known.
    async fn refresh_open(&self, sn: &str, hot: &Arc<Mutex<DeviceHot>>) {
        let device_id = lock(hot).device_id;
        let Ok(rows) = self.blocking(move |s| s.open_executions_for_device(device_id)).await else { return };
        let ids: std::collections::HashSet<i64> = rows.iter().map(|r| r.id).collect();
        let gone: Vec<i64> = {
            let mut h = lock(hot);
            let gone = h.open.iter().filter(|e| !ids.contains(&e.id)).map(|e| e.id).collect();
            h.open.retain(|e| ids.contains(&e.id));
            gone
        };
        for id in gone {
            self.execution_sn.remove(&id);
            self.refusals.remove(&id);
        }
        for row in rows.iter().filter(|r| r.sn == sn) {
            self.insert_open(row);
        }
    }

    /// Signals that devices were registered or (re)initialised.
    pub fn notify_registry_changed(&self) {
        self.registry.notify_one();
    }

    /// Waits for the next registry change.
    pub async fn registry_changed(&self) {
        self.registry.notified().await;
    }

    pub fn online_count(&self) -> i64 {
        self.online.load(Ordering::Relaxed)
    }

    /// Resolves a target to device ids of the organization; unknown SNs are an error naming them.
    pub async fn resolve_target(&self, org_id: i64, target: &Target) -> EngineResult<Vec<i64>> {
        match target {
            Target::Group(name) => {
                let name = name.clone();
                let group = self.blocking(move |s| s.group_by_name(org_id, &name)).await?;
                self.blocking(move |s| s.group_member_ids(group.id)).await
            }
            Target::Devices(sns) => {
                if sns.is_empty() {
                    return Err(EngineError::Invalid("no device named".into()));
                }
                let sns = sns.clone();
                let found = self.blocking(move |s| s.device_ids_by_sn(org_id, &sns)).await?;
                let unknown: Vec<String> =
                    found.iter().filter(|(_, id)| id.is_none()).map(|(sn, _)| sn.clone()).collect();
                if !unknown.is_empty() {
                    return Err(EngineError::NotFound(format!("unknown SN(s): {}", unknown.join(", "))));
                }
                Ok(found.into_iter().filter_map(|(_, id)| id).collect())
            }
        }
    }

    /// Which devices are ready for a task, and why the others are not.
    pub async fn preview(&self, org_id: i64, spec: &TaskSpec) -> EngineResult<Preview> {
        if !KeySlot(spec.slot).is_writable_by_rki() {
            return Err(EngineError::Invalid(format!("slot {} cannot be written by RKI (use 1, 4 or 8)", spec.slot)));
        }
        let expiry_days = spec.expiry_days.unwrap_or(EXPIRY_DAYS_DEFAULT);
        if expiry_days == 0 || expiry_days > EXPIRY_DAYS_MAX {
            return Err(EngineError::Invalid(format!("expiry_days must be 1 to {EXPIRY_DAYS_MAX}")));
        }
        let ids = self.resolve_target(org_id, &spec.target).await?;
        if ids.len() > TASK_DEVICES_MAX {
            return Err(EngineError::Invalid(format!("a task may target at most {TASK_DEVICES_MAX} devices")));
        }
        let key_source = match &spec.key_source {
            Some(name) => {
                let name = name.clone();
                Some(self.blocking(move |s| s.key_source_by_name(org_id, &name)).await?)
            }
            None => None,
        };
        // A large target is read in two halves on two reader connections, beside the open
        // executions: for a million devices this read is most of the preview, and serial time.
        let (first, second) = if ids.len() >= PARALLEL_READ_MIN {
            let second = ids[ids.len() / 2..].to_vec();
            let mut first = ids;
            first.truncate(first.len() - second.len());
            (first, second)
        } else {
            (ids, Vec::new())
        };
        let (mut devices, rest, pending) = tokio::try_join!(
            self.blocking(move |s| s.devices_by_ids(&first)),
            self.blocking(move |s| if second.is_empty() { Ok(Vec::new()) } else { s.devices_by_ids(&second) }),
            self.blocking(move |s| s.open_execution_device_ids(org_id)),
        )?;
        devices.extend(rest);
        let pending: std::collections::HashSet<i64> = pending.into_iter().collect();
        // Without an explicit key source, the devices' common assignment is used.
        let chosen = match &key_source {
            Some(k) => Some(k.id),
            None => {
                let assigned: std::collections::BTreeSet<i64> =
                    devices.iter().filter_map(|d| d.assigned_key_source).collect();
                if assigned.len() > 1 {
                    return Err(EngineError::Invalid(
                        "the devices are assigned to different key sources; name one with key_source".into(),
                    ));
                }
                assigned.into_iter().next()
            }
        };
        let mut preview = Preview {
            key_source: None,
            slot: spec.slot,
            expiry_days,
            ready: Vec::new(),
            not_ready: Vec::new(),
            never_seen: Vec::new(),
            ready_ids: Vec::new(),
            key_source_id: chosen,
        };
        if let Some(id) = chosen {
            preview.key_source = Some(self.blocking(move |s| s.key_source(org_id, id)).await?.name);
        }
        for d in devices {
            let reasons = readiness(&d, chosen, pending.contains(&d.id));
            if reasons.iter().any(|r| r.blocks()) {
                preview.not_ready.push(NotReadyDevice {
                    sn: d.sn,
                    reasons: reasons.iter().map(|r| r.as_str()).collect(),
                    meanings: reasons.iter().map(|r| r.meaning()).collect(),
                });
            } else {
                if reasons.contains(&NotReady::NeverSeen) {
                    preview.never_seen.push(d.sn.clone());
                }
                preview.ready.push(d.sn);
                preview.ready_ids.push(d.id);
            }
        }
        Ok(preview)
    }

    /// Creates a task for every ready device of the preview: derives and wraps one key per
    /// device, persists the task and its executions, then delivers to the online devices.
    pub async fn create_task(&self, org_id: i64, spec: &TaskSpec, actor: &str) -> EngineResult<(TaskRow, Preview)> {
        if let Some(request_id) = spec.request_id {
            if let Some(task) = self.blocking(move |s| s.task_by_request_id(org_id, request_id)).await? {
                let preview = self.preview(org_id, spec).await.unwrap_or_else(|_| Preview {
                    key_source: Some(task.key_source.clone()),
                    slot: task.slot,
                    expiry_days: 0,
                    ready: vec![],
                    not_ready: vec![],
                    never_seen: vec![],
                    ready_ids: vec![],
                    key_source_id: Some(task.key_source_id),
                });
                return Ok((task, preview));
            }
        }
        let began = Instant::now();
        let mut preview = self.preview(org_id, spec).await?;
        let preview_ms = began.elapsed().as_millis();
        let Some(key_source_id) = preview.key_source_id else {
            return Err(EngineError::Conflict("no key source: assign one to the devices or name it".into()));
        };
        if preview.ready_ids.is_empty() {
            return Err(EngineError::Conflict(format!(
                "no device is ready ({} not ready); see the preview for the reasons",
                preview.not_ready.len()
            )));
        }
        let source = self.blocking(move |s| s.key_source(org_id, key_source_id)).await?;
        let algorithm = KeyAlgorithm::parse(&source.algorithm)
            .ok_or_else(|| EngineError::Internal(format!("key source algorithm {}", source.algorithm)))?;
        let count = preview.ready_ids.len() as i64;
        let first_serial = self.blocking(move |s| s.allocate_serials(key_source_id, count)).await?;
        let key_set_id = hex::decode(&source.key_set_id).map_err(|_| EngineError::Internal("key set id".into()))?;
        let engine = self.arc().ok_or_else(|| EngineError::Internal("the engine is stopping".into()))?;
        let now = self.clock.now_ms();
        let new_task = NewTask {
            org_id,
            key_source_id,
            slot: spec.slot,
            key_type: KeyType::Ipek.as_str().into(),
            created_at: now,
            expires_at: now + i64::from(preview.expiry_days) * (SECONDS_PER_DAY as i64) * 1000,
            created_by: actor.to_string(),
            request_id: spec.request_id,
            executions: Vec::new(),
        };
        let ready_ids = std::mem::take(&mut preview.ready_ids);
        let created = tokio::task::spawn_blocking(move || {
            let mut build = TaskBuild::default();
            let result = engine.store.create_task_with(&new_task, &mut |sink| {
                build = TaskBuild::default();
                let job = ChunkJob {
                    task: &new_task,
                    sealed_bdk: &source.sealed,
                    algorithm,
                    key_set_id: &key_set_id,
                    first_serial: first_serial as u64,
                };
                let filled = engine.fill_task(sink, &job, &ready_ids, &mut build);
                build.filled = Some(Instant::now());
                filled
            });
            build.committed = build.filled.map(|at| at.elapsed());
            (result, build, ready_ids)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        let (result, build, ready_ids) = created;
        preview.ready_ids = ready_ids;
        let task = match (result, build.failure) {
            (Ok(task), _) => task,
            (Err(_), Some(failure)) => return Err(failure),
            (Err(e), None) => return Err(e.into()),
        };
        let (derive_ms, store_ms) = (build.derive.as_millis(), build.store.as_millis());
        let commit_ms = build.committed.unwrap_or_default().as_millis();
        let total_ms = began.elapsed().as_millis();
        info!(
            task = task.id,
            executions = task.counts.total,
            preview_ms,
            derive_ms,
            store_ms,
            commit_ms,
            total_ms,
            "download task created"
        );
        metrics::counter!(m::TASKS_CREATED_TOTAL, "org" => self.org_label(org_id).to_string()).increment(1);
        // Only devices already hot (online, or holding other open executions) get the new
        // execution in memory; the others read it from the store on their first message.
        let mut known = build.hot;
        let entries: Vec<(String, Arc<Mutex<DeviceHot>>)> =
            self.devices.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        let mut task_devices: Option<Vec<i64>> = None;
        let mut online = Vec::new();
        for (sn, hot) in entries {
            if let Some(open) = known.remove(&sn) {
                self.insert_open_execution(&sn, open);
            } else {
                // Made hot while the task was being written: its own read of the store may have
                // come before the commit.
                let device_id = lock(&hot).device_id;
                let ids = task_devices.get_or_insert_with(|| {
                    let mut ids = preview.ready_ids.clone();
                    ids.sort_unstable();
                    ids
                });
                if ids.binary_search(&device_id).is_err() {
                    continue;
                }
                self.load_open(&sn, &hot).await;
            }
            if lock(&hot).online {
                online.push((sn, hot));
            }
        }
        // Several nodes: the devices online here are a third of the fleet at best; the cluster
        // sweep of whichever node claims them delivers the new executions to every device (within
        // a sweep interval), and delivering here too would send those twice.
        if self.is_shared() {
            online.clear();
            self.sweep_now.notify_one();
        }
        let began = Instant::now();
        let terminals = online.len();
        self.deliver_to_online(online).await;
        info!(
            task = task.id,
            terminals,
            deliver_ms = began.elapsed().as_millis(),
            "downloads sent to online terminals"
        );
        Ok((task, preview))
    }

    /// Seals and publishes the open executions of these online terminals, on one task per core:
    /// each download is signed with its terminal's key, and a fleet-wide task is thousands of
    /// them.
    async fn deliver_to_online(&self, mut online: Vec<(String, Arc<Mutex<DeviceHot>>)>) {
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
                        engine.deliver_open(&sn, &hot, &key, None, true).await;
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

    /// Streams a task's executions into its transaction, [`TASK_CHUNK`] devices at a time, as a
    /// pipeline: while one chunk's keys are derived and wrapped (on every core), this thread
    /// inserts the previous chunk and reads the next one's credentials.
    fn fill_task(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        ready_ids: &[i64],
        build: &mut TaskBuild,
    ) -> StoreResult<()> {
        std::thread::scope(|scope| {
            let mut chunks = ready_ids.chunks(TASK_CHUNK).enumerate();
            let mut next = match chunks.next() {
                Some((c, ids)) => Some(self.read_chunk(sink, job, c, ids, build)?),
                None => None,
            };
            let mut deriving = None;
            while let Some(chunk) = next.take() {
                let handle = scope.spawn(move || self.derive_chunk(job, chunk));
                if let Some(previous) = deriving.take() {
                    self.insert_chunk(sink, job, previous, build)?;
                }
                next = match chunks.next() {
                    Some((c, ids)) => Some(self.read_chunk(sink, job, c, ids, build)?),
                    None => None,
                };
                deriving = Some(join_chunk(handle, build)?);
            }
            if let Some(last) = deriving {
                self.insert_chunk(sink, job, last, build)?;
            }
            Ok(())
        })
    }

    /// A chunk's credentials, read in the task's transaction, and each device's key ID.
    fn read_chunk(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        index: usize,
        ids: &[i64],
        build: &mut TaskBuild,
    ) -> StoreResult<Chunk> {
        let read = Instant::now();
        let targets = sink.derive_targets(ids, job.algorithm.is_aes())?;
        build.store += read.elapsed();
        let mut by_id: HashMap<i64, DeriveTarget> = targets.into_iter().map(|t| (t.device_id, t)).collect();
        let mut chunk = Chunk { devices: Vec::with_capacity(ids.len()), key_ids: Vec::with_capacity(ids.len()) };
        let first_serial = job.first_serial + (index * TASK_CHUNK) as u64;
        for (i, id) in ids.iter().enumerate() {
            // A device re-initialised or removed since the preview is skipped.
            let Some(c) = by_id.remove(id) else { continue };
            let serial = first_serial + i as u64;
            let key_id = if job.algorithm.is_tdes() {
                tdes_initial_ksn(job.key_set_id, serial).map(|k| k.as_bytes().to_vec())
            } else {
                aes_initial_key_id(job.key_set_id, serial).map(|k| k.as_bytes().to_vec())
            };
            match key_id {
                Ok(key_id) => chunk.key_ids.push(key_id),
                Err(e) => return Err(build.fail(EngineError::Internal(e.to_string()))),
            }
            chunk.devices.push(c);
        }
        Ok(chunk)
    }

    /// One key derived and wrapped per device of the chunk, on every core.
    fn derive_chunk(&self, job: &ChunkJob<'_>, chunk: Chunk) -> EngineResult<Derived> {
        let started = Instant::now();
        let requests: Vec<DeriveRequest<'_>> = chunk
            .key_ids
            .iter()
            .zip(&chunk.devices)
            .map(|(key_id, t)| DeriveRequest { key_id, sealed_kbpk: &t.sealed_kbpk })
            .collect();
        let wrapped =
            self.keys.derive_and_wrap(job.sealed_bdk, &requests).map_err(|e| EngineError::Internal(e.to_string()))?;
        drop(requests);
        let mut executions = Vec::with_capacity(wrapped.len());
        let mut sns = Vec::with_capacity(wrapped.len());
        for ((w, key_id), c) in wrapped.into_iter().zip(chunk.key_ids).zip(chunk.devices) {
            let w = w.map_err(|e| EngineError::Internal(format!("derivation failed: {e}")))?;
            debug_assert_eq!(w.key_id, key_id);
            executions.push(NewExecution {
                device_id: c.device_id,
                key_block: w.key_block,
                key_id,
                kcv: w.kcv.to_hex(),
                generation: c.generation,
            });
            sns.push(c.sn);
        }
        Ok(Derived { executions, sns, took: started.elapsed() })
    }

    /// Inserts a derived chunk; keeps the open executions of devices that are hot, for the maps
    /// after the commit.
    fn insert_chunk(
        &self,
        sink: &mut dyn TaskSink,
        job: &ChunkJob<'_>,
        derived: Derived,
        build: &mut TaskBuild,
    ) -> StoreResult<()> {
        let insert = Instant::now();
        let execution_ids = sink.insert(&derived.executions)?;
        build.store += insert.elapsed();
        for ((e, id), sn) in derived.executions.into_iter().zip(execution_ids).zip(derived.sns) {
            if self.devices.contains_key(&sn) {
                build.hot.insert(sn, OpenExecution::new_in(job.task, id, e));
            }
        }
        Ok(())
    }

    /// Stops a task: its open executions end as terminated ("manually terminated").
    pub async fn stop_task(&self, org_id: i64, task_id: i64) -> EngineResult<usize> {
        // The deferred sends first, so that the stopped executions' rows count them.
        self.flush().await?;
        let now = self.clock.now_ms();
        let ended = self.blocking(move |s| s.stop_task(org_id, task_id, now)).await?;
        self.forget(&ended);
        metrics::counter!(m::EXECUTIONS_ENDED_TOTAL, "state" => "terminated").increment(ended.len() as u64);
        Ok(ended.len())
    }

    /// Asks a device to unlock: the signed unlock goes out now if the device is online, else on
    /// its next hello. The device confirms by reporting itself unlocked.
    pub async fn unlock(&self, org_id: i64, sn: &str) -> EngineResult<bool> {
        let device = self.device(org_id, sn).await?;
        if !device.initialised {
            return Err(EngineError::Conflict(format!("device {sn} is not initialised")));
        }
        let id = device.id;
        self.blocking(move |s| s.set_unlock_pending(id, true)).await?;
        let hot = self.hot_device(sn).await.map_err(|r| EngineError::Internal(r.reason().into()))?;
        let (online, key) = {
            let mut h = lock(&hot);
            h.unlock_pending = true;
            (h.online, self.signing_key(&mut h))
        };
        if let (true, Some(key)) = (online, key) {
            self.send_unlock(sn, &key, device.id);
        }
        Ok(online)
    }

    fn forget(&self, execution_ids: &[i64]) {
        for id in execution_ids {
            self.refusals.remove(id);
            if let Some((_, sn)) = self.execution_sn.remove(id) {
                if let Some(hot) = self.devices.get(&sn) {
                    lock(&hot).open.retain(|e| e.id != *id);
                }
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
    async fn retry_sweep(&self) {
        let ticks = self.clock.ticks_ms();
        let due: Vec<(String, Arc<Mutex<DeviceHot>>)> = self
            .devices
            .iter()
            .filter(|entry| {
                let h = lock(entry.value());
                (h.online || h.presence_unsure)
                    && h.open.iter().any(|e| {
                        e.last_sent.is_some_and(|at| ticks - at >= retry_backoff_ms(self.retry_initial_ms(), e.sends))
                    })
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
                self.deliver_open(&sn, &hot, &key, None, false).await;
            }
        }
    }

    /// Several nodes: delivers the executions this node claimed in the store (see
    /// [`Store::claim_redeliveries`]): new ones at once, unacked ones after their backoff, whoever
    /// delivered them before. Each claim is this node's alone, so every retry fires once across
    /// the cluster, and the executions of a node that died (its acks lost with it) are taken
    /// over by the others. Returns how many downloads went out.
    pub async fn cluster_sweep(&self) -> usize {
        let mut sent = 0;
        loop {
            let now = self.clock.now_ms();
            let initial = self.retry_initial_ms();
            let claimed = match self
                .blocking(move |s| s.claim_redeliveries(now, 0, initial, RETRY_MAX_MS, CLAIM_BATCH_MAX))
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "re-delivery claim failed");
                    return sent;
                }
            };
            let full = claimed.len() as i64 >= CLAIM_BATCH_MAX;
            sent += self.deliver_claimed(now, claimed).await;
            if !full {
                return sent;
            }
        }
    }

    async fn deliver_claimed(&self, now: Millis, claimed: Vec<ExecutionRow>) -> usize {
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

    /// Waits until every write queued so far is durable, the deferred `Delivered` writes included.
    pub async fn flush(&self) -> EngineResult<()> {
        self.write_sends_durably(self.due_sends(DueSends::All)).await
    }

    /// Queues the `Delivered` writes of `due`, then waits until they and every write queued
    /// before them are durable.
    async fn write_sends_durably(&self, due: Vec<(i64, Sends)>) -> EngineResult<()> {
        self.write_sends(due).await;
        self.write_durably(vec![Write::Seen { device_id: -1, at: 0 }]).await.map(|_| ())
    }
}

/// The checks of a verified ack against its execution. Success needs the slot, the key ID and
/// the KCV to match the derivation; an error code needs only the slot.
fn check_ack(e: &OpenExecution, ack: &message::Ack) -> Result<Option<KcvMatched>, Rejection> {
    if ack.slot.0 != e.slot {
        return Err(Rejection::SlotMismatch);
    }
    if ack.result != 0 {
        return Ok(None);
    }
    if !rki_protocol::secret::ct_eq(&ack.key_id, &e.key_id) {
        return Err(Rejection::KeyIdMismatch);
    }
    let expected = Kcv::from_hex(&e.kcv);
    let given = Kcv::from_slice(&ack.kcv);
    match (expected, given) {
        (Some(expected), Some(given)) if expected.short() == given.short() => Ok(Some(KcvMatched(()))),
        _ => Err(Rejection::KcvMismatch),
    }
}

/// Doubling backoff for re-delivery to an online device: 15 s, 30 s, … up to 10 min.
fn retry_backoff_ms(initial_ms: i64, sends: u32) -> i64 {
    let doublings = sends.saturating_sub(1).min(16);
    (initial_ms << doublings).min(RETRY_MAX_MS)
}

/// Why a device is not ready, in the order the portal shows them.
fn readiness(d: &DeviceRow, key_source: Option<i64>, pending: bool) -> Vec<NotReady> {
    let mut reasons = Vec::new();
    if !d.initialised {
        reasons.push(NotReady::NotInitialised);
    }
    if d.locked {
        reasons.push(NotReady::Locked);
    }
    match (d.assigned_key_source, key_source) {
        (None, _) => reasons.push(NotReady::Unassigned),
        (Some(a), Some(k)) if a != k => reasons.push(NotReady::Unassigned),
        _ => {}
    }
    if pending {
        reasons.push(NotReady::TaskPending);
    }
    if d.debug_mode || d.debug_key_present {
        reasons.push(NotReady::DebugKeyPresent);
    }
    match (&d.model, &d.rom_version, &d.app_version, &d.region) {
        (Some(model), Some(rom), Some(app), Some(region)) => {
            let region = Region::parse(region).unwrap_or(Region::Eu);
            match firmware_refusal(model, rom, app, region) {
                Some(TerminalError::RomTooOld) => reasons.push(NotReady::RomTooOld),
                Some(TerminalError::AppTooOld) => reasons.push(NotReady::AppTooOld),
                _ => {}
            }
        }
        _ => reasons.push(NotReady::NeverSeen),
    }
    reasons
}

fn shard_of(topic: &str) -> usize {
    // FNV-1a over the topic: the SN is its only varying part.
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in topic.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    (hash % SHARDS as u64) as usize
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn shard_worker(engine: Arc<Engine>, mut rx: mpsc::Receiver<InboundMessage>) {
    while let Some(message) = rx.recv().await {
        metrics::histogram!(m::INBOUND_WAIT_SECONDS).record(message.received.elapsed().as_secs_f64());
        engine.handle(message).await;
    }
}

/// Gathers queued writes into batches: one transaction, one fsync per batch.
async fn committer(engine: Arc<Engine>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH_WRITES_MAX);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        while batch.len() < BATCH_WRITES_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let writes: Vec<Write> = batch
            .iter()
            .filter(|p| !matches!(p.write, Write::Seen { device_id: -1, .. }))
            .map(|p| p.write.clone())
            .collect();
        let started = engine.health.commit_started();
        let store = engine.store.clone();
        let n = writes.len();
        let failed_endings: Vec<i64> =
            writes.iter().filter_map(|w| if let Write::End(e) = w { Some(e.execution_id) } else { None }).collect();
        let result = tokio::task::spawn_blocking(move || store.apply_batch(&writes)).await;
        let result = match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StoreError::Backend(e.to_string())),
        };
        metrics::histogram!(m::STORE_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::STORE_BATCH_WRITES).record(n as f64);
        engine.health.commit_finished(started, result.as_ref().map(|_| ()));
        let ended: std::collections::HashSet<i64> = match &result {
            Ok(outcome) => outcome.ended.iter().map(|(id, _)| *id).collect(),
            Err(e) => {
                error!(error = %e, writes = n, "store batch failed");
                lock(&engine.unrecorded_endings).extend(failed_endings);
                Default::default()
            }
        };
        let now = engine.clock.now_ms();
        for p in batch.drain(..) {
            if let (Some(done), Write::End(ending)) = (&p.ack, &p.write) {
                if ended.contains(&ending.execution_id) {
                    let result = if done.succeeded { "succeeded" } else { "failed" };
                    metrics::counter!(m::ACKS_TOTAL, "result" => result).increment(1);
                    metrics::counter!(m::EXECUTIONS_ENDED_TOTAL, "state" => result).increment(1);
                    if done.succeeded {
                        metrics::counter!(m::KEYS_INJECTED_TOTAL, "org" => done.org.to_string()).increment(1);
                    }
                    let since_creation = ((now - done.created_at).max(0) as f64) / 1000.0;
                    metrics::histogram!(m::DELIVERY_LATENCY_SECONDS, "from" => "creation").record(since_creation);
                    if let Some(hello) = done.hello_at {
                        metrics::histogram!(m::DELIVERY_LATENCY_SECONDS, "from" => "hello")
                            .record(hello.elapsed().as_secs_f64());
                    }
                } else if result.is_ok() {
                    metrics::counter!(m::DUPLICATE_ACKS_TOTAL).increment(1);
                }
            }
            if let Some(reply) = p.reply {
                let _ = reply.send(result.clone());
            }
        }
    }
}

/// Writes the deferred `Delivered` of sends that no ack carried within the delay.
async fn delivered_writer(engine: Arc<Engine>) {
    let mut ticker = tokio::time::interval(DELIVERED_WRITE_TICK);
    loop {
        ticker.tick().await;
        let due = engine.due_sends(DueSends::OlderThan(engine.delivered_write_delay()));
        engine.write_sends(due).await;
    }
}

/// Runs the retry and expiry sweeps.
async fn sweeper(engine: Arc<Engine>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    let mut ticks: u64 = 0;
    let mut expired_at: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => ticks += 1,
            // No expiry on these wake-ups: it keeps its every-5-ticks pace.
            _ = engine.sweep_now.notified() => {}
        }
        engine.restore_unrecorded_endings().await;
        engine.persist_clock_floor().await;
        if engine.is_shared() {
            engine.cluster_sweep().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(kcv: &str) -> OpenExecution {
        OpenExecution {
            id: 1,
            org_id: 1,
            key_source_id: 1,
            slot: 1,
            key_type: "IPEK".into(),
            key_block: String::new(),
            key_id: vec![1; 10],
            kcv: kcv.into(),
            generation: 1,
            created_at: 0,
            deadline: i64::MAX,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }

    fn ack(kcv: Vec<u8>, result: i32) -> message::Ack {
        message::Ack {
            execution_id: 1,
            result,
            slot: KeySlot(1),
            key_id: vec![1; 10],
            kcv,
            injection: InjectionType::Auto,
        }
    }

    #[test]
    fn ack_with_matching_kcv_is_accepted() {
        assert!(matches!(check_ack(&open("AABBCC"), &ack(vec![0xAA, 0xBB, 0xCC], 0)), Ok(Some(_))));
    }

    #[test]
    fn ack_with_wrong_kcv_is_rejected() {
        assert_eq!(check_ack(&open("AABBCC"), &ack(vec![0xAA, 0xBB, 0xCD], 0)).err(), Some(Rejection::KcvMismatch));
        assert_eq!(check_ack(&open("AABBCC"), &ack(vec![], 0)).err(), Some(Rejection::KcvMismatch));
    }

    #[test]
    fn ack_with_an_error_code_needs_no_kcv() {
        assert!(matches!(check_ack(&open("AABBCC"), &ack(vec![], -11208)), Ok(None)));
    }

    #[test]
    fn ack_for_another_slot_is_rejected() {
        let mut a = ack(vec![0xAA, 0xBB, 0xCC], 0);
        a.slot = KeySlot(4);
        assert_eq!(check_ack(&open("AABBCC"), &a).err(), Some(Rejection::SlotMismatch));
    }

    struct NoOutbound;

    impl Outbound for NoOutbound {
        fn publish(&self, _topic: String, _payload: Vec<u8>) {}
    }

    /// An engine on an SQLite store in `dir` (shared by the engines of one test, as by restarts).
    async fn engine_in(dir: &std::path::Path, clock: Clock) -> Arc<Engine> {
        std::fs::create_dir_all(dir).expect("dir");
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.join("rki.sqlite")).expect("store"));
        let keys = Arc::new(crate::keyservice::SoftwareKeyService::new(
            crate::keyservice::MasterKey::generate().expect("master key"),
        ));
        Engine::start(store, keys, Arc::new(clock), Arc::new(NoOutbound)).await.expect("engine")
    }

    fn test_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rki-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
    }

    #[test]
    fn no_downlink_counter_is_used_above_the_durable_mark_even_across_a_clock_jump() {
        let dir = test_dir("mark");
        runtime().block_on(async {
            let clock = Clock::adjustable();
            let engine = engine_in(&dir, clock).await;
            let mark = || engine.store.mark(MARK_DOWN_COUNTER).expect("mark").expect("a mark") as u64;
            let mut last = 0;
            for _ in 0..10_000 {
                let counter = engine.next_down_counter().expect("counter");
                assert!(counter > last);
                assert!(counter <= mark(), "counter {counter} above the durable mark");
                last = counter;
            }
            // The clock jumps a day ahead: the next counter is reserved before it is used.
            engine.clock.step(86_400_000).expect("step");
            let counter = engine.next_down_counter().expect("counter");
            assert!(counter >= last + 86_400_000_000 - 1_000_000);
            assert!(counter <= mark());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_with_the_clock_set_back_starts_above_every_counter_used() {
        let dir = test_dir("restart");
        let rt = runtime();
        let last = rt.block_on(async {
            let ahead = Clock::adjustable();
            ahead.step(31 * 86_400_000).expect("step");
            let engine = engine_in(&dir, ahead).await;
            let mut last = 0;
            for _ in 0..100 {
                last = engine.next_down_counter().expect("counter");
            }
            last
        });
        drop(rt);
        runtime().block_on(async {
            // Real time now, 31 days behind the previous run.
            let engine = engine_in(&dir, Clock::system()).await;
            let first = engine.next_down_counter().expect("counter");
            assert!(first > last, "counter {first} not above the previous run's {last}");
            // The wall reading does not go back either: the previous run's floor holds it.
            assert!(engine.clock.now_ms() >= (last / 1000) as i64 - CLOCK_FLOOR_AHEAD_MS);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retry_backoff_doubles_up_to_the_cap() {
        assert_eq!(retry_backoff_ms(RETRY_INITIAL_MS, 1), RETRY_INITIAL_MS);
        assert_eq!(retry_backoff_ms(RETRY_INITIAL_MS, 2), 2 * RETRY_INITIAL_MS);
        assert_eq!(retry_backoff_ms(RETRY_INITIAL_MS, 100), RETRY_MAX_MS);
    }
}
