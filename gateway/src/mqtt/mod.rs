//! The terminals' MQTT endpoint: the gateway is their MQTT server, on its own tokio runtime.
//!
//! Layout:
//! - [`codec`]: packets in and out, by rumqttc's MQTT 3.1.1 and 5.0 codecs (the only MQTT bytes);
//! - [`rules`]: pure decisions: identities and their topics, CONNACK codes, the connection bound,
//!   keep-alive and session lifetimes;
//! - [`session`]: per client id, the live connection, the subscription and the QoS 1 downlinks;
//! - [`connection`]: one task per connection, from the TCP accept (and TLS handshake) to its end;
//! - this file: the listeners' accept loops, and [`MqttOutbound`], the engine's way out.
//!
//! Only this module knows MQTT packets. Routing is by SN, in O(1): a downlink's topic names its SN,
//! and the SN names the client.

pub mod codec;
mod connection;
pub mod rules;
pub mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rki_protocol::topic;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::engine::{Engine, Outbound};
use crate::metrics as m;
use session::{Client, Down};

/// The listen backlog of the endpoint's sockets (the kernel caps it at `net.core.somaxconn`,
/// 4,096 by default): a reconnect storm queues instead of having its SYNs dropped.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Pause of an accept loop after the process ran out of descriptors: long enough not to spin,
/// short enough that the endpoint serves again as soon as descriptors are freed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Bootstrap (`init@{SN}`) connections open at once, from the CONNECT's check to the end of the
/// connection. Each is an initialisation under way: a store read and a PBKDF2 check at CONNECT,
/// then an X25519 exchange, three key seals and a durable commit. Over the bound a bootstrap
/// CONNECT is refused at once, before any of that, as "server unavailable" (`bootstrap_busy`),
/// and the terminal retries after its backoff with its GUDID untouched. Without it a fleet
/// powered on at once queues more initialisations than the gateway answers within a
/// terminal's CreateKey timeout: answers come late, GUDIDs are spent for terminals that gave
/// up, and their retries are refused. At ~1,000 initialisations a second, 512 in flight is
/// about half a second of queue.
pub const BOOTSTRAP_SESSIONS_MAX: usize = 512;
/// How long a bootstrap CONNECT waits for a place before it is refused as busy: within a
/// terminal's CONNACK timeout (10 s in the simulated fleet), leaving it time for the exchange, so
/// that a terminal waits in line rather than retrying: each refusal costs both sides a TCP
/// connection and a CONNECT (19,000 terminals powered on at once: 55,447 refusals with 4 s and a
/// line of 2,048, about 20,000 with 6 s and 8,192, connect phase 13.1 → 10.9-11.4 s).
const BOOTSTRAP_QUEUE_WAIT: Duration = Duration::from_secs(6);
/// Bootstrap CONNECTs waiting in line at most. A waiting connection no longer holds a place
/// among the sockets awaiting a CONNECT (so the accept loop keeps going), but one among the open
/// connections: this bound keeps a flood of `init@{SN}` CONNECTs, which cost nothing to send, from
/// taking more than a few seconds' worth of initialisations' places: about the initialisations
/// this machine answers in [`BOOTSTRAP_QUEUE_WAIT`].
const BOOTSTRAP_LINE_MAX: usize = 8192;
/// How often kept sessions past their lifetime are forgotten.
const SESSION_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The endpoint's settings (`[mqtt]` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time from the TCP accept to a complete CONNECT (the TLS handshake included).
    pub connect_timeout: Duration,
    /// Downlinks a session keeps (queued and unacknowledged) at most.
    pub session_messages_max: usize,
    /// Longest a session outlives its connection.
    pub session_lifetime_max: Duration,
    /// Sockets the endpoint holds at once: its share of the open-file limit. A fiftieth of them
    /// (8 to 512, `rules::pending_bound`) are for connections before their CONNACK; over that
    /// the accept loop waits, leaving new sockets in the backlog. The rest are for authenticated
    /// connections; over that a CONNECT gets "server unavailable".
    pub connections_max: usize,
}

/// What every connection task shares.
pub struct Shared {
    settings: Settings,
    /// Client id → its state; an entry lives while connected, or while its session is kept.
    clients: DashMap<String, Arc<Client>>,
    /// The engine, once started (connections are served only then).
    engine: std::sync::OnceLock<Arc<Engine>>,
    /// Accepted (CONNACKed) connections open now, against `authenticated_max`.
    open: AtomicUsize,
    /// Places of bootstrap connections being checked or open ([`BOOTSTRAP_SESSIONS_MAX`]).
    bootstrapping: tokio::sync::Semaphore,
    /// Bootstrap CONNECTs waiting for a place ([`BOOTSTRAP_LINE_MAX`]).
    bootstrap_waiting: AtomicUsize,
    /// Authenticated connections at most (`rules::authenticated_bound`).
    authenticated_max: usize,
    /// One permit per socket accepted and not yet CONNACKed (`rules::pending_bound`).
    pending: Arc<Semaphore>,
    next_conn_id: AtomicU64,
    /// Millisecond (since `started`, plus one; 0: none yet) of the last refusal or accept-error log
    /// line: at most one a second.
    last_log_ms: AtomicU64,
    started: Instant,
}

/// One of the [`BOOTSTRAP_SESSIONS_MAX`] places of a bootstrap connection, given back on drop.
type BootstrapSlot<'a> = tokio::sync::SemaphorePermit<'a>;

impl Shared {
    /// A bootstrap connection's place: at once if one is free, else the first to free up within
    /// [`BOOTSTRAP_QUEUE_WAIT`] (waiters are served in order); `None` past it.
    /// At most [`BOOTSTRAP_LINE_MAX`] wait at once; one more is refused at once.
    async fn bootstrap_slot(&self) -> Option<BootstrapSlot<'_>> {
        if let Ok(slot) = self.bootstrapping.try_acquire() {
            return Some(slot);
        }
        /// A place in the line, given back however the wait ends (a dropped future included).
        struct InLine<'a>(&'a AtomicUsize);
        impl Drop for InLine<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _in_line = InLine(&self.bootstrap_waiting);
        if self.bootstrap_waiting.fetch_add(1, Ordering::Relaxed) >= BOOTSTRAP_LINE_MAX {
            return None;
        }
        tokio::time::timeout(BOOTSTRAP_QUEUE_WAIT, self.bootstrapping.acquire()).await.ok()?.ok()
    }

    /// Whether a rate-limited log line may be written now.
    /// At least a second after the previous one, not merely in another calendar second (which let
    /// two lines through a few milliseconds apart).
    fn may_log(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + 1000 {
            return false;
        }
        self.last_log_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// The engine's publishes, routed to the connection (or kept session) of the SN they name.
pub struct MqttOutbound {
    shared: Arc<Shared>,
}

impl Outbound for MqttOutbound {
    fn device_connected(&self, sn: &str) -> Option<bool> {
        Some(self.shared.clients.get(sn).is_some_and(|client| client.lock().is_connected()))
    }

    fn publish(&self, topic_name: String, payload: Vec<u8>) {
        if let Some((org, name)) = topic::parse_backend_outbound(&topic_name) {
            let kind = if topic_name == topic::backend_events(org, name) {
                session::Subscription::Events
            } else {
                session::Subscription::Reply
            };
            return self.publish_to_backend(
                format!(
                    "{}{org}{}{name}",
                    rki_protocol::backend::CLIENT_ID_PREFIX,
                    rki_protocol::backend::CLIENT_ID_SEPARATOR
                ),
                topic_name,
                kind,
                payload,
            );
        }
        self.publish_to_device(topic_name, payload, None);
    }

    fn publish_download(&self, topic: String, payload: Vec<u8>, execution_id: i64) {
        self.publish_to_device(topic, payload, Some(execution_id));
    }

    fn withdraw(&self, sn: &str, execution_id: i64) {
        let Some(client) = self.shared.clients.get(sn).map(|c| c.clone()) else { return };
        let dropped = client.lock().withdraw(execution_id);
        if dropped > 0 {
            metrics::counter!(m::MQTT_DOWNLINKS_DROPPED_TOTAL, "reason" => "withdrawn").increment(dropped as u64);
        }
    }

    /// A revoked backend's live connection closes at once (5.0: DISCONNECT 0x87), and its session
    /// goes: nothing more is sent to it, and a new CONNECT is refused by the store's verdict.
    fn broker_revoked(
        &self,
        identities: Vec<crate::dynsec::BrokerIdentity>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        for identity in identities {
            let crate::dynsec::BrokerIdentity::Backend(id) = identity else { continue };
            let Some((_, client)) = self.shared.clients.remove(&id.client_id()) else { continue };
            if let Some(wake) = client.evict() {
                wake.notify_one();
            }
        }
        Box::pin(std::future::ready(()))
    }
}

impl MqttOutbound {
    /// Queues a downlink for the SN its topic names: to its device identity, and to its bootstrap
    /// identity (a CreateKeyAnswer or a Refusal awaited).
    fn publish_to_device(&self, topic_name: String, payload: Vec<u8>, execution: Option<i64>) {
        let Some(sn) = topic::parse_device_down(&topic_name) else {
            metrics::counter!(m::MQTT_DOWNLINKS_DROPPED_TOTAL, "reason" => "not_a_device_topic").increment(1);
            return;
        };
        let down = Down { topic: Arc::from(topic_name.as_str()), payload: payload.into(), execution };
        let mut outcome = Err(session::Dropped::NoSession);
        // The device, and the SN's bootstrap identity (a CreateKeyAnswer or a Refusal awaited).
        for client_id in [sn.to_string(), topic::bootstrap_client_id(sn)] {
            let Some(client) = self.shared.clients.get(&client_id).map(|c| c.clone()) else { continue };
            let queued = client.lock().queue(
                down.clone(),
                session::Subscription::Down,
                self.shared.settings.session_messages_max,
            );
            match queued {
                Ok(wake) => {
                    if let Some(wake) = wake {
                        wake.notify_one();
                    }
                    outcome = Ok(());
                }
                Err(why) if outcome.is_err() => outcome = Err(why),
                Err(_) => {}
            }
        }
        if let Err(why) = outcome {
            // The retry timer or the device's next hello sends it again.
            metrics::counter!(m::MQTT_DOWNLINKS_DROPPED_TOTAL, "reason" => why.reason()).increment(1);
        }
    }

    /// A backend's answer or event, to its connection or kept session.
    fn publish_to_backend(&self, client_id: String, topic_name: String, kind: session::Subscription, payload: Vec<u8>) {
        let down = Down { topic: Arc::from(topic_name.as_str()), payload: payload.into(), execution: None };
        let outcome = match self.shared.clients.get(&client_id).map(|c| c.clone()) {
            Some(client) => client.lock().queue(down, kind, rules::BACKEND_SESSION_MESSAGES_MAX),
            None => Err(session::Dropped::NoSession),
        };
        match outcome {
            Ok(Some(wake)) => wake.notify_one(),
            Ok(None) => {}
            // The backend asks again (`Events`) and gets it from the store.
            Err(why) => metrics::counter!(m::MQTT_DOWNLINKS_DROPPED_TOTAL, "reason" => why.reason()).increment(1),
        }
    }
}

/// The endpoint, before and after it listens.
pub struct Endpoint {
    shared: Arc<Shared>,
}

impl Endpoint {
    pub fn new(settings: Settings) -> Self {
        let authenticated_max = rules::authenticated_bound(settings.connections_max);
        let pending = rules::pending_bound(settings.connections_max);
        metrics::gauge!(m::MQTT_CONNECTIONS_MAX).set(authenticated_max as f64);
        metrics::gauge!(m::MQTT_CONNECTIONS).set(0.0);
        for reason in rules::CONNECT_REFUSAL_REASONS {
            metrics::counter!(m::MQTT_CONNECT_REFUSED_TOTAL, "reason" => *reason).increment(0);
        }
        Self {
            shared: Arc::new(Shared {
                settings,
                clients: DashMap::new(),
                engine: std::sync::OnceLock::new(),
                open: AtomicUsize::new(0),
                bootstrapping: tokio::sync::Semaphore::new(BOOTSTRAP_SESSIONS_MAX),
                bootstrap_waiting: AtomicUsize::new(0),
                authenticated_max,
                pending: Arc::new(Semaphore::new(pending)),
                next_conn_id: AtomicU64::new(1),
                last_log_ms: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    /// The engine's way out, to give to `Engine::start`.
    pub fn outbound(&self) -> Arc<dyn Outbound> {
        Arc::new(MqttOutbound { shared: self.shared.clone() })
    }

    /// Binds the plain listener on `plain` and the TLS one on `tls`, without serving them yet:
    /// the gateway binds before it opens its store, so that terminals reconnecting while it
    /// starts wait in the listen backlog instead of being refused and backing off.
    pub fn bind(plain: Option<SocketAddr>, tls: Option<SocketAddr>) -> Result<Listeners, String> {
        Ok(Listeners { plain: plain.map(listen).transpose()?, tls: tls.map(listen).transpose()? })
    }

    /// Serves `listeners` with `engine`, the TLS one with the certificate and key given.
    /// Returns the bound addresses (a port of 0 picks one).
    pub async fn serve(
        &self,
        engine: Arc<Engine>,
        listeners: Listeners,
        tls_files: Option<(&Path, &Path)>,
    ) -> Result<Vec<SocketAddr>, String> {
        let _ = self.shared.engine.set(engine);
        let mut bound = Vec::new();
        if let Some(listener) = listeners.plain {
            bound.push(listener.local_addr().map_err(|e| e.to_string())?);
            tokio::spawn(accept_loop(listener, self.shared.clone(), None));
        }
        if let (Some(listener), Some((cert, key))) = (listeners.tls, tls_files) {
            let acceptor = connection::tls_acceptor(cert, key)?;
            bound.push(listener.local_addr().map_err(|e| e.to_string())?);
            tokio::spawn(accept_loop(listener, self.shared.clone(), Some(acceptor)));
        }
        tokio::spawn(sweep_sessions(self.shared.clone()));
        metrics::gauge!(m::BROKER_UP).set(1.0);
        info!(
            listeners = ?bound,
            connections_max = self.shared.authenticated_max,
            pending_max = rules::pending_bound(self.shared.settings.connections_max),
            "MQTT endpoint listening"
        );
        Ok(bound)
    }
}

/// The endpoint's listening sockets, bound and not yet served ([`Endpoint::bind`]).
pub struct Listeners {
    plain: Option<TcpListener>,
    tls: Option<TcpListener>,
}

/// A listening socket with the endpoint's backlog.
fn listen(addr: SocketAddr) -> Result<TcpListener, String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| format!("mqtt {addr}: {e}"))?;
    socket.set_reuseaddr(true).map_err(|e| format!("mqtt {addr}: {e}"))?;
    socket.bind(addr).map_err(|e| format!("mqtt {addr}: {e}"))?;
    socket.listen(LISTEN_BACKLOG).map_err(|e| format!("mqtt {addr}: {e}"))
}

/// Whether an accept error means the process or the system ran out of descriptors
/// (EMFILE 24, ENFILE 23 on Linux).
fn is_descriptor_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23) | Some(24))
}

/// Accepts while fewer than the pending bound of sockets await their CONNACK (then the next ones
/// wait in the listen backlog); one task per connection. When descriptors run out all the same,
/// it backs off briefly, logging at most one line a second, so it never spins.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let Ok(permit) = shared.pending.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let conn = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection::run(shared.clone(), stream, peer, tls.clone(), conn, permit));
            }
            Err(e) if is_descriptor_exhaustion(&e) => {
                metrics::counter!(m::MQTT_ACCEPT_ERRORS_TOTAL, "kind" => "descriptors").increment(1);
                if shared.may_log() {
                    warn!(error = %e, "MQTT accept: out of file descriptors; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Err(e) => {
                // A connection reset before it was accepted, and the like: the next one is fine.
                metrics::counter!(m::MQTT_ACCEPT_ERRORS_TOTAL, "kind" => "other").increment(1);
                if shared.may_log() {
                    warn!(error = %e, "MQTT accept failed");
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Forgets disconnected sessions past their lifetime.
async fn sweep_sessions(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SESSION_SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let now = Instant::now();
        shared.clients.retain(|_, client| !client.lock().is_forgettable(now));
        metrics::gauge!(m::MQTT_SESSIONS).set(shared.clients.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection costs its task: the future of `connection::run`, kept for the
    /// connection's life. Everything up to the CONNACK, a packet's handling and the close are
    /// boxed, and so are `run`'s arguments, so that their states (a TLS handshake's above all) do
    /// not size it: 2,064 bytes at first, which with tokio's task header and trailer (about 100
    /// bytes, the cell aligned to 128) took jemalloc's 2,560-byte class; then 1,368, in the
    /// 1,536-byte class; 696 now, in the 896-byte class. This keeps it there.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let endpoint = super::Endpoint::new(super::Settings {
            connect_timeout: std::time::Duration::from_secs(10),
            session_messages_max: 10,
            session_lifetime_max: std::time::Duration::from_secs(10),
            connections_max: 100,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = tokio::net::TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.expect("permit");
        let task = super::connection::run(endpoint.shared.clone(), stream, peer, None, 1, permit);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 696, "a connection's task is {size} bytes");
    }
}
