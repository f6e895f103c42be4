//! MQTT clients for the endpoint tests, below and beside rumqttc's event loop:
//! - [`Raw`]: one connection, packets written and read by rumqttc's own 3.1.1 and 5.0 codecs on a
//!   blocking TCP (or TLS) socket, so that a test sees every byte the endpoint answers, the DUP flag
//!   and packet id of a redelivery, and the moment it closes;
//! - [`Terminal`]: an initialised SN's credentials and signing key, to seal its hellos and open its
//!   downloads on any client;
//! - [`tls_client_config`]: a rustls client trusting one CA, for the TLS listener;
//! - [`paho`], [`mosquitto_client`]: the independent clients (paho-mqtt for Python, Debian's
//!   mosquitto_pub and mosquitto_sub), or an error naming what to install.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rki_protocol::frame;
use rki_protocol::init::DeviceSecrets;
use rki_protocol::message::{Body, Download, Message};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use serde_json::Value;
use tokio_rustls::rustls;

use crate::TestResult;

/// How long a [`Raw`] read waits for a packet by default.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One MQTT connection driven packet by packet.
pub struct Raw {
    stream: Box<dyn Stream>,
    /// The socket under `stream` (a clone of its descriptor): read time-outs and shutdown.
    tcp: TcpStream,
    buf: BytesMut,
}

/// What [`Raw::read_v4`] and [`Raw::read_v5`] found.
#[derive(Debug)]
pub enum Got<P> {
    Packet(P),
    /// The server closed (or reset) the connection.
    Closed,
    /// Nothing within the wait.
    Silent,
}

impl<P: std::fmt::Debug> Got<P> {
    /// The packet, or an error saying what came instead.
    pub fn packet(self, what: &str) -> TestResult<P> {
        match self {
            Got::Packet(p) => Ok(p),
            other => Err(format!("expected {what}, got {other:?}").into()),
        }
    }
}

impl Raw {
    pub fn open(port: u16) -> TestResult<Raw> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        let _ = tcp.set_nodelay(true);
        Ok(Raw { stream: Box::new(tcp.try_clone()?), tcp, buf: BytesMut::new() })
    }

    /// A TLS connection to `port`, checking the server's certificate for `server_name` under
    /// `config`'s roots; the handshake completes before this returns.
    pub fn open_tls(port: u16, config: Arc<rustls::ClientConfig>, server_name: &str) -> TestResult<Raw> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
        let mut conn = rustls::ClientConnection::new(config, name)?;
        let mut sock = tcp.try_clone()?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Raw { stream: Box::new(rustls::StreamOwned::new(conn, sock)), tcp, buf: BytesMut::new() })
    }

    pub fn send(&mut self, bytes: &[u8]) -> TestResult {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Closes the socket at once, without DISCONNECT: a terminal losing its network.
    pub fn drop_connection(self) {
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }

    // ------------------------------------------------------------ MQTT 3.1.1

    pub fn connect_v4(&mut self, client_id: &str, login: Option<(&str, &str)>, clean: bool) -> TestResult {
        self.connect_v4_keep_alive(client_id, login, clean, 30)
    }

    pub fn connect_v4_keep_alive(
        &mut self,
        client_id: &str,
        login: Option<(&str, &str)>,
        clean: bool,
        keep_alive: u16,
    ) -> TestResult {
        let mut c = v4::Connect::new(client_id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        if let Some((u, p)) = login {
            c.set_login(u, p);
        }
        let mut out = BytesMut::new();
        c.write(&mut out)?;
        self.send(&out)
    }

    /// The CONNACK of a 3.1.1 CONNECT.
    pub fn connack_v4(&mut self) -> TestResult<v4::ConnAck> {
        match self.read_v4(READ_TIMEOUT)? {
            Got::Packet(v4::Packet::ConnAck(ack)) => Ok(ack),
            other => Err(format!("expected a CONNACK, got {other:?}").into()),
        }
    }

    pub fn subscribe_v4(&mut self, pkid: u16, filters: &[(&str, QoS)]) -> TestResult {
        let (first, rest) = filters.split_first().ok_or("no filter")?;
        let mut s = v4::Subscribe::new(first.0, first.1);
        s.pkid = pkid;
        for (filter, qos) in rest {
            s.add(filter.to_string(), *qos);
        }
        let mut out = BytesMut::new();
        s.write(&mut out)?;
        self.send(&out)
    }

    /// SUBSCRIBE to one filter at QoS 1 and read its SUBACK's codes.
    pub fn subscribe_v4_granted(&mut self, pkid: u16, filter: &str) -> TestResult<Vec<v4::SubscribeReasonCode>> {
        self.subscribe_v4(pkid, &[(filter, QoS::AtLeastOnce)])?;
        match self.read_v4(READ_TIMEOUT)? {
            Got::Packet(v4::Packet::SubAck(ack)) if ack.pkid == pkid => Ok(ack.return_codes),
            other => Err(format!("expected the SUBACK {pkid}, got {other:?}").into()),
        }
    }

    pub fn publish_v4(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8], retain: bool) -> TestResult {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        p.retain = retain;
        let mut out = BytesMut::new();
        p.write(&mut out)?;
        self.send(&out)
    }

    pub fn puback_v4(&mut self, pkid: u16) -> TestResult {
        let mut out = BytesMut::new();
        v4::PubAck::new(pkid).write(&mut out)?;
        self.send(&out)
    }

    pub fn pingreq_v4(&mut self) -> TestResult {
        let mut out = BytesMut::new();
        v4::PingReq.write(&mut out)?;
        self.send(&out)
    }

    /// The next 3.1.1 packet within `wait`.
    pub fn read_v4(&mut self, wait: Duration) -> TestResult<Got<v4::Packet>> {
        self.read_with(wait, |b| v4::Packet::read(b, 64 * 1024).map_err(|e| format!("{e:?}")))
    }

    /// The next 3.1.1 packet, `None` if the server closed; an error if nothing came within 5 s.
    pub fn next_v4(&mut self) -> TestResult<Option<v4::Packet>> {
        match self.read_v4(READ_TIMEOUT)? {
            Got::Packet(p) => Ok(Some(p)),
            Got::Closed => Ok(None),
            Got::Silent => Err("no packet within 5 s".into()),
        }
    }

    /// Reads 3.1.1 packets until one satisfies `wanted` (returned), skipping the others.
    pub fn read_v4_until(
        &mut self,
        wait: Duration,
        what: &str,
        mut wanted: impl FnMut(&v4::Packet) -> bool,
    ) -> TestResult<v4::Packet> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_v4(left)? {
                Got::Packet(p) if wanted(&p) => return Ok(p),
                Got::Packet(_) => {}
                other => return Err(format!("expected {what}, got {other:?}").into()),
            }
        }
    }

    // ------------------------------------------------------------ MQTT 5.0

    pub fn connect_v5(&mut self, client_id: &str, login: Option<(&str, &str)>) -> TestResult {
        self.connect_v5_session(client_id, login, true, 30, None)
    }

    /// A 5.0 CONNECT with Clean Start `clean_start` and, if given, a Session Expiry Interval.
    pub fn connect_v5_session(
        &mut self,
        client_id: &str,
        login: Option<(&str, &str)>,
        clean_start: bool,
        keep_alive: u16,
        session_expiry: Option<u32>,
    ) -> TestResult {
        let properties = session_expiry
            .map(|s| v5::ConnectProperties { session_expiry_interval: Some(s), ..v5::ConnectProperties::new() });
        let c = v5::Connect { keep_alive, client_id: client_id.into(), clean_start, properties };
        let mut out = BytesMut::new();
        v5::Packet::Connect(c, None, login.map(|(u, p)| v5::Login::new(u, p))).write(&mut out, None)?;
        self.send(&out)
    }

    /// The CONNACK of a 5.0 CONNECT.
    pub fn connack_v5(&mut self) -> TestResult<v5::ConnAck> {
        match self.read_v5(READ_TIMEOUT)? {
            Got::Packet(v5::Packet::ConnAck(ack)) => Ok(ack),
            other => Err(format!("expected a CONNACK, got {other:?}").into()),
        }
    }

    pub fn subscribe_v5_granted(&mut self, pkid: u16, filter: &str) -> TestResult<Vec<v5::SubscribeReasonCode>> {
        let mut s = v5::Subscribe::new(v5::Filter::new(filter, v5_qos(1)), None);
        s.pkid = pkid;
        let mut out = BytesMut::new();
        s.write(&mut out)?;
        self.send(&out)?;
        match self.read_v5(READ_TIMEOUT)? {
            Got::Packet(v5::Packet::SubAck(ack)) if ack.pkid == pkid => Ok(ack.return_codes),
            other => Err(format!("expected the SUBACK {pkid}, got {other:?}").into()),
        }
    }

    pub fn publish_v5(&mut self, topic: &str, qos: u8, pkid: u16, payload: &[u8], retain: bool) -> TestResult {
        let mut p = v5::Publish::new(topic, v5_qos(qos), payload.to_vec(), None);
        p.pkid = pkid;
        p.retain = retain;
        let mut out = BytesMut::new();
        p.write(&mut out)?;
        self.send(&out)
    }

    pub fn puback_v5(&mut self, pkid: u16) -> TestResult {
        let mut out = BytesMut::new();
        v5::PubAck::new(pkid, None).write(&mut out)?;
        self.send(&out)
    }

    /// The next 5.0 packet within `wait`.
    pub fn read_v5(&mut self, wait: Duration) -> TestResult<Got<v5::Packet>> {
        self.read_with(wait, |b| v5::Packet::read(b, Some(64 * 1024)).map_err(|e| format!("{e:?}")))
    }

    /// The next 5.0 packet, `None` if the server closed; an error if nothing came within 5 s.
    pub fn next_v5(&mut self) -> TestResult<Option<v5::Packet>> {
        match self.read_v5(READ_TIMEOUT)? {
            Got::Packet(p) => Ok(Some(p)),
            Got::Closed => Ok(None),
            Got::Silent => Err("no packet within 5 s".into()),
        }
    }

    /// Reads 5.0 packets until one satisfies `wanted` (returned), skipping the others.
    pub fn read_v5_until(
        &mut self,
        wait: Duration,
        what: &str,
        mut wanted: impl FnMut(&v5::Packet) -> bool,
    ) -> TestResult<v5::Packet> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_v5(left)? {
                Got::Packet(p) if wanted(&p) => return Ok(p),
                Got::Packet(_) => {}
                other => return Err(format!("expected {what}, got {other:?}").into()),
            }
        }
    }

    // ------------------------------------------------------------ both

    /// Reads until one whole packet decodes, the peer closes, or `wait` passes.
    fn read_with<T>(
        &mut self,
        wait: Duration,
        read: impl Fn(&mut BytesMut) -> Result<T, String>,
    ) -> TestResult<Got<T>> {
        let deadline = Instant::now() + wait;
        loop {
            match read(&mut self.buf) {
                Ok(packet) => return Ok(Got::Packet(packet)),
                Err(e) if e.starts_with("InsufficientBytes") => {}
                Err(e) => return Err(e.into()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Got::Silent);
            }
            self.tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Got::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(Got::Silent)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(Got::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the server closed the connection within `wait`, ignoring what it sent first.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.tcp.set_read_timeout(Some(left)).is_err() {
                return false;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// [`Raw::closed_within`] 5 s.
    pub fn closed(&mut self) -> bool {
        self.closed_within(READ_TIMEOUT)
    }
}

pub fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

// ---------------------------------------------------------------- the terminal's side

/// An initialised SN: its MQTT password and signing key, so that any client can speak for it.
pub struct Terminal {
    pub sn: String,
    pub password: String,
    pub secrets: DeviceSecrets,
    counter: u64,
}

impl Terminal {
    /// Initialises `sn` with `gudid` over its bootstrap identity (the `CreateKey` exchange), and
    /// leaves the device identity unconnected.
    pub fn initialise(port: u16, sn: &str, gudid: &str) -> TestResult<Terminal> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let secrets = runtime.block_on(crate::RawDevice::initialise_secrets(port, sn, gudid))?;
        let password = String::from_utf8(secrets.mqtt_password.expose_secret().to_vec())?;
        Ok(Terminal { sn: sn.to_string(), password, secrets, counter: crate::now_us() })
    }

    /// `(user name, password)`, for a CONNECT as the device identity.
    pub fn login(&self) -> (&str, &str) {
        (&self.sn, &self.password)
    }

    pub fn up(&self) -> String {
        rki_protocol::topic::device_up(&self.sn)
    }

    pub fn down(&self) -> String {
        rki_protocol::topic::device_down(&self.sn)
    }

    /// `message` sealed under the device's signing key with a fresh counter.
    pub fn seal(&mut self, message: Message) -> TestResult<Vec<u8>> {
        self.counter = self.counter.max(crate::now_us()) + 1;
        let body = Body { party: self.sn.clone(), counter: self.counter, message };
        Ok(frame::seal(&self.secrets.signing_key, &body)?)
    }

    /// A signed, unlocked hello (a P3 at its minimum firmware).
    pub fn hello(&mut self) -> TestResult<Vec<u8>> {
        self.seal(crate::RawDevice::hello(false))
    }

    /// The verified message of a downlink's payload.
    pub fn open(&self, payload: &[u8]) -> TestResult<Message> {
        let verified = frame::open(payload)?.verify(&self.secrets.signing_key).map_err(|e| format!("downlink: {e}"))?;
        Ok(verified.body.message)
    }

    /// The verified `Download` of a downlink's payload.
    pub fn download(&self, payload: &[u8]) -> TestResult<Download> {
        match self.open(payload)? {
            Message::Download(d) => Ok(d),
            other => Err(format!("expected a Download, got {other:?}").into()),
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes; the error names `what`
/// ([`crate::wait::until`]).
pub fn wait_for(timeout: Duration, what: &str, condition: impl FnMut() -> bool) -> TestResult<Duration> {
    crate::wait::until(what, timeout, condition)
}

/// Whether the admin API shows `sn` online.
pub fn device_online(gw: &crate::GatewayProcess, sn: &str) -> TestResult<bool> {
    let v = gw.api().ok(&format!("/v1/devices/{sn}"))?;
    v["device"]["online"].as_bool().ok_or_else(|| format!("no online flag in {v}").into())
}

// ---------------------------------------------------------------- TLS

/// A rustls client configuration trusting only the CA certificate in `ca_pem`.
pub fn tls_client_config(ca_pem: &str) -> TestResult<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    // The one crypto provider built in (ring), as the gateway's server side.
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------- independent clients

/// Runs `tests/python/paho_endpoint.py` (paho-mqtt 2.x) on `steps` and returns its results, one
/// per step. Fails (does not skip) without python3 and paho-mqtt: `scripts/test` installs them.
pub fn paho(steps: &Value) -> TestResult<Vec<Value>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/paho_endpoint.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3 is needed for the paho-mqtt tests (scripts/test installs it): {e}"))?;
    child.stdin.take().ok_or("stdin")?.write_all(steps.to_string().as_bytes())?;
    let out = wait_output(child, Duration::from_secs(120))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("No module named 'paho'") {
            " (paho-mqtt is missing: pip install paho-mqtt, as scripts/test does)"
        } else {
            ""
        };
        return Err(format!("paho_endpoint.py failed{hint}: {}\n{stderr}", out.status).into());
    }
    let results: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("paho_endpoint.py printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))?;
    results.as_array().cloned().ok_or_else(|| format!("not a list: {results}").into())
}

/// The path of `mosquitto_pub` or `mosquitto_sub`, or an error naming the package.
pub fn mosquitto_client(name: &str) -> TestResult<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    Err(format!("{name} not found: install Debian's mosquitto-clients (scripts/test does)").into())
}

/// Runs `command` to its end, killing it after `timeout`.
pub fn run_bounded(mut command: Command, timeout: Duration) -> TestResult<std::process::Output> {
    let child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    wait_output(child, timeout)
}

/// Waits for a child's output, killing it after `timeout` (its output so far is kept).
pub fn wait_output(mut child: std::process::Child, timeout: Duration) -> TestResult<std::process::Output> {
    let exited = crate::wait::poll("a child process to exit", timeout, || match child.try_wait() {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("running".to_string()),
        Err(e) => Err(e.to_string()),
    });
    if exited.is_err() {
        let _ = child.kill();
    }
    Ok(child.wait_with_output()?)
}
