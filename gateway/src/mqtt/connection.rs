//! One connection, in its own task: the TLS handshake (if any) and the CONNECT under one deadline,
//! the CONNACK that says yes or why not, then packets until DISCONNECT, a dropped socket, a
//! keep-alive time-out, a takeover or a breach of the rules.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::codec::{self, Close, Connect, Grant, Inbound, ReadError, Version, Writer};
use super::rules::{self, ConnectRefusal, Identity};
use super::session::Client;
use super::{BootstrapSlot, Shared};
use crate::engine::InboundMessage;
use crate::metrics as m;

/// Bytes asked of the socket per read: a frame and its header usually arrive in one.
const READ_CHUNK: usize = 2048;
/// Downlinks written and not yet acknowledged per connection at most (the clients' receive
/// maximum is larger); the rest wait in the session.
const INFLIGHT_MAX: usize = 16;

/// The byte stream under the MQTT packets.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    /// Reads what is there into `buf`, which grows only by the bytes read, so that an idle
    /// connection holds no read buffer. `Ok(0)`: the peer closed.
    async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            // Into a chunk on the stack first (it lives between two awaits, not in the task):
            // readiness can be stale, and a buffer reserved before a read that would block stayed
            // allocated, 2 KiB per idle connection, until the next packet.
            Transport::Plain(stream) => loop {
                stream.readable().await?;
                let mut chunk = [0u8; READ_CHUNK];
                match stream.try_read(&mut chunk) {
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            // rustls may hold decrypted bytes the socket no longer shows as readable.
            Transport::Tls(stream) => {
                buf.reserve(READ_CHUNK);
                stream.read_buf(buf).await
            }
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.write_all(bytes).await,
            Transport::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Plain(stream) => stream.shutdown().await,
            Transport::Tls(stream) => stream.shutdown().await,
        };
    }
}

/// The TLS configuration from PEM files: the certificate chain and its private key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls_cert {}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    // The one crypto provider built in (ring): its safe defaults, TLS 1.2 and 1.3.
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls certificate and key: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn closed(reason: &'static str) {
    metrics::counter!(m::MQTT_CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
}

fn refused_by_rule(reason: &'static str) {
    metrics::counter!(m::MQTT_REFUSALS_TOTAL, "reason" => reason).increment(1);
}

/// One connection, from the accept to its end.
/// `pending`: the socket's place among those awaiting their CONNACK, given back once it has one
/// (or closes).
///
/// The task's future is as large as its largest state, kept for the connection's life, so only
/// the idle state is unboxed: everything up to the CONNACK (a TLS handshake's state above all,
/// the CONNECT and the transport waiting on the CONNECT's checks), the handling of a packet and
/// the close are boxed and freed when done. The arguments are boxed too: an async fn keeps its
/// arguments in its future for its whole life, beside what it moves them into.
pub fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    conn: u64,
    pending: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let opening = Box::new(Opening { stream, peer, tls, conn, pending });
    async move {
        let Some((mut session, _open_place, _bootstrap_slot)) = Box::pin(accept(&shared, opening)).await else {
            return;
        };
        let reason = session.serve_packets().await;
        closed(Box::pin(session.close(reason)).await);
    }
}

/// A connection's socket before its CONNECT, with what came with it from the accept loop.
struct Opening {
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    conn: u64,
    /// See [`run`].
    pending: OwnedSemaphorePermit,
}

/// The TLS handshake (if any) and the CONNECT under one deadline, its checks, and the CONNACK:
/// the accepted session, with its place among the open connections (and, for a bootstrap
/// identity, among the initialisations), both held until the connection ends; `None` once
/// refused or closed (counted).
async fn accept<'a>(
    shared: &'a Shared,
    opening: Box<Opening>,
) -> Option<(Session<'a>, OpenPlace<'a>, Option<BootstrapSlot<'a>>)> {
    let Opening { stream, peer, tls, conn, pending } = *opening;
    let deadline = tokio::time::Instant::now() + shared.settings.connect_timeout;
    let opened = async {
        let mut transport = match tls {
            None => Transport::Plain(stream),
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(stream) => Transport::Tls(Box::new(stream)),
                Err(_) => return Err("tls_handshake"),
            },
        };
        let mut buf = BytesMut::new();
        loop {
            match codec::read_connect(&mut buf) {
                Ok(connect) => return Ok((transport, buf, connect)),
                Err(ReadError::Incomplete) => match transport.read_some(&mut buf).await {
                    Ok(0) | Err(_) => return Err("closed_before_connect"),
                    Ok(_) => {}
                },
                Err(ReadError::TooLarge) => return Err("packet_too_large"),
                Err(ReadError::UnsupportedVersion) => {
                    // MQTT 3.1.1's "unacceptable protocol version", which every version reads.
                    let mut out = BytesMut::new();
                    Writer { version: Version::V4, out: &mut out }.connack_refused(1, 0x84);
                    let _ = transport.write_all(&out).await;
                    return Err("unsupported_version");
                }
                Err(ReadError::Malformed) => return Err("malformed"),
            }
        }
    };
    let (mut transport, buf, connect) = match tokio::time::timeout_at(deadline, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(reason)) => {
            closed(reason);
            return None;
        }
        Err(_) => {
            closed("connect_timeout");
            return None;
        }
    };
    let version = connect.version;
    // Counted among the open connections from its CONNECT on: the socket gives back its place
    // among those awaiting a CONNECT at once, so that a bootstrap CONNECT waiting in line for an
    // initialisation never stops the accept loop (which would leave every other terminal's
    // CONNECT, cheap to answer, in the listen backlog).
    let admitted = match reserve(shared, &connect) {
        Ok((identity, place)) => {
            drop(pending);
            admit(shared, &connect, identity).await.map(|(identity, slot)| (identity, slot, place))
        }
        Err(refusal) => Err(refusal),
    };
    let (identity, bootstrap_slot, open_place) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            metrics::counter!(m::MQTT_CONNECT_REFUSED_TOTAL, "reason" => refusal.reason()).increment(1);
            if shared.may_log() {
                info!(%peer, client = %rules::log_prefix(&connect.client_id), reason = refusal.reason(), "MQTT CONNECT refused (at most one line a second)");
            }
            let mut out = BytesMut::new();
            Writer { version, out: &mut out }.connack_refused(refusal.v4_code(), refusal.v5_code());
            let _ = tokio::time::timeout_at(deadline, transport.write_all(&out)).await;
            transport.shutdown().await;
            return None;
        }
    };
    metrics::gauge!(m::MQTT_CONNECTIONS).set(shared.open.load(Ordering::Relaxed) as f64);
    let session = Session::new(shared, transport, buf, connect, identity, conn).await;
    Some((session, open_place, bootstrap_slot))
}

/// A place among the open connections ([`Shared::open`]), given back when dropped: at a refusal
/// after [`reserve`], or when the connection ends.
struct OpenPlace<'a>(&'a Shared);

impl Drop for OpenPlace<'_> {
    fn drop(&mut self) {
        let open = self.0.open.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(m::MQTT_CONNECTIONS).set(open as f64);
    }
}

/// The checks of a CONNECT that need nothing but the packet, then a place among the open
/// connections: the identity it claims and that place, or why not.
fn reserve<'a>(shared: &'a Shared, connect: &Connect) -> Result<(Identity, OpenPlace<'a>), ConnectRefusal> {
    let identity =
        rules::claimed_identity(&connect.client_id, connect.username.as_deref(), connect.password.is_some())?;
    if let Some(will) = &connect.will {
        if !identity.may_will(&will.topic) || will.qos > 1 || (will.retain && connect.version == Version::V5) {
            return Err(ConnectRefusal::ForeignWill);
        }
    }
    let before = shared.open.fetch_add(1, Ordering::Relaxed);
    let place = OpenPlace(shared);
    if !rules::admits(before, shared.authenticated_max) {
        return Err(ConnectRefusal::OverConnectionBound);
    }
    Ok((identity, place))
}

/// The CONNECT's verdict: the identity it proved (with, for a bootstrap identity, its place among
/// the initialisations under way, held until the connection ends), or why not.
async fn admit<'a>(
    shared: &'a Shared,
    connect: &Connect,
    identity: Identity,
) -> Result<(Identity, Option<BootstrapSlot<'a>>), ConnectRefusal> {
    // Before any store read or hash: waiting in line, or a refusal, costs the gateway nothing.
    let slot = match identity {
        Identity::Bootstrap(_) => {
            Some(shared.bootstrap_slot().await.ok_or(ConnectRefusal::Unavailable("bootstrap_busy"))?)
        }
        Identity::Device(_) | Identity::Backend(_) => None,
    };
    let engine = shared.engine.get().cloned().ok_or(ConnectRefusal::Unavailable("starting"))?;
    let (username, password) =
        (connect.username.as_deref().unwrap_or_default(), connect.password.as_deref().unwrap_or_default());
    // A device's CONNECT is decided from memory, here; only a check that reads the store (a
    // bootstrap identity's live GUDIDs, an SN not cached) takes a blocking thread, which must not
    // be an async one. A reconnect storm of known devices thus costs no thread at all.
    let checked = match engine.authenticate_in_memory(&connect.client_id, username, password) {
        Some(verdict) => verdict,
        None => {
            let (client_id, username, password) = (connect.client_id.clone(), username.to_owned(), password.to_owned());
            let checked =
                tokio::task::spawn_blocking(move || engine.authenticate(&client_id, &username, &password)).await;
            checked.unwrap_or(Err("internal"))
        }
    };
    match checked {
        Ok(()) => Ok((identity, slot)),
        Err(reason) => Err(ConnectRefusal::from_authentication(reason)),
    }
}

/// What woke the connection.
enum Event {
    Read(io::Result<usize>),
    Wake,
    KeepAlive,
}

/// An accepted connection.
struct Session<'a> {
    shared: &'a Shared,
    transport: Transport,
    /// Bytes read and not yet a whole packet; empty (and unallocated) when idle.
    buf: BytesMut,
    /// Packets to write; empty (and unallocated) when idle.
    out: BytesMut,
    version: Version,
    identity: Identity,
    client: Arc<Client>,
    conn: u64,
    wake: Arc<Notify>,
    keep_alive: Option<std::time::Duration>,
    last_read: tokio::time::Instant,
}

impl<'a> Session<'a> {
    async fn new(
        shared: &'a Shared,
        transport: Transport,
        buf: BytesMut,
        connect: Connect,
        identity: Identity,
        conn: u64,
    ) -> Session<'a> {
        let version = connect.version;
        let lifetime = rules::session_lifetime(
            version == Version::V5,
            connect.clean,
            connect.session_expiry,
            shared.settings.session_lifetime_max,
        );
        let wake = Arc::new(Notify::new());
        // Attached under the map's lock, so that the entry cannot be forgotten (by the sweep, or
        // by a clean session's end) between its lookup and the attach.
        let (client, attached) = {
            let entry = shared.clients.entry(identity.client_id()).or_default();
            let attached = entry.attach(conn, wake.clone(), rules::resumes(connect.clean), lifetime, Instant::now());
            (entry.clone(), attached)
        };
        if let Some(replaced) = attached.replaced {
            // The old connection wakes, sees it is no longer current, and closes.
            replaced.notify_one();
        }
        let mut session = Session {
            shared,
            transport,
            buf,
            out: BytesMut::new(),
            version,
            identity,
            client,
            conn,
            wake,
            keep_alive: rules::keep_alive_timeout(connect.keep_alive),
            last_read: tokio::time::Instant::now(),
        };
        let expiry = lifetime.map(|l| l.as_secs().min(u64::from(u32::MAX)) as u32);
        let granted_expiry = if version == Version::V5 && connect.session_expiry != expiry { expiry } else { None };
        let packet_len_max = session.identity.packet_len_max();
        session.writer().connack_accepted(attached.session_present, granted_expiry, packet_len_max);
        if attached.session_present {
            // Unacknowledged downlinks go out again first, with DUP set, under their packet ids.
            let again: Vec<(u16, super::session::Down)> = session.client.lock().inflight.iter().cloned().collect();
            for (pkid, down) in &again {
                session.writer().publish(&down.topic, &down.payload, *pkid, true);
            }
        }
        session
    }

    fn writer(&mut self) -> Writer<'_> {
        Writer { version: self.version, out: &mut self.out }
    }

    /// Ends the connection after [`Session::serve_packets`]; returns why, for
    /// `rki_mqtt_connections_closed_total`: `Ok(reason)`, the client left or the socket dropped; `Err(close)`,
    /// the server closes it, saying why where the version can.
    async fn close(mut self, reason: Result<&'static str, Close>) -> &'static str {
        let close = match reason {
            Ok(reason) => return self.end(reason).await,
            Err(close) => close,
        };
        // What was answered before the close goes out first: above all the CONNACK of a
        // connection taken over before its first write (a burst of CONNECTs for one client id),
        // which would otherwise see its socket close without one.
        self.writer().disconnect(close);
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.transport.write_all(&out)).await;
        }
        self.end(close.reason()).await
    }

    /// Detaches from the session; the device is offline at once unless a newer connection took
    /// its place.
    async fn end(mut self, reason: &'static str) -> &'static str {
        self.transport.shutdown().await;
        let now = Instant::now();
        let current = self.client.detach(self.conn, now);
        if current {
            // A session that ends with its connection (a clean one: a bootstrap identity's
            // above all) is forgotten at once rather than at the next sweep: 19,000 terminals
            // initialising leave as many entries otherwise, for up to the sweep's interval.
            let client_id = self.identity.client_id();
            self.shared.clients.remove_if(&client_id, |_, client| {
                Arc::ptr_eq(client, &self.client) && client.lock().is_forgettable(now)
            });
            if let (Identity::Device(sn), Some(engine)) = (&self.identity, self.shared.engine.get()) {
                engine.device_disconnected(sn);
            }
        }
        debug!(client = %self.identity.client_id(), reason, "MQTT connection ended");
        reason
    }

    /// `Ok(reason)`: the client left or the socket dropped; `Err(close)`: the server closes.
    async fn serve_packets(&mut self) -> Result<&'static str, Close> {
        loop {
            self.take_downlinks()?;
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                if self.transport.write_all(&out).await.is_err() {
                    return Ok("dropped");
                }
            }
            let keep_alive_at = self.keep_alive.map(|k| self.last_read + k);
            let event = tokio::select! {
                read = self.transport.read_some(&mut self.buf) => Event::Read(read),
                _ = self.wake.notified() => Event::Wake,
                _ = sleep_until(keep_alive_at) => Event::KeepAlive,
            };
            match event {
                Event::Read(Ok(0)) | Event::Read(Err(_)) => return Ok("dropped"),
                Event::Read(Ok(_)) => {
                    self.last_read = tokio::time::Instant::now();
                    if let Some(reason) = self.handle_packets().await? {
                        return Ok(reason);
                    }
                }
                Event::Wake => {}
                Event::KeepAlive => return Err(Close::KeepAlive),
            }
        }
    }

    /// Moves queued downlinks into the output, at QoS 1, up to [`INFLIGHT_MAX`] unacknowledged.
    /// A connection that was taken over stops here.
    fn take_downlinks(&mut self) -> Result<(), Close> {
        let mut state = self.client.lock();
        if state.is_revoked() {
            return Err(Close::Revoked);
        }
        if !state.is_current(self.conn) {
            return Err(Close::TakenOver);
        }
        let mut written = 0u64;
        while state.inflight.len() < INFLIGHT_MAX {
            let Some(down) = state.pending.pop_front() else { break };
            let pkid = state.next_pkid();
            if (Writer { version: self.version, out: &mut self.out }).publish(&down.topic, &down.payload, pkid, false) {
                written += 1;
            }
            state.inflight.push_back((pkid, down));
        }
        drop(state);
        if written > 0 {
            metrics::counter!(m::MQTT_DOWNLINKS_TOTAL).increment(written);
        }
        Ok(())
    }

    /// Handles every whole packet in the read buffer. `Ok(Some(reason))`: the client said
    /// DISCONNECT.
    async fn handle_packets(&mut self) -> Result<Option<&'static str>, Close> {
        loop {
            match codec::read(self.version, &mut self.buf, self.identity.packet_len_max()) {
                Ok(packet) => {
                    // Boxed: handling a packet (the engine's queue above all) is brief, and its
                    // state need not size every idle connection's task.
                    if let Some(reason) = Box::pin(self.handle(packet)).await? {
                        return Ok(Some(reason));
                    }
                }
                Err(ReadError::Incomplete) => break,
                Err(ReadError::TooLarge) => return Err(Close::TooLarge),
                Err(ReadError::Malformed) | Err(ReadError::UnsupportedVersion) => return Err(Close::Malformed),
            }
        }
        // A burst read is over: give its buffer back, so an idle connection holds none.
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        Ok(None)
    }

    async fn handle(&mut self, packet: Inbound) -> Result<Option<&'static str>, Close> {
        match packet {
            Inbound::Publish { topic, payload, qos, pkid, retain } => {
                if qos > 1 {
                    refused_by_rule("qos2");
                    return Err(Close::QoS2);
                }
                if retain {
                    // Nothing is ever retained. MQTT 5.0 announced it (Retain Available = 0),
                    // so a retained publish is a protocol error there; 3.1.1 has no way to say
                    // it, and the message is handled as if not retained.
                    refused_by_rule("retain");
                    if self.version == Version::V5 {
                        return Err(Close::Retain);
                    }
                }
                if !self.identity.may_publish(&topic) {
                    refused_by_rule("foreign_publish");
                    match self.version {
                        Version::V4 => return Err(Close::NotAuthorized),
                        Version::V5 if qos == 1 => {
                            self.writer().puback(pkid, false);
                        }
                        Version::V5 => {}
                    }
                    return Ok(None);
                }
                if let Some(engine) = self.shared.engine.get() {
                    // Waits while the device's shard is full: the client is slowed down, not
                    // dropped.
                    engine.submit(InboundMessage::new(topic, payload.to_vec())).await;
                }
                if qos == 1 {
                    self.writer().puback(pkid, true);
                }
            }
            Inbound::PubAck { pkid } => {
                self.client.lock().acknowledge(pkid);
            }
            Inbound::Subscribe { pkid, filters } => {
                let mut grants = Vec::with_capacity(filters.len());
                for (filter, qos) in &filters {
                    if let Some(topic) = self.identity.subscription(filter) {
                        self.client.lock().subscribed.add(topic);
                        grants.push(Grant::QoS((*qos).min(1)));
                    } else {
                        let wildcard = filter.contains(['#', '+']);
                        refused_by_rule(if wildcard { "wildcard_subscribe" } else { "foreign_subscribe" });
                        grants.push(Grant::NotAuthorized);
                    }
                }
                self.writer().suback(pkid, &grants);
            }
            Inbound::Unsubscribe { pkid, filters } => {
                // Each of its own topics unsubscribed on its own; the others stay.
                for topic in filters.iter().filter_map(|f| self.identity.subscription(f)) {
                    self.client.lock().subscribed.remove(topic);
                }
                self.writer().unsuback(pkid, filters.len());
            }
            Inbound::PingReq => {
                self.writer().pingresp();
            }
            Inbound::Disconnect => return Ok(Some("disconnect")),
            Inbound::Unexpected => return Err(Close::Protocol),
        }
        Ok(None)
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
