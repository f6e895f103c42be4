//! The embedded broker: rumqttd in this process, reached through local links.
//!
//! Known rumqttd behaviour this module designs around:
//! - sessions live in memory only: delivery never depends on them (the store and the device's
//!   hello drive it);
//! - a local link publishes at QoS 0, so a download reaches the device at QoS 0 even though the
//!   device subscribes at QoS 1: a lost download is re-published by the retry timer or the next
//!   hello;
//! - every subscription filter has its own in-memory commitlog: device filters are sized small,
//!   the gateway's wildcard filters large enough for a fleet-wide burst; a slow consumer that is
//!   overtaken loses messages (`CursorJump`), which the retry design makes harmless;
//! - the accept loop sleeps `next_connection_delay_ms` after each accept: 0 here, which tokio
//!   still rounds up to its 1 ms tick, so one listener accepts at most ~760 connections/s;
//! - the listener is bound with the standard library's backlog of 128, so a reconnect storm
//!   overflows it and the terminals' SYNs are dropped and retried after 1, 3, 7, 15 s: the gateway
//!   raises the backlog of rumqttd's socket once it is listening ([`raise_listen_backlog`]);
//! - over `max_connections` a client gets no CONNACK: the limit is derived from the open-file limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rki_protocol::topic;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, SegmentConfig, ServerSettings};
use tracing::{error, info, warn};

use crate::engine::{Engine, InboundMessage, Outbound};
use crate::metrics as m;

/// Segment size of a device's own topic filter: a handful of frames.
const DEVICE_SEGMENT_BYTES: usize = 16 * 1024;
/// Segment size of the gateway's wildcard filters: a fleet-wide burst of acks (19,000 × ~130 B).
pub const FLEET_SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// Largest MQTT payload accepted: a frame is at most 4 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024;
/// File descriptors kept for the store, the HTTP listener and logs.
const FD_RESERVE: u64 = 300;

/// The connection limit for this process: the open-file hard limit, less a reserve.
pub fn max_connections_from_fd_limit() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((_, hard)) if hard > FD_RESERVE + 100 => (hard - FD_RESERVE).min(1_000_000) as usize,
        _ => 1000,
    }
}

fn router_config(max_connections: usize, fleet_segment_bytes: usize) -> RouterConfig {
    let mut custom = HashMap::new();
    for filter in [topic::FILTER_DEVICE_UP, topic::FILTER_INIT, topic::FILTER_BACKEND_TASKS] {
        custom
            .insert(filter.to_string(), SegmentConfig { max_segment_size: fleet_segment_bytes, max_segment_count: 4 });
    }
    RouterConfig {
        max_connections,
        max_outgoing_packet_count: 200,
        max_segment_size: DEVICE_SEGMENT_BYTES,
        max_segment_count: 2,
        custom_segment: Some(custom),
        ..Default::default()
    }
}

/// The embedded broker's connection settings, without the auth handler (the gateway adds its
/// own; [`run_plain`] runs without one).
fn connection_settings() -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    }
}

/// The embedded broker's whole rumqttd configuration: one v4 listener on `addr`, the router
/// sized for the fleet, meters and alerts every second when `meters` is set. [`EmbeddedBroker`]
/// and [`run_plain`] both start from it.
fn broker_config(
    addr: SocketAddr,
    max_connections: usize,
    fleet_segment_bytes: usize,
    connections: ConnectionSettings,
    meters: bool,
) -> Result<Config, String> {
    let server =
        ServerSettings { name: "v4".into(), listen: addr, tls: None, next_connection_delay_ms: 0, connections };
    let every_second: rumqttd::MetricSettings =
        serde_json::from_value(serde_json::json!({"push_interval": 1})).map_err(|e| e.to_string())?;
    Ok(Config {
        id: 0,
        router: router_config(max_connections, fleet_segment_bytes.max(1024)),
        v4: Some(HashMap::from([("1".to_string(), server)])),
        metrics: meters.then(|| {
            HashMap::from([
                (rumqttd::MetricType::Meters, every_second.clone()),
                (rumqttd::MetricType::Alerts, every_second),
            ])
        }),
        ..Default::default()
    })
}

/// The listen backlog the gateway gives rumqttd's listener (the kernel caps it at
/// `net.core.somaxconn`, 4,096 by default): a queue for a few seconds of a reconnect storm at the
/// accept loop's pace, instead of 128 connections.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Raises the listen backlog of the listening TCP sockets of this process bound to exactly `addr`
/// (rumqttd's, which rumqttd creates and never shows): each is duplicated with `pidfd_getfd`
/// (the process's own descriptors; Linux 5.6 and later) and `listen` is called again on the
/// duplicate, which Linux applies to the listening socket as a new backlog. Returns how many
/// sockets it raised.
pub fn raise_listen_backlog(addr: SocketAddr, backlog: i32) -> Result<usize, String> {
    use rustix::process::{pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let me = pidfd_open(rustix::process::getpid(), PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
    let mut raised = 0;
    for entry in std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))? {
        let Some(number) = entry.ok().and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok())) else {
            continue;
        };
        // Only sockets are duplicated. Closing a duplicate of a regular file would release every
        // POSIX (`fcntl`) lock this process holds on that file: SQLite's locks on the store, its
        // WAL and its shared memory. Another process opening the store would then take itself
        // for the last connection and delete the WAL the gateway still writes into. `readlink`
        // on `/proc/self/fd/N` opens nothing.
        if !is_socket_descriptor(number) {
            continue;
        }
        // A descriptor closed since the listing is skipped; a kernel or sandbox that refuses the
        // call (before Linux 5.6, or a seccomp filter) is an error.
        let fd = match pidfd_getfd(&me, number, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::BADF => continue,
            Err(e) => return Err(format!("pidfd_getfd: {e}")),
        };
        if !matches!(rustix::net::sockopt::socket_acceptconn(&fd), Ok(true)) {
            continue;
        }
        let bound = rustix::net::getsockname(&fd).ok().and_then(|a| SocketAddr::try_from(a).ok());
        if bound == Some(addr) {
            rustix::net::listen(&fd, backlog).map_err(|e| format!("listen: {e}"))?;
            raised += 1;
        }
    }
    Ok(raised)
}

/// Whether descriptor `number` of this process is a socket, read from its `/proc/self/fd` link
/// (`socket:[inode]`) without opening anything.
fn is_socket_descriptor(number: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{number}"))
        .map(|target| target.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
        .unwrap_or(false)
}

/// Waits (on a thread of its own, up to 10 s) for rumqttd to listen on `addr`, then raises its
/// backlog; says in the log what it did. A port of 0 is left alone (the bound port is unknown).
fn raise_backlog_when_listening(addr: SocketAddr) -> Option<std::thread::JoinHandle<()>> {
    if addr.port() == 0 {
        return None;
    }
    let spawned = std::thread::Builder::new().name("listen-backlog".into()).spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match raise_listen_backlog(addr, LISTEN_BACKLOG) {
                Ok(0) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Ok(0) => return warn!(%addr, "MQTT listener not found: its listen backlog stays at 128"),
                Ok(_) => return info!(%addr, backlog = LISTEN_BACKLOG, "MQTT listener backlog raised"),
                Err(e) => return warn!(%addr, error = %e, "cannot raise the MQTT listener's backlog; it stays at 128"),
            }
        }
    });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            warn!(error = %e, "cannot start the listen-backlog thread");
            None
        }
    }
}

/// Runs rumqttd alone on `addr`, with the embedded broker's settings and nothing of the gateway
/// (no authentication, no local link, no engine), until it stops: the load tester's
/// `rki-plain-broker`, a baseline that shows the embedded broker's own share of a push.
pub fn run_plain(addr: SocketAddr) -> Result<(), String> {
    let config =
        broker_config(addr, max_connections_from_fd_limit(), FLEET_SEGMENT_BYTES, connection_settings(), false)?;
    let _backlog = raise_backlog_when_listening(addr);
    Broker::new(config).start().map_err(|e| format!("rumqttd: {e}"))
}

/// Publishes through the broker's local link from a dedicated thread, so the engine never blocks
/// on the router's channel.
struct LinkOutbound {
    tx: std::sync::mpsc::Sender<(String, Vec<u8>)>,
}

impl Outbound for LinkOutbound {
    fn publish(&self, topic: String, payload: Vec<u8>) {
        if self.tx.send((topic, payload)).is_err() {
            error!("broker link closed; publish dropped (the retry timer will re-deliver)");
        }
    }
}

/// The engine, once built; the broker's auth handler refuses everyone until then.
pub type EngineCell = Arc<OnceLock<Arc<Engine>>>;

pub struct EmbeddedBroker {
    pub outbound: Arc<dyn Outbound>,
    link_rx: Option<LinkRx>,
    /// The router's meters and alerts, exported as `rki_broker_*` metrics.
    meters: Option<rumqttd::meters::MetersLink>,
    alerts: Option<rumqttd::alerts::AlertsLink>,
    pub max_connections: usize,
    /// The thread raising the listener's backlog; the server waits for it before it checks that
    /// the store's locks are still held.
    backlog: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `addr` on its own threads.
    pub fn start(
        addr: SocketAddr,
        max_connections: usize,
        fleet_segment_bytes: usize,
        engine: EngineCell,
    ) -> Result<Self, String> {
        let mut connections = connection_settings();
        connections.set_auth_handler(move |client_id: String, username: String, password: String| {
            let engine = engine.clone();
            async move {
                let Some(engine) = engine.get().cloned() else {
                    metrics::counter!(m::MQTT_CONNECT_REFUSED_TOTAL, "reason" => "starting").increment(1);
                    return false;
                };
                // The check may read the store, which must not run on an async thread.
                let checked =
                    tokio::task::spawn_blocking(move || engine.authenticate(&client_id, &username, &password)).await;
                match checked.unwrap_or(Err("internal")) {
                    Ok(()) => true,
                    Err(reason) => {
                        metrics::counter!(m::MQTT_CONNECT_REFUSED_TOTAL, "reason" => reason).increment(1);
                        false
                    }
                }
            }
        });
        let config = broker_config(addr, max_connections, fleet_segment_bytes, connections, true)?;
        let mut broker = Broker::new(config);
        let meters = broker.meters().map_err(|e| format!("broker meters: {e}"))?;
        let alerts = broker.alerts().map_err(|e| format!("broker alerts: {e}"))?;
        let (mut link_tx, link_rx) = broker.link("rki-gateway").map_err(|e| format!("broker link: {e}"))?;
        for filter in [topic::FILTER_DEVICE_UP, topic::FILTER_INIT, topic::FILTER_BACKEND_TASKS] {
            link_tx.subscribe(filter).map_err(|e| format!("subscribe {filter}: {e}"))?;
        }
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    error!(error = %e, "embedded broker stopped");
                    metrics::gauge!(m::BROKER_UP).set(0.0);
                }
            })
            .map_err(|e| e.to_string())?;
        let backlog = raise_backlog_when_listening(addr);
        let (tx, rx) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
        std::thread::Builder::new()
            .name("broker-publish".into())
            .spawn(move || publish_loop(link_tx, rx))
            .map_err(|e| e.to_string())?;
        metrics::gauge!(m::BROKER_UP).set(1.0);
        metrics::gauge!(m::MQTT_CONNECTIONS_MAX).set(max_connections as f64);
        info!(%addr, max_connections, "embedded MQTT broker listening");
        Ok(Self {
            outbound: Arc::new(LinkOutbound { tx }),
            link_rx: Some(link_rx),
            meters: Some(meters),
            alerts: Some(alerts),
            max_connections,
            backlog,
        })
    }

    /// Waits until the listener's backlog has been raised (or given up on, after at most 10 s).
    pub fn wait_for_backlog(&mut self) {
        if let Some(handle) = self.backlog.take() {
            let _ = handle.join();
        }
    }

    /// Exports the router's meters and alerts as metrics, until the broker stops.
    fn run_meters(&mut self) {
        if let Some(meters) = self.meters.take() {
            tokio::spawn(async move {
                while let Ok(batch) = meters.next().await {
                    for meter in batch {
                        if let rumqttd::Meter::Router(_, r) = meter {
                            metrics::gauge!(m::BROKER_CONNECTIONS).set(r.total_connections as f64);
                            metrics::gauge!(m::BROKER_SUBSCRIPTIONS).set(r.total_subscriptions as f64);
                            metrics::counter!(m::BROKER_PUBLISHES_TOTAL).increment(r.total_publishes as u64);
                            metrics::counter!(m::BROKER_FAILED_PUBLISHES_TOTAL).increment(r.failed_publishes as u64);
                        }
                    }
                }
            });
        }
        if let Some(alerts) = self.alerts.take() {
            tokio::spawn(async move {
                while let Ok(batch) = alerts.next().await {
                    for alert in batch {
                        let kind = alert.kind.name();
                        // rumqttd 0.20 reports `lost: 0` on every cursor jump, so only the jumps are
                        // counted; the kind is not exported, but it is Serialize.
                        let detail = serde_json::to_value(&alert.kind).unwrap_or_default();
                        if !detail["CursorJump"].is_null() {
                            warn!(filter = %detail["CursorJump"]["filter"], client = alert.client_id, "broker: a subscriber fell behind its log and lost messages");
                        }
                        metrics::counter!(m::BROKER_ALERTS_TOTAL, "kind" => kind).increment(1);
                    }
                }
            });
        }
    }

    /// Feeds every message the gateway's filters receive to the engine. Runs until the link closes.
    pub fn run_inbound(&mut self, engine: Arc<Engine>) -> Result<tokio::task::JoinHandle<()>, String> {
        self.run_meters();
        let mut link_rx = self.link_rx.take().ok_or("inbound already running")?;
        Ok(tokio::spawn(async move {
            loop {
                match link_rx.next().await {
                    Ok(Some(Notification::Forward(forward))) => {
                        let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                        let payload = forward.publish.payload.to_vec();
                        engine.submit(InboundMessage::new(topic, payload)).await;
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        if let Err(e) = link_rx.wake().await {
                            warn!(error = %e, "broker link wake failed");
                        }
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(e) => {
                        error!(error = %e, "broker link closed");
                        metrics::gauge!(m::BROKER_UP).set(0.0);
                        return;
                    }
                }
            }
        }))
    }
}

/// The most publishes handed to the router per notification.
const PUBLISH_BATCH_MAX: usize = 512;

/// Hands the engine's publishes to the router. Whatever is queued is handed over as one batch:
/// all but the last go straight into the link's buffer, and publishing the last one sends the
/// router a single notification, on which it takes the whole buffer. One notification per
/// download made the router wake once per terminal during a fleet push.
fn publish_loop(mut link_tx: LinkTx, rx: std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH_MAX);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < PUBLISH_BATCH_MAX {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some((topic, payload)) = batch.pop() else { continue };
        if !batch.is_empty() {
            let mut buffer = link_tx.buffer();
            for (topic, payload) in batch.drain(..) {
                let publish = Publish::new(topic.into_bytes(), payload, false);
                buffer.push_back(Packet::Publish(publish, None));
            }
        }
        if let Err(e) = link_tx.publish(topic, payload) {
            error!(error = %e, "broker publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Connections a listener that never accepts lets complete, up to `limit`.
    fn completed_connects(addr: SocketAddr, limit: usize) -> Vec<TcpStream> {
        let mut open = Vec::new();
        while open.len() < limit {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => open.push(stream),
                Err(_) => break,
            }
        }
        open
    }

    #[test]
    fn the_backlog_of_a_listener_this_process_holds_is_raised() {
        // The standard library listens with a backlog of 128, as rumqttd's listener does.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(raise_listen_backlog(addr, 600), Ok(1), "exactly the listener on that address");
        let open = completed_connects(addr, 500);
        assert_eq!(open.len(), 500, "500 connections queue behind a backlog of 600 without an accept");
        // The other listener kept its 128: its queue fills at 129.
        let open_other = completed_connects(other.local_addr().expect("address"), 500);
        assert!(open_other.len() < 200, "{} connections queued behind a backlog of 128", open_other.len());
    }

    #[test]
    fn no_listener_on_the_address_raises_nothing() {
        let free = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address");
        assert_eq!(raise_listen_backlog(free, 600), Ok(0));
    }
}
