//! One simulated terminal: a tokio task that owns the terminal's state and its MQTT connection,
//! driven by a [`DeviceHandle`].
//!
//! The task is a loop over three situations:
//! - **powered off**: it answers local commands (key query, slot reset, knobs) and waits for
//!   power;
//! - **powered on, not initialised**: it waits for a GUDID, then runs the bootstrap exchange
//!   ([`Terminal::initialise`]);
//! - **powered on, initialised**: it runs a session ([`Terminal::session`]): connect under the
//!   device identity, subscribe, hello, then handle down frames until the connection is lost, the
//!   terminal goes offline or powers off. Between sessions it backs off, doubling the delay.
//!
//! Every decision that changes the state is persisted before its ack is published, and an ack
//! stays "unconfirmed" until the broker acknowledges it (PUBACK); unconfirmed acks are re-sent
//! after every hello, so a crash at any point gives exactly one injection and at least one ack.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rki_protocol::frame;
use rki_protocol::init::{derive_device_secrets, DeviceSecrets, Ephemeral, Gudid};
use rki_protocol::message::{Ack, Body, CreateKey, Hello, Message, RefusalCode, SlotStatus};
use rki_protocol::terminal::{KeySlot, TerminalError};
use rki_protocol::topic;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::app::{self, Decision, DownCommand, ForceError, Rejection};
use crate::bootstrap::{read_init_frame, InitFrame, SentCreateKeys};
use crate::config::{BrokerAddr, ConfigError, DeviceConfig, Knobs, StateStore};
use crate::counter::UpCounter;
use crate::state::{self, StorageError, TerminalState};
use crate::status::{DeviceStatus, FleetCounters};

/// Requests the MQTT client may queue before the event loop takes them. Small: a terminal sends
/// a hello and a few acks at a time; frames beyond it wait in the terminal's own outbox.
const REQUEST_CHANNEL_CAP: usize = 8;
/// QoS 1 publishes in flight at once. It also sizes the client's per-connection state.
const INFLIGHT_MAX: u16 = 8;
/// Largest MQTT packet accepted or sent: a frame plus the topic and headers.
const PACKET_LEN_MAX: usize = frame::FRAME_LEN_MAX + 512;
/// Commands a handle may queue before it waits.
const COMMAND_CHANNEL_CAP: usize = 4;
/// How long a polite DISCONNECT may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after an initialisation the terminal may initialise again with the same GUDID when
/// the broker refuses its secrets (docs/PROTOCOL.md §7.5: the gateway answers a GUDID anew for 10
/// minutes after its first answer, until the terminal has used the secrets of one); a minute less,
/// for the clocks' difference and the answer's travel.
const REINITIALISE_WINDOW: Duration = Duration::from_secs(9 * 60);
/// How long the broker may refuse fresh secrets before the terminal takes them for wrong: a broker
/// that learns credentials from a file one node rewrites knows a new password up to 5 s later
/// (docs/SCALE-OUT.md), and a terminal that initialised again meanwhile would only change its
/// password under the broker's feet once more.
const SECRETS_REFUSED_FOR: Duration = Duration::from_secs(15);

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the device task has stopped")]
    Stopped,
    #[error("the terminal is powered off")]
    PoweredOff,
    #[error("the terminal is not initialised")]
    NotInitialised,
    #[error("a GUDID is 32 hex digits (dashes and spaces ignored)")]
    BadGudid,
    #[error("the gateway refused the initialisation: {0}")]
    InitRefused(&'static str),
    #[error("no answer to CreateKey within {0:?}")]
    InitTimeout(Duration),
    #[error("initialisation: {0}")]
    Init(#[from] rki_protocol::init::InitError),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Force(#[from] ForceError),
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
}

impl DeviceError {
    /// A failure of the network or the broker, worth retrying; not a refusal or a bad input.
    pub fn is_transient(&self) -> bool {
        matches!(self, DeviceError::Mqtt(_) | DeviceError::InitTimeout(_))
    }
}

/// A change to the knobs, applied inside the device task.
type KnobsUpdate = Box<dyn FnOnce(&mut Knobs) + Send>;

/// What a handle asks of the device task. Every command is answered, so that a caller knows it
/// took effect.
enum Command {
    Initialise(Gudid, oneshot::Sender<Result<(), DeviceError>>),
    PowerOff(oneshot::Sender<()>),
    PowerOn(Option<Duration>, oneshot::Sender<()>),
    GoOffline(Duration, oneshot::Sender<()>),
    UpdateKnobs(KnobsUpdate, oneshot::Sender<()>),
    SetDebugMode(bool, oneshot::Sender<Result<(), DeviceError>>),
    SetFirmware(String, String, oneshot::Sender<Result<(), DeviceError>>),
    ForceManual(oneshot::Sender<Result<Ack, DeviceError>>),
    ResetSlot(KeySlot, oneshot::Sender<Result<bool, DeviceError>>),
    Shutdown(oneshot::Sender<()>),
}

/// Spawns simulated terminals.
#[derive(Debug)]
pub struct Device;

impl Device {
    /// Loads (or creates) the terminal's state and starts its task. Must be called inside a tokio
    /// runtime. Fails if the stored state is unreadable, or missing when
    /// [`DeviceConfig::require_existing_state`] is set.
    pub async fn spawn(config: DeviceConfig) -> Result<DeviceHandle, DeviceError> {
        let DeviceConfig { profile, broker, store, knobs, gudid, preset_secrets, require_existing_state, counters } =
            config;
        let sn = profile.sn().to_string();
        let gudid = gudid.map(|text| Gudid::parse(&text).map_err(|_| DeviceError::BadGudid)).transpose()?;
        let stored = load(&store, &sn).await?;
        let fresh = stored.is_none();
        let mut state = match (stored, &store) {
            (Some(state), _) => state,
            (None, StateStore::Directory { path, .. }) if require_existing_state => {
                return Err(StorageError::Missing { sn, dir: path.clone() }.into());
            }
            (None, _) => TerminalState::factory(&profile),
        };
        if state.secrets.is_none() {
            state.secrets = preset_secrets;
        }
        let counters = counters.unwrap_or_default();
        let (command_tx, command_rx) = mpsc::channel(COMMAND_CHANNEL_CAP);
        let (status_tx, status_rx) = watch::channel(DeviceStatus::default());
        let mut terminal = Terminal {
            broker,
            store,
            up: UpCounter::resume_after(state.last_up_counter),
            state,
            powered: knobs.start_powered,
            power_on_at: None,
            knobs,
            pending_gudid: gudid,
            unproven_gudid: None,
            commands: command_rx,
            status: status_tx,
            counters: counters.clone(),
            reconnect_delay: None,
            jitter: Jitter::seeded(&sn),
            shutdown_reply: None,
            will_counter: None,
            create_keys: SentCreateKeys::default(),
        };
        if fresh {
            terminal.persist().await?;
        }
        if terminal.state.secrets.is_some() {
            counters.add(&counters.initialised, 1);
        }
        terminal.refresh_status();
        tokio::spawn(terminal.run());
        Ok(DeviceHandle { sn: sn.into(), commands: command_tx, status: status_rx, counters })
    }
}

async fn load(store: &StateStore, sn: &str) -> Result<Option<TerminalState>, DeviceError> {
    match store {
        StateStore::Memory => Ok(None),
        StateStore::Directory { path, .. } => {
            let (path, sn) = (path.clone(), sn.to_string());
            tokio::task::spawn_blocking(move || state::load_file(&path, &sn))
                .await
                .map_err(|_| DeviceError::Stopped)?
                .map_err(DeviceError::from)
        }
    }
}

/// Controls one simulated terminal. Cloning gives another handle to the same terminal; the
/// terminal stops when every handle is dropped or on [`DeviceHandle::shutdown`].
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    sn: Arc<str>,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<DeviceStatus>,
    counters: Arc<FleetCounters>,
}

impl DeviceHandle {
    pub fn sn(&self) -> &str {
        &self.sn
    }

    /// The counters this terminal adds to (its fleet's, or its own).
    pub fn counters(&self) -> &Arc<FleetCounters> {
        &self.counters
    }

    /// A snapshot of the terminal.
    pub fn status(&self) -> DeviceStatus {
        self.status.borrow().clone()
    }

    /// The key slots, as the terminal's "Key Query" screen lists them.
    pub fn key_query(&self) -> Vec<SlotStatus> {
        self.status.borrow().slots.clone()
    }

    /// Waits until `condition` holds for the terminal's status, or `timeout` passes. `what`
    /// names the condition in the timeout error.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl FnMut(&DeviceStatus) -> bool,
    ) -> Result<DeviceStatus, DeviceError> {
        let mut status = self.status.clone();
        let outcome =
            tokio::time::timeout(timeout, async { status.wait_for(condition).await.map(|s| s.clone()) }).await;
        match outcome {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(_)) => Err(DeviceError::Stopped),
            Err(_) => Err(DeviceError::Timeout { what: what.to_string(), waited: timeout }),
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, DeviceError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| DeviceError::Stopped)?;
        answer.await.map_err(|_| DeviceError::Stopped)
    }

    /// Initialises (or re-initialises) the terminal with a GUDID: the bootstrap CreateKey
    /// exchange, then the new secrets are persisted and the terminal reconnects under its device
    /// identity. Fails with the gateway's refusal code, a timeout, or a connection error.
    pub async fn initialise(&self, gudid: &str) -> Result<(), DeviceError> {
        let gudid = Gudid::parse(gudid).map_err(|_| DeviceError::BadGudid)?;
        self.ask(|reply| Command::Initialise(gudid, reply)).await?
    }

    /// Cuts the power now: the connection drops without a DISCONNECT (the broker publishes the
    /// last will), anything not yet persisted is lost.
    pub async fn power_off(&self) -> Result<(), DeviceError> {
        self.ask(Command::PowerOff).await
    }

    pub async fn power_on(&self) -> Result<(), DeviceError> {
        self.ask(|reply| Command::PowerOn(None, reply)).await
    }

    /// Powers on after `delay` (returns at once).
    pub async fn power_on_after(&self, delay: Duration) -> Result<(), DeviceError> {
        self.ask(|reply| Command::PowerOn(Some(delay), reply)).await
    }

    /// Loses the network for `duration`, then reconnects (no effect when powered off).
    pub async fn go_offline(&self, duration: Duration) -> Result<(), DeviceError> {
        self.ask(|reply| Command::GoOffline(duration, reply)).await
    }

    /// Changes the behaviour knobs; takes effect for the next event.
    pub async fn update_knobs(&self, update: impl FnOnce(&mut Knobs) + Send + 'static) -> Result<(), DeviceError> {
        self.ask(|reply| Command::UpdateKnobs(Box::new(update), reply)).await
    }

    /// On the next install: persist the key and the pending ack, drop the connection without
    /// sending the ack, and power off.
    pub async fn crash_after_next_install(&self) -> Result<(), DeviceError> {
        self.update_knobs(|knobs| knobs.crash_after_next_install = true).await
    }

    /// Delays every ack by `delay` (persisted first).
    pub async fn set_ack_delay(&self, delay: Duration) -> Result<(), DeviceError> {
        self.update_knobs(move |knobs| knobs.ack_delay = delay).await
    }

    /// Makes every new download fail with `error` (or stops doing so with `None`).
    pub async fn set_forced_failure(&self, error: Option<TerminalError>) -> Result<(), DeviceError> {
        self.update_knobs(move |knobs| knobs.forced_failure = error).await
    }

    /// Enters or leaves debug mode (persisted; a fresh hello follows when connected).
    pub async fn set_debug_mode(&self, on: bool) -> Result<(), DeviceError> {
        self.ask(|reply| Command::SetDebugMode(on, reply)).await?
    }

    /// Updates the ROM and key-injection app versions (persisted; a fresh hello follows).
    pub async fn set_firmware(&self, rom_version: &str, app_version: &str) -> Result<(), DeviceError> {
        let (rom, app) = (rom_version.to_string(), app_version.to_string());
        self.ask(|reply| Command::SetFirmware(rom, app, reply)).await?
    }

    /// Forces the kept (refused) download locally, as a technician does from the key-injection
    /// app: installs it and queues an ack with injection = manual (sent now if connected, else
    /// after the next hello). Fails if nothing is kept, or if the terminal would still refuse it
    /// (locked, debug, firmware, bad key block).
    pub async fn force_manual_injection(&self) -> Result<Ack, DeviceError> {
        self.ask(Command::ForceManual).await?
    }

    /// Deletes the key in `slot` (e.g. the debug key in slot 8); whether there was one. The lock
    /// is not changed: only a signed unlock clears it.
    pub async fn reset_slot(&self, slot: KeySlot) -> Result<bool, DeviceError> {
        self.ask(|reply| Command::ResetSlot(slot, reply)).await?
    }

    /// Stops the terminal's task (like pulling the battery for good). Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}

/// A small deterministic jitter source, so that a fleet does not reconnect in lockstep.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn seeded(sn: &str) -> Self {
        // FNV-1a of the SN: distinct, stable seeds without a random source.
        let seed = sn.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Self(seed | 1)
    }

    /// `delay` plus up to a quarter of it.
    fn spread(&mut self, delay: Duration) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let quarter = delay.as_micros() as u64 / 4;
        delay + Duration::from_micros(if quarter == 0 { 0 } else { self.0 % quarter })
    }
}

/// How a session ended.
enum SessionEnd {
    PowerOff,
    /// Stopped on purpose between install and ack.
    Crash,
    Offline(Duration),
    /// The connection failed or was lost.
    Lost,
    /// The broker refused the CONNECT for its credentials.
    SecretsRefused,
    Reinitialise(Gudid, oneshot::Sender<Result<(), DeviceError>>),
    Shutdown,
}

/// How a wait without a connection ended.
enum IdleEnd {
    /// The deadline passed.
    Elapsed,
    /// Power state or a pending initialisation changed: re-evaluate.
    Changed,
    Initialise(Gudid, oneshot::Sender<Result<(), DeviceError>>),
    Shutdown,
}

/// A command handled the same way connected or not, and what a session must do after it.
enum Handled {
    Done,
    /// The state a hello reports changed.
    HelloDue,
    /// A manual injection produced this ack.
    AckDue(Ack),
    /// A power, network or lifecycle command: the caller decides.
    Control(Command),
}

/// An up frame, sealed, waiting for room in the MQTT client's queue.
struct OutgoingFrame {
    payload: Vec<u8>,
    /// The execution whose ack this is, to mark it confirmed on PUBACK.
    ack_of: Option<u64>,
}

/// The MQTT side of one session: the client, the terminal's outbox, and which publish carries
/// which ack.
struct Link {
    client: AsyncClient,
    up_topic: String,
    outbox: VecDeque<OutgoingFrame>,
    /// Handed to the client, waiting for their packet id (in order).
    requested: VecDeque<Option<u64>>,
    /// Publishes that collided on a packet id; sent when it frees up.
    collided: VecDeque<Option<u64>>,
    /// Sent, awaiting PUBACK: (packet id, ack of).
    inflight: Vec<(u16, Option<u64>)>,
}

impl Link {
    fn new(client: AsyncClient, sn: &str) -> Self {
        Self {
            client,
            up_topic: topic::device_up(sn),
            outbox: VecDeque::new(),
            requested: VecDeque::new(),
            collided: VecDeque::new(),
            inflight: Vec::new(),
        }
    }

    /// Hands queued frames to the client until its queue is full.
    fn flush(&mut self) {
        while let Some(frame) = self.outbox.front() {
            let sent = self.client.try_publish(&self.up_topic, QoS::AtLeastOnce, false, frame.payload.clone());
            if sent.is_err() {
                break;
            }
            if let Some(frame) = self.outbox.pop_front() {
                self.requested.push_back(frame.ack_of);
            }
        }
    }

    fn on_outgoing(&mut self, outgoing: &Outgoing) {
        match outgoing {
            Outgoing::Publish(pkid) => {
                let ack_of = self.collided.pop_front().or_else(|| self.requested.pop_front()).flatten();
                self.inflight.push((*pkid, ack_of));
            }
            Outgoing::AwaitAck(_) => {
                if let Some(ack_of) = self.requested.pop_front() {
                    self.collided.push_back(ack_of);
                }
            }
            _ => {}
        }
    }

    /// A PUBACK arrived: the execution whose ack it confirms, if any.
    fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        let index = self.inflight.iter().position(|(id, _)| *id == pkid)?;
        self.inflight.remove(index).1
    }

    fn queued_ack(&self, execution_id: u64) -> bool {
        self.outbox.iter().any(|f| f.ack_of == Some(execution_id))
    }
}

/// The device task's state.
struct Terminal {
    broker: BrokerAddr,
    store: StateStore,
    knobs: Knobs,
    state: TerminalState,
    /// Counters of up frames, resumed from the state.
    up: UpCounter,
    powered: bool,
    /// A delayed power-on.
    power_on_at: Option<Instant>,
    /// A GUDID to initialise with at power-on, from the configuration.
    pending_gudid: Option<Gudid>,
    /// The GUDID the terminal last initialised with (configured or commanded), for the window in
    /// which the gateway answers it anew: if the broker keeps refusing those secrets
    /// ([`SECRETS_REFUSED_FOR`]), they are not the newest answer's (the gateway answered an
    /// earlier CreateKey, whose answer the terminal derived, and then its retry too), and the
    /// terminal initialises again with the same GUDID, as PROTOCOL.md §7.5 says. Kept after the
    /// first admission too: a newer answer may replace the secrets just after it, and the broker
    /// then disconnects the terminal.
    unproven_gudid: Option<Unproven>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<DeviceStatus>,
    counters: Arc<FleetCounters>,
    /// The next reconnect delay; `None` after a session that got ready.
    reconnect_delay: Option<Duration>,
    jitter: Jitter,
    /// The caller of a shutdown, answered once the task has cleaned up.
    shutdown_reply: Option<oneshot::Sender<()>>,
    /// The counter of the current session's last will, for its first hello.
    will_counter: Option<u64>,
    /// The CreateKeys of the current initialisation (one GUDID, across its retries), each with
    /// its ephemeral key and body: a late answer to an earlier one is derived with that one's
    /// (PROTOCOL.md §7.3). Bounded in number and age; emptied once the initialisation ends.
    create_keys: SentCreateKeys,
}

impl Terminal {
    async fn run(mut self) {
        loop {
            if !self.powered {
                let deadline = self.power_on_at;
                match self.idle(deadline).await {
                    IdleEnd::Shutdown => break,
                    IdleEnd::Elapsed => {
                        self.power_on_at = None;
                        self.powered = true;
                    }
                    IdleEnd::Changed => {}
                    IdleEnd::Initialise(_, reply) => {
                        let _ = reply.send(Err(DeviceError::PoweredOff));
                    }
                }
                self.refresh_status();
                continue;
            }
            if self.state.secrets.is_none() {
                let next = match self.pending_gudid.take() {
                    Some(gudid) => {
                        // A GUDID from the configuration is retried, with a backoff, while the
                        // failure is the network's; a refusal by the gateway is final.
                        let outcome = Box::pin(self.initialise(&gudid)).await;
                        if outcome.is_ok() {
                            self.answered_with(gudid);
                        } else if outcome.as_ref().is_err_and(DeviceError::is_transient) {
                            self.pending_gudid = Some(gudid);
                            if self.back_off().await {
                                break;
                            }
                        }
                        continue;
                    }
                    None => self.idle(None).await,
                };
                match next {
                    IdleEnd::Shutdown => break,
                    IdleEnd::Initialise(gudid, reply) => {
                        let outcome = Box::pin(self.initialise_on_command(gudid)).await;
                        let _ = reply.send(outcome);
                    }
                    IdleEnd::Elapsed | IdleEnd::Changed => {}
                }
                continue;
            }
            // Boxed: the session's future is large, and a powered-off terminal should not carry it.
            match Box::pin(self.session()).await {
                SessionEnd::Shutdown => break,
                SessionEnd::PowerOff => self.powered = false,
                SessionEnd::Crash => {
                    self.powered = false;
                    self.status.send_modify(|s| s.crashed = true);
                }
                SessionEnd::Offline(duration) => {
                    if let Some(end) = self.wait_powered(duration).await {
                        if self.end_wait(end).await {
                            break;
                        }
                    }
                }
                SessionEnd::Lost => {
                    if self.back_off().await {
                        break;
                    }
                }
                SessionEnd::SecretsRefused => {
                    if self.back_off().await {
                        break;
                    }
                    self.initialise_again().await;
                }
                SessionEnd::Reinitialise(gudid, reply) => {
                    let outcome = Box::pin(self.initialise_on_command(gudid)).await;
                    let _ = reply.send(outcome);
                }
            }
            self.refresh_status();
        }
        if self.state.secrets.is_some() {
            self.counters.sub(&self.counters.initialised, 1);
        }
        self.status.send_modify(|s| {
            s.powered = false;
            s.connected = false;
        });
        // Answered last, so that a caller sees the counters settled.
        if let Some(reply) = self.shutdown_reply.take() {
            let _ = reply.send(());
        }
    }

    /// An initialisation someone asked for (a technician typing a GUDID, a test). Its secrets are
    /// unproven like a configured GUDID's: if the broker keeps refusing them, the terminal
    /// initialises again with the same GUDID ([`Terminal::initialise_again`]). A terminal whose
    /// answer the gateway replaced (it answered a retry too) is otherwise stuck for good.
    async fn initialise_on_command(&mut self, gudid: Gudid) -> Result<(), DeviceError> {
        let outcome = Box::pin(self.initialise(&gudid)).await;
        if outcome.is_ok() {
            self.answered_with(gudid);
        }
        outcome
    }

    /// The terminal now holds secrets answered for `gudid`, unproven: the gateway's window to
    /// answer it anew runs from its first answer, kept across answers for the same GUDID.
    fn answered_with(&mut self, gudid: Gudid) {
        let now = Instant::now();
        let first_answer = match self.unproven_gudid.take() {
            Some(u) if u.gudid.id() == gudid.id() => u.first_answer,
            _ => now,
        };
        self.unproven_gudid = Some(Unproven { gudid, first_answer, secrets_since: now });
    }

    /// After the broker refused the terminal's secrets: initialises again with the GUDID they came
    /// from, if it is recent enough for the gateway to answer anew (§7.5). A refusal of that
    /// CreateKey (the GUDID spent for good) ends the retries; a network failure keeps them.
    async fn initialise_again(&mut self) {
        let Some(unproven) = self.unproven_gudid.take() else { return };
        match initialise_again_when(unproven.first_answer.elapsed(), unproven.secrets_since.elapsed()) {
            Reinitialise::Never => return,
            Reinitialise::NotYet => {
                self.unproven_gudid = Some(unproven);
                return;
            }
            Reinitialise::Now => {}
        }
        let Unproven { gudid, first_answer, .. } = unproven;
        // The reconnect delay keeps growing across these attempts (an initialisation resets it):
        // once the pause between two bootstrap sessions is longer than the gateway takes to
        // answer, a late answer falls between them, to no subscriber, and the next CreateKey's
        // answer is the newest.
        let delay = self.reconnect_delay;
        let outcome = Box::pin(self.initialise(&gudid)).await;
        self.reconnect_delay = delay;
        if outcome.is_ok() || outcome.as_ref().is_err_and(DeviceError::is_transient) {
            let secrets_since = if outcome.is_ok() { Instant::now() } else { unproven.secrets_since };
            self.unproven_gudid = Some(Unproven { gudid, first_answer, secrets_since });
        }
    }

    /// Waits the next reconnect delay (doubling, with jitter), serving commands; whether the
    /// task must stop.
    async fn back_off(&mut self) -> bool {
        let base = self.reconnect_delay.unwrap_or(self.knobs.reconnect_delay);
        self.reconnect_delay = Some((base * 2).min(self.knobs.reconnect_delay_max));
        let delay = self.jitter.spread(base);
        match self.wait_powered(delay).await {
            Some(end) => self.end_wait(end).await,
            None => false,
        }
    }

    /// Waits `duration` while powered and offline; `None` if it elapsed undisturbed.
    async fn wait_powered(&mut self, duration: Duration) -> Option<IdleEnd> {
        match self.idle(Some(Instant::now() + duration)).await {
            IdleEnd::Elapsed => None,
            other => Some(other),
        }
    }

    /// Handles how an offline wait ended; whether the task must stop.
    async fn end_wait(&mut self, end: IdleEnd) -> bool {
        match end {
            IdleEnd::Shutdown => return true,
            IdleEnd::Initialise(gudid, reply) => {
                let outcome = Box::pin(self.initialise_on_command(gudid)).await;
                let _ = reply.send(outcome);
            }
            IdleEnd::Elapsed | IdleEnd::Changed => {}
        }
        false
    }

    /// Serves commands without a connection until `deadline`, or until a command changes what
    /// the terminal should be doing.
    async fn idle(&mut self, deadline: Option<Instant>) -> IdleEnd {
        loop {
            let command = tokio::select! {
                command = self.commands.recv() => command,
                () = sleep_until(deadline), if deadline.is_some() => return IdleEnd::Elapsed,
            };
            // Every handle dropped: nobody can drive this terminal any more.
            let Some(command) = command else {
                return IdleEnd::Shutdown;
            };
            match self.handle_local(command).await {
                Handled::Done | Handled::HelloDue | Handled::AckDue(_) => {}
                Handled::Control(control) => match control {
                    Command::PowerOff(reply) => {
                        self.powered = false;
                        self.power_on_at = None;
                        let _ = reply.send(());
                        return IdleEnd::Changed;
                    }
                    Command::PowerOn(delay, reply) => {
                        let _ = reply.send(());
                        match delay {
                            Some(delay) if !self.powered => {
                                self.power_on_at = Some(Instant::now() + delay);
                                if deadline.is_none() {
                                    return IdleEnd::Changed;
                                }
                            }
                            _ if !self.powered => {
                                self.powered = true;
                                self.power_on_at = None;
                                return IdleEnd::Changed;
                            }
                            _ => {}
                        }
                    }
                    // Already without network: nothing more to lose.
                    Command::GoOffline(_, reply) => {
                        let _ = reply.send(());
                    }
                    Command::Initialise(gudid, reply) => return IdleEnd::Initialise(gudid, reply),
                    Command::Shutdown(reply) => {
                        self.shutdown_reply = Some(reply);
                        return IdleEnd::Shutdown;
                    }
                    _ => {}
                },
            }
            self.refresh_status();
        }
    }

    /// Commands that act on the stored state only, the same online or offline.
    async fn handle_local(&mut self, command: Command) -> Handled {
        match command {
            Command::UpdateKnobs(update, reply) => {
                update(&mut self.knobs);
                let _ = reply.send(());
                Handled::Done
            }
            Command::SetDebugMode(on, reply) => {
                self.state.debug_mode = on;
                let _ = reply.send(self.persist().await);
                Handled::HelloDue
            }
            Command::SetFirmware(rom, app, reply) => {
                self.state.rom_version = rom;
                self.state.app_version = app;
                let _ = reply.send(self.persist().await);
                Handled::HelloDue
            }
            Command::ResetSlot(slot, reply) => {
                let had_key = self.state.reset_slot(slot);
                let _ = reply.send(self.persist().await.map(|()| had_key));
                Handled::HelloDue
            }
            Command::ForceManual(reply) => match app::force_manual(&mut self.state) {
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                    Handled::Done
                }
                Ok(ack) => {
                    let persisted = self.persist().await;
                    if persisted.is_ok() {
                        self.installed();
                    }
                    let _ = reply.send(persisted.map(|()| ack.clone()));
                    Handled::AckDue(ack)
                }
            },
            control => Handled::Control(control),
        }
    }

    fn installed(&mut self) {
        self.counters.add(&self.counters.keys_installed, 1);
        self.status.send_modify(|s| s.injections += 1);
    }

    /// Writes the state where it is kept. A failure is recorded and returned; the in-memory
    /// state is kept either way.
    async fn persist(&mut self) -> Result<(), DeviceError> {
        self.state.last_up_counter = self.up.last();
        let StateStore::Directory { path, fsync } = &self.store else {
            return Ok(());
        };
        let outcome = match state::encode(&self.state) {
            Err(reason) => Err(StorageError::Corrupt { path: state::state_path(path, &self.state.sn), reason }),
            Ok(bytes) => {
                let (dir, sn, fsync) = (path.clone(), self.state.sn.clone(), *fsync);
                tokio::task::spawn_blocking(move || state::write_file(&dir, &sn, &bytes, fsync)).await.unwrap_or_else(
                    |_| Err(StorageError::Corrupt { path: path.clone(), reason: "writer panicked".to_string() }),
                )
            }
        };
        outcome.map_err(|error| {
            self.error(format!("storing state: {error}"));
            DeviceError::from(error)
        })
    }

    /// Counts a refused or timed-out connection attempt by its kind (`error` counts it too).
    fn count_connect_failure(&self, error: &ConnectionError) {
        match connect_failure(error) {
            Some(ConnectFailure::Refused) => self.counters.add(&self.counters.connects_refused, 1),
            Some(ConnectFailure::TimedOut) => self.counters.add(&self.counters.connects_timed_out, 1),
            None => {}
        }
    }

    fn error(&mut self, message: String) {
        tracing::warn!(sn = %self.state.sn, "{message}");
        self.counters.add(&self.counters.errors, 1);
        self.status.send_modify(|s| s.last_error = Some(message));
    }

    fn refresh_status(&self) {
        let state = &self.state;
        let powered = self.powered;
        self.status.send_modify(|s| {
            s.powered = powered;
            s.initialised = state.secrets.is_some();
            s.locked = state.locked;
            s.debug_mode = state.debug_mode;
            if s.slots != state.slots {
                s.slots.clone_from(&state.slots);
            }
            s.unconfirmed_acks = state.unconfirmed().count();
            s.kept_download = state.kept_download.as_ref().map(|d| d.execution_id);
            if powered {
                s.crashed = false;
            }
        });
    }

    fn reject(&mut self, rejection: Rejection) {
        self.counters.add(&self.counters.rejected_frames, 1);
        self.status.send_modify(|s| match rejection {
            Rejection::Malformed => s.rejected.malformed += 1,
            Rejection::BadTag => s.rejected.bad_tag += 1,
            Rejection::ForeignParty => s.rejected.foreign_party += 1,
            Rejection::Replay => s.rejected.replay += 1,
            Rejection::Unexpected => s.rejected.unexpected += 1,
        });
    }

    fn seal(&mut self, secrets_missing_is_bug: &str, message: Message) -> Option<Vec<u8>> {
        let counter = self.up.next_counter();
        self.seal_with_counter(secrets_missing_is_bug, message, counter)
    }

    fn seal_with_counter(&mut self, secrets_missing_is_bug: &str, message: Message, counter: u64) -> Option<Vec<u8>> {
        let secrets = self.state.secrets.as_ref()?;
        let body = Body { party: self.state.sn.clone(), counter, message };
        match frame::seal(&secrets.signing_key, &body) {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                tracing::error!(sn = %self.state.sn, "{secrets_missing_is_bug}: {error}");
                None
            }
        }
    }

    fn hello(&self) -> Message {
        let state = &self.state;
        Message::Hello(Hello {
            model: state.model.name().to_string(),
            rom_version: state.rom_version.clone(),
            app_version: state.app_version.clone(),
            region: state.region,
            debug_mode: state.debug_mode,
            locked: state.locked,
            slots: state.slots.clone(),
        })
    }

    fn queue_hello(&mut self, link: &mut Link) {
        // The first hello of a session reuses the will's counter, if nothing was sealed since.
        let counter = match self.will_counter.take() {
            Some(will) if will == self.up.last() => will,
            _ => self.up.next_counter(),
        };
        if let Some(payload) = self.seal_with_counter("sealing a hello", self.hello(), counter) {
            link.outbox.push_back(OutgoingFrame { payload, ack_of: None });
            self.counters.add(&self.counters.hellos_sent, 1);
            self.status.send_modify(|s| s.hellos_sent += 1);
        }
    }

    /// Tells the gateway that a verified down frame was refused as a replay, and why.
    fn queue_refusal(&mut self, link: &mut Link, bytes: &[u8]) {
        let Some(refusal) = app::replay_refusal(&self.state, bytes) else { return };
        if let Some(payload) = self.seal("sealing a refusal", Message::DeviceRefusal(refusal)) {
            link.outbox.push_back(OutgoingFrame { payload, ack_of: None });
            self.counters.add(&self.counters.refusals_sent, 1);
            self.status.send_modify(|s| s.refusals_sent += 1);
        }
    }

    fn queue_ack(&mut self, link: &mut Link, ack: Ack) {
        let execution_id = ack.execution_id;
        if let Some(payload) = self.seal("sealing an ack", Message::Ack(ack.clone())) {
            link.outbox.push_back(OutgoingFrame { payload, ack_of: Some(execution_id) });
            self.counters.add(&self.counters.acks_sent, 1);
            self.status.send_modify(|s| {
                s.acks_sent += 1;
                s.last_ack = Some(ack);
            });
        }
    }

    fn mqtt_options(&self, client_id: &str, password: &str, clean_session: bool) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.broker.host.clone(), self.broker.port);
        options
            .set_credentials(client_id, password)
            .set_clean_session(clean_session)
            .set_keep_alive(self.knobs.keep_alive)
            .set_inflight(INFLIGHT_MAX)
            .set_max_packet_size(PACKET_LEN_MAX, PACKET_LEN_MAX);
        options
    }

    fn event_loop(&self, options: MqttOptions) -> (AsyncClient, EventLoop) {
        let (client, mut event_loop) = AsyncClient::new(options, REQUEST_CHANNEL_CAP);
        let mut network = event_loop.network_options();
        network.set_connection_timeout(self.knobs.connect_timeout.as_secs().max(1));
        event_loop.set_network_options(network);
        (client, event_loop)
    }

    /// One connection under the device identity, until it ends.
    async fn session(&mut self) -> SessionEnd {
        let Some(secrets) = self.state.secrets.as_ref() else {
            return SessionEnd::Lost;
        };
        // rumqttc keeps credentials as a String: this copy of the password is not zeroized.
        let password = String::from_utf8_lossy(secrets.mqtt_password.expose_secret()).into_owned();
        let sn = self.state.sn.clone();
        let mut options = self.mqtt_options(&sn, &password, false);
        // The session's first hello carries the will's counter (docs/PROTOCOL.md §5.6): the
        // gateway counts a bye only if it is not older than the latest hello, so this session's
        // will counts and a previous session's, published late, does not.
        if let Some(bye) = self.seal("sealing the last will", Message::Bye) {
            options.set_last_will(LastWill::new(topic::device_up(&sn), bye, QoS::AtLeastOnce, false));
            self.will_counter = Some(self.up.last());
        }
        let (client, mut event_loop) = self.event_loop(options);
        let mut link = Link::new(client, &sn);
        let down_topic = topic::device_down(&sn);
        let mut connected = false;
        let mut delayed: VecDeque<(Instant, Ack)> = VecDeque::new();
        let flap_at = self.knobs.flapping.map(|f| (Instant::now() + f.online, f.offline));

        let end = loop {
            let ack_due = delayed.front().map(|(at, _)| *at);
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break SessionEnd::Shutdown };
                    match self.handle_local(command).await {
                        Handled::Done => {}
                        Handled::HelloDue => if connected { self.queue_hello(&mut link) },
                        Handled::AckDue(ack) => if connected { self.queue_ack(&mut link, ack) },
                        Handled::Control(control) => if let Some(end) = self.session_control(control) {
                            break end;
                        },
                    }
                    self.refresh_status();
                }
                event = event_loop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if link.client.try_subscribe(down_topic.as_str(), QoS::AtLeastOnce).is_err() {
                            self.error("subscribe request refused by the client".to_string());
                            break SessionEnd::Lost;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(suback))) => {
                        if suback.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                            self.error(format!("subscription to {down_topic} refused"));
                            break SessionEnd::Lost;
                        }
                        if !connected {
                            connected = true;
                            // An admission is not yet a proof: with several gateway nodes a newer
                            // initialisation of the GUDID may replace these secrets a moment later,
                            // and the broker then disconnects this connection. The GUDID is kept
                            // (for its 10 minutes), so that a refusal from then on initialises
                            // again; once the hello proved the secrets, the gateway refuses the
                            // GUDID and nothing changes.
                            self.reconnect_delay = None;
                            self.counters.add(&self.counters.connected, 1);
                            self.status.send_modify(|s| {
                                s.connected = true;
                                s.connections += 1;
                            });
                            self.queue_hello(&mut link);
                            self.queue_unconfirmed(&mut link, &delayed);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if publish.topic != down_topic {
                            self.reject(Rejection::Unexpected);
                        } else if let Some(end) = self.on_down_frame(&publish.payload, &mut link, &mut delayed).await {
                            break end;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(puback))) => {
                        if let Some(execution_id) = link.on_puback(puback.pkid) {
                            self.on_ack_confirmed(execution_id).await;
                        }
                    }
                    Ok(Event::Outgoing(outgoing)) => link.on_outgoing(&outgoing),
                    Ok(_) => {}
                    Err(error) => {
                        self.count_connect_failure(&error);
                        self.error(connection_error(&self.broker, &error));
                        if !connected && secrets_refused(&error) {
                            break SessionEnd::SecretsRefused;
                        }
                        break SessionEnd::Lost;
                    }
                },
                () = sleep_until(ack_due), if ack_due.is_some() => {
                    let now = Instant::now();
                    while delayed.front().is_some_and(|(at, _)| *at <= now) {
                        if let Some((_, ack)) = delayed.pop_front() {
                            self.queue_ack(&mut link, ack);
                        }
                    }
                }
                () = sleep_until(flap_at.map(|(at, _)| at)), if flap_at.is_some() => {
                    break SessionEnd::Offline(flap_at.map_or(Duration::ZERO, |(_, offline)| offline));
                }
            }
            link.flush();
        };
        if matches!(end, SessionEnd::Reinitialise(..)) {
            // Leaving on purpose, to come back under new secrets: a DISCONNECT keeps the broker
            // from publishing the last will, a bye signed with the key about to be replaced.
            close_politely(&link.client, &mut event_loop).await;
        }
        if connected {
            self.counters.sub(&self.counters.connected, 1);
        }
        self.status.send_modify(|s| s.connected = false);
        end
    }

    /// A power, network or lifecycle command during a session; `Some` ends the session.
    fn session_control(&mut self, command: Command) -> Option<SessionEnd> {
        match command {
            Command::PowerOff(reply) => {
                let _ = reply.send(());
                Some(SessionEnd::PowerOff)
            }
            Command::PowerOn(_, reply) => {
                let _ = reply.send(());
                None
            }
            Command::GoOffline(duration, reply) => {
                let _ = reply.send(());
                Some(SessionEnd::Offline(duration))
            }
            Command::Initialise(gudid, reply) => Some(SessionEnd::Reinitialise(gudid, reply)),
            Command::Shutdown(reply) => {
                self.shutdown_reply = Some(reply);
                Some(SessionEnd::Shutdown)
            }
            // Local commands never come back as control.
            _ => None,
        }
    }

    /// After a hello: re-send every ack persisted but not confirmed by the broker, unless it is
    /// already waiting (a slow ack) or queued.
    fn queue_unconfirmed(&mut self, link: &mut Link, delayed: &VecDeque<(Instant, Ack)>) {
        let pending: Vec<Ack> = self
            .state
            .unconfirmed()
            .filter(|ack| !delayed.iter().any(|(_, d)| d.execution_id == ack.execution_id))
            .filter(|ack| !link.queued_ack(ack.execution_id))
            .cloned()
            .collect();
        for ack in pending {
            self.queue_ack(link, ack);
        }
    }

    async fn on_ack_confirmed(&mut self, execution_id: u64) {
        self.counters.add(&self.counters.acks_confirmed, 1);
        self.status.send_modify(|s| s.acks_confirmed += 1);
        if self.state.confirm(execution_id) {
            let _ = self.persist().await;
            self.refresh_status();
        }
    }

    /// Handles one frame from the down topic; `Some` ends the session (the crash knob).
    async fn on_down_frame(
        &mut self,
        bytes: &[u8],
        link: &mut Link,
        delayed: &mut VecDeque<(Instant, Ack)>,
    ) -> Option<SessionEnd> {
        let (command, counter) = match app::accept_down_frame(&self.state, bytes) {
            Ok(accepted) => accepted,
            Err(rejection) => {
                self.reject(rejection);
                if rejection == Rejection::Replay {
                    self.queue_refusal(link, bytes);
                }
                return None;
            }
        };
        if let Some(counter) = counter {
            self.state.last_down_counter = counter;
        }
        match command {
            DownCommand::Refusal(refusal) => {
                self.counters.add(&self.counters.refusals_received, 1);
                self.status.send_modify(|s| {
                    s.refusals += 1;
                    s.last_refusal = Some(refusal.code);
                });
                None
            }
            DownCommand::Unlock(_) => {
                self.state.locked = false;
                if self.persist().await.is_ok() {
                    self.queue_hello(link);
                }
                self.refresh_status();
                None
            }
            DownCommand::Download(download) => {
                let decision = app::decide(&self.state, &download, self.knobs.forced_failure);
                let ack = app::apply(&mut self.state, download, &decision);
                let persisted = self.persist().await.is_ok();
                match decision {
                    Decision::Install(_) => self.installed(),
                    Decision::Refused(_) => self.counters.add(&self.counters.failure_acks, 1),
                    Decision::Duplicate(_) => {}
                }
                self.refresh_status();
                if matches!(decision, Decision::Install(_)) && self.knobs.crash_after_next_install {
                    self.knobs.crash_after_next_install = false;
                    return Some(SessionEnd::Crash);
                }
                // An ack whose decision is not durable is not sent: it stays unconfirmed in
                // memory and goes out after the next hello, once a write succeeds.
                if !persisted {
                    return None;
                }
                if self.knobs.ack_delay.is_zero() {
                    self.queue_ack(link, ack);
                } else {
                    let at = Instant::now() + self.knobs.ack_delay;
                    let index = delayed.iter().position(|(due, _)| *due > at).unwrap_or(delayed.len());
                    delayed.insert(index, (at, ack));
                }
                None
            }
        }
    }

    /// The bootstrap exchange, within the initialisation timeout, then persisting the secrets.
    async fn initialise(&mut self, gudid: &Gudid) -> Result<(), DeviceError> {
        let timeout = self.knobs.init_timeout;
        self.create_keys.begin(gudid, Instant::now());
        // What the wait saw that does not end it at once: a refusal of this attempt's CreateKey
        // while an earlier one may still be answered, an answer to an earlier CreateKey while a
        // newer one may still be (PROTOCOL.md §7.3 step 4).
        let mut wait = InitWait::default();
        let outcome = match tokio::time::timeout(timeout, self.create_key(gudid, &mut wait)).await {
            Ok(outcome) => outcome,
            Err(_) => match (wait.held.take(), wait.refused) {
                // The newer CreateKey was never answered: the held answer is the one the store has.
                (Some(held), _) => self.derive_held(gudid, held),
                (None, Some(code)) => Err(DeviceError::InitRefused(code.as_str())),
                (None, None) => Err(DeviceError::InitTimeout(timeout)),
            },
        };
        // Answered or refused, the initialisation is over and its CreateKeys are of no more use;
        // after a network failure or a timeout it goes on, and a late answer may still come.
        if !outcome.as_ref().is_err_and(DeviceError::is_transient) {
            self.create_keys.clear();
        }
        let secrets = match outcome {
            Ok(secrets) => secrets,
            Err(error) => {
                self.error(format!("initialisation failed: {error}"));
                return Err(error);
            }
        };
        let first = self.state.secrets.is_none();
        self.state.secrets = Some(secrets);
        // A new signing key starts a new down channel: the gateway's counters under the old key
        // say nothing about the new one. (A test knob may pretend it saw a gateway far ahead.)
        self.state.last_down_counter = self.knobs.accepted_down_counter_at_init.unwrap_or(0);
        self.persist().await?;
        if first {
            self.counters.add(&self.counters.initialised, 1);
        }
        self.reconnect_delay = None;
        self.refresh_status();
        Ok(())
    }

    /// Derives the secrets of a held answer with the CreateKey it names.
    fn derive_held(&mut self, gudid: &Gudid, held: HeldAnswer) -> Result<DeviceSecrets, DeviceError> {
        let Some((own, create_key_body)) = self.create_keys.take(held.request_counter) else {
            return Err(DeviceError::InitTimeout(self.knobs.init_timeout));
        };
        Ok(derive_device_secrets(own, &held.gateway_public, &gudid.mac_key(), &create_key_body, &held.answer_body)?)
    }

    /// CreateKey under the bootstrap identity: subscribe, send, await the answer or a refusal,
    /// derive the secrets, disconnect. The answer may be to this attempt's CreateKey or to an
    /// earlier one of the same initialisation ([`Terminal::create_keys`]). The gateway answers a
    /// newer CreateKey anew until the GUDID is proven (PROTOCOL.md §7.5), so the newest one's
    /// answer is the one the store keeps: an answer to an older one is held in `wait` while the
    /// newest may still be answered, and used when the wait is over. A refusal of this one while
    /// an earlier one may still be answered goes to `wait` too.
    async fn create_key(&mut self, gudid: &Gudid, wait: &mut InitWait) -> Result<DeviceSecrets, DeviceError> {
        let sn = self.state.sn.clone();
        let client_id = topic::bootstrap_client_id(&sn);
        // The bootstrap password proves, at CONNECT, that the terminal holds a live GUDID for its SN.
        let password = String::from_utf8_lossy(gudid.bootstrap_password(&sn).expose_secret()).into_owned();
        let options = self.mqtt_options(&client_id, &password, true);
        let (client, mut event_loop) = self.event_loop(options);
        let down_topic = topic::device_down(&sn);
        let mac_key = gudid.mac_key();
        // The counter of the CreateKey sent on this connection: a refusal of another one (an
        // earlier attempt's, answered late) is not this attempt's.
        let mut create_key_counter = None;
        let secrets = loop {
            let event = event_loop.poll().await.map_err(|e| {
                self.count_connect_failure(&e);
                DeviceError::Mqtt(connection_error(&self.broker, &e))
            })?;
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .try_subscribe(down_topic.as_str(), QoS::AtLeastOnce)
                        .map_err(|e| DeviceError::Mqtt(e.to_string()))?;
                }
                Event::Incoming(Packet::SubAck(suback)) => {
                    if suback.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        return Err(DeviceError::Mqtt(format!("subscription to {down_topic} refused")));
                    }
                    let own = Ephemeral::random()?;
                    let counter = self.up.next_counter();
                    let body = Body {
                        party: sn.clone(),
                        counter,
                        message: Message::CreateKey(CreateKey {
                            gudid_id: gudid.id(),
                            x_pos_device_id: self.state.x_pos_device_id.clone(),
                            device_public: own.public(),
                        }),
                    };
                    let bytes = frame::seal(&mac_key, &body).map_err(|e| DeviceError::Mqtt(e.to_string()))?;
                    let create_key_body = frame::body_bytes_of(&bytes).map(<[u8]>::to_vec).unwrap_or_default();
                    // Kept before it is sent: its answer may come at any time from now on.
                    self.create_keys.record(counter, own, create_key_body, Instant::now());
                    create_key_counter = Some(counter);
                    client
                        .try_publish(topic::init(&sn), QoS::AtLeastOnce, false, bytes)
                        .map_err(|e| DeviceError::Mqtt(e.to_string()))?;
                }
                Event::Incoming(Packet::Publish(publish)) if publish.topic == down_topic => {
                    match read_init_frame(&sn, gudid, &self.create_keys, create_key_counter, &publish.payload) {
                        InitFrame::Ignored(rejection) => self.reject(rejection),
                        InitFrame::Refused(code) => {
                            // Refusals are not authenticated, and in a cluster one CreateKey may
                            // be handled twice (at-least-once delivery): one node answers it, the
                            // other refuses the duplicate (`GudidUsed`), in either order. With an
                            // earlier CreateKey kept, wait for an answer until the timeout.
                            let this = create_key_counter.unwrap_or_default();
                            if !self.create_keys.others_than(this) && wait.held.is_none() {
                                return Err(DeviceError::InitRefused(code.as_str()));
                            }
                            wait.refused = Some(code);
                        }
                        InitFrame::Answered { request_counter, gateway_public, answer_body } => {
                            let held = HeldAnswer { request_counter, gateway_public, answer_body };
                            // Held until the timeout even if the newest was refused: that
                            // refusal may be of a duplicate of the newest, whose answer still comes.
                            let newer_outstanding = self.create_keys.newest().is_some_and(|n| n > request_counter);
                            if newer_outstanding {
                                if wait.held.as_ref().is_none_or(|h| h.request_counter < request_counter) {
                                    wait.held = Some(held);
                                }
                                continue;
                            }
                            break self.derive_held(gudid, held)?;
                        }
                    }
                }
                _ => {}
            }
        };
        // The bootstrap identity has nothing more to say.
        close_politely(&client, &mut event_loop).await;
        Ok(secrets)
    }
}

/// An answer to a CreateKey older than the newest one sent, held while the newest may still be
/// answered.
struct HeldAnswer {
    request_counter: u64,
    gateway_public: [u8; 32],
    answer_body: Vec<u8>,
}

/// What an initialisation's wait saw that did not end it at once.
#[derive(Default)]
struct InitWait {
    refused: Option<RefusalCode>,
    held: Option<HeldAnswer>,
}

/// Sends a DISCONNECT and waits (briefly) until it is written.
async fn close_politely(client: &AsyncClient, event_loop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match event_loop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectFailure {
    Refused,
    TimedOut,
}

/// Whether a connection attempt was refused at the TCP level or timed out; `None` for every other
/// failure (a CONNACK refusal, a connection lost after it was up, a protocol error).
fn connect_failure(error: &ConnectionError) -> Option<ConnectFailure> {
    match error {
        ConnectionError::NetworkTimeout => Some(ConnectFailure::TimedOut),
        ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(ConnectFailure::Refused),
        ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => Some(ConnectFailure::TimedOut),
        _ => None,
    }
}

/// Whether the broker refused a CONNECT for its user name or password.
fn secrets_refused(error: &ConnectionError) -> bool {
    matches!(
        error,
        ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized | rumqttc::ConnectReturnCode::BadUserNamePassword
        )
    )
}

/// A configured GUDID whose secrets no session has used yet.
struct Unproven {
    gudid: Gudid,
    /// The first initialisation with it: the gateway answers it anew for 10 minutes from then.
    first_answer: Instant,
    /// The latest initialisation: when the secrets now held were derived.
    secrets_since: Instant,
}

/// What a terminal refused at CONNECT does with its unproven GUDID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reinitialise {
    /// Initialise again with it.
    Now,
    /// Retry the CONNECT: the broker may not know the secrets yet.
    NotYet,
    /// Too late for the gateway to answer it anew: keep retrying the CONNECT only.
    Never,
}

fn initialise_again_when(since_first_answer: Duration, since_secrets: Duration) -> Reinitialise {
    if since_first_answer >= REINITIALISE_WINDOW {
        Reinitialise::Never
    } else if since_secrets < SECRETS_REFUSED_FOR {
        Reinitialise::NotYet
    } else {
        Reinitialise::Now
    }
}

fn connection_error(broker: &BrokerAddr, error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(code) => {
            format!("{broker} refused the connection: {code:?}")
        }
        other => format!("{broker}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_secrets_are_told_apart_and_initialised_again_within_the_window_only() {
        use rumqttc::ConnectReturnCode as Code;
        for code in [Code::NotAuthorized, Code::BadUserNamePassword] {
            assert!(secrets_refused(&ConnectionError::ConnectionRefused(code)), "{code:?}");
        }
        for other in [
            ConnectionError::ConnectionRefused(Code::ServiceUnavailable),
            ConnectionError::ConnectionRefused(Code::BadClientId),
            ConnectionError::NetworkTimeout,
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            assert!(!secrets_refused(&other), "{other:?}");
        }
        let ms = Duration::from_millis;
        let cases = [
            (Duration::ZERO, Duration::ZERO, Reinitialise::NotYet),
            (SECRETS_REFUSED_FOR - ms(1), SECRETS_REFUSED_FOR - ms(1), Reinitialise::NotYet),
            (SECRETS_REFUSED_FOR, SECRETS_REFUSED_FOR, Reinitialise::Now),
            (REINITIALISE_WINDOW - ms(1), SECRETS_REFUSED_FOR, Reinitialise::Now),
            (REINITIALISE_WINDOW - ms(1), ms(5), Reinitialise::NotYet),
            (REINITIALISE_WINDOW, REINITIALISE_WINDOW, Reinitialise::Never),
        ];
        for (first, secrets, expected) in cases {
            assert_eq!(initialise_again_when(first, secrets), expected, "{first:?} {secrets:?}");
        }
        assert!(REINITIALISE_WINDOW < Duration::from_secs(10 * 60), "inside the gateway's proof window");
        assert!(SECRETS_REFUSED_FOR > Duration::from_secs(5), "longer than the file mode's rewrite");
    }

    #[test]
    fn a_refused_or_timed_out_connect_is_told_apart_from_other_failures() {
        let io = |kind: std::io::ErrorKind| ConnectionError::Io(std::io::Error::from(kind));
        assert_eq!(connect_failure(&io(std::io::ErrorKind::ConnectionRefused)), Some(ConnectFailure::Refused));
        assert_eq!(connect_failure(&io(std::io::ErrorKind::TimedOut)), Some(ConnectFailure::TimedOut));
        assert_eq!(connect_failure(&ConnectionError::NetworkTimeout), Some(ConnectFailure::TimedOut));
        // A connection that was up and broke, and a CONNACK refusal, are other failures.
        assert_eq!(connect_failure(&io(std::io::ErrorKind::ConnectionReset)), None);
        let refused = ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized);
        assert_eq!(connect_failure(&refused), None);
    }
}
