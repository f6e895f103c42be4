//! `broker-baseline`: what a user would build instead. Mosquitto 2 (Debian's) as the broker,
//! started here on a free port with its own configuration, and this process as the backend: it
//! answers each hello with a download and waits for each ack. No derivation, no store, no MAC
//! check at push time. With `--baseline-broker rumqttd` the broker is `rki-plain-broker` instead:
//! rumqttd with the gateway's embedded-broker settings and nothing else, which shows how much of
//! a push is the embedded broker's own.
//!
//! The terminals are the same simulated terminals as in `fleet-push`, so their side costs the
//! same in both runs and the messages have the same sizes. They start with preset secrets (as if
//! initialised at the factory: Mosquitto knows no GUDID), and each download is a real signed frame
//! with a real TR-31 block, computed before the clock starts, so that a terminal installs it and
//! acks exactly as it does with the gateway.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rki_device_sim::{Device, DeviceConfig, DeviceProfile, Fleet, Knobs, StateStore};
use rki_gateway::keyservice::tdes_initial_ksn;
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::DeviceSecrets;
use rki_protocol::message::{Body, Download, Message};
use rki_protocol::terminal::{KeySlot, KeyType, Model};
use rki_protocol::tr31::{self, DukptInitialKeyId, Header, Version};
use rki_protocol::{dukpt, topic, KcvLen, KeyAlgorithm, SecretBytes, SymmetricKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::mpsc;

use crate::gateway::spread;
use crate::procfs;
use crate::progress::Progress;
use crate::push::curve;
use crate::summary::{round3, Latency, Summary, ThreadCpu};
use crate::Result;

/// How long Mosquitto may take to accept connections.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 publishes the backend keeps in flight.
const BACKEND_INFLIGHT: u16 = 1000;
/// Requests the backend's MQTT client queues.
const BACKEND_REQUESTS: usize = 10_000;
/// Largest packet the backend accepts or sends.
const PACKET_LEN_MAX: usize = 16 * 1024;
/// Key set ID of the baseline's KSNs.
const KEY_SET_ID: [u8; 5] = [0xFF, 0xFF, 0x98, 0x76, 0x54];
/// Secret bytes per terminal: signing key, AES KBPK, TDES KBPK, MQTT password.
const SEED_LEN: usize = 32 + 32 + 24 + 32;

#[derive(Debug, Clone)]
pub struct BaselineOptions {
    pub devices: usize,
    pub addresses: u8,
    pub spawn_interval: Duration,
    pub connect_timeout: Duration,
    pub phase_timeout: Duration,
    pub work_dir: PathBuf,
    pub keep: bool,
    pub quiet: bool,
    pub broker: BaselineBroker,
}

/// The broker a baseline runs on (`--baseline-broker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BaselineBroker {
    /// Debian's Mosquitto 2, tuned for a burst.
    Mosquitto,
    /// rumqttd with the gateway's settings (`rki-plain-broker`).
    Rumqttd,
}

impl BaselineBroker {
    pub fn name(self) -> &'static str {
        match self {
            BaselineBroker::Mosquitto => "mosquitto",
            BaselineBroker::Rumqttd => "rumqttd",
        }
    }
}

/// The baseline's broker as a child process.
struct Broker {
    child: Child,
    port: u16,
    dir: PathBuf,
    keep: bool,
}

impl Broker {
    fn start(kind: BaselineBroker, work_dir: &Path, label: &str, keep: bool) -> Result<Self> {
        let dir = work_dir.join(format!("{}-{label}", kind.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = rki_tests::free_port();
        let log = std::fs::File::create(dir.join(format!("{}.log", kind.name())))?;
        let child = match kind {
            BaselineBroker::Mosquitto => Self::spawn_mosquitto(&dir, port, log)?,
            BaselineBroker::Rumqttd => {
                let exe = rki_tests::binary("rki-plain-broker");
                Command::new(&exe)
                    .arg("--listen")
                    .arg(format!("0.0.0.0:{port}"))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .map_err(|e| format!("{}: {e} (cargo build --release --workspace)", exe.display()))?
            }
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > BROKER_START_TIMEOUT {
                return Err(format!("{} not listening on {port}; see {}", kind.name(), dir.display()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port, dir, keep })
    }

    fn spawn_mosquitto(dir: &Path, port: u16, log: std::fs::File) -> Result<Child> {
        // Tuned for a burst: no per-client queue limit the push could hit, a wide in-flight
        // window for the backend, no persistence (the baseline has no durability, by design).
        let conf = format!(
            "listener {port}\nallow_anonymous true\npersistence false\nmax_inflight_messages {BACKEND_INFLIGHT}\n\
             max_queued_messages 0\nmax_keepalive 65535\nset_tcp_nodelay true\nconnection_messages false\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        );
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        Ok(Command::new("mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("mosquitto: {e} (install it: apt-get install -y mosquitto)"))?)
    }

    fn version(kind: BaselineBroker) -> String {
        match kind {
            BaselineBroker::Mosquitto => Command::new("mosquitto")
                .arg("-h")
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
                .unwrap_or_default(),
            BaselineBroker::Rumqttd => {
                "rumqttd 0.20 with the gateway's embedded-broker settings (rki-plain-broker)".into()
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A terminal's secrets from its seed; the terminal and the backend each build their own copy.
fn secrets_from(seed: &[u8]) -> Result<DeviceSecrets> {
    Ok(DeviceSecrets {
        signing_key: MacKey::new(SecretBytes::from_slice(&seed[..32]))?,
        kbpk_aes: SymmetricKey::new(KeyAlgorithm::Aes256, SecretBytes::from_slice(&seed[32..64]))?,
        kbpk_tdes: SymmetricKey::new(KeyAlgorithm::Tdes3, SecretBytes::from_slice(&seed[64..88]))?,
        mqtt_password: SecretBytes::from_vec(hex::encode_upper(&seed[88..SEED_LEN]).into_bytes()),
    })
}

/// The signed download frame terminal `index` will get: an IPEK from the test BDK, wrapped
/// (TR-31 B) under its TDES KBPK, like the gateway's.
fn download_frame(index: usize, sn: &str, secrets: &DeviceSecrets, bdk: &SymmetricKey) -> Result<Vec<u8>> {
    let ksn = tdes_initial_ksn(&KEY_SET_ID, index as u64)?;
    let ipek = dukpt::tdes::derive_ipek(bdk, &ksn)?;
    let kcv = ipek.kcv(KcvLen::Three);
    let header = Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv))?;
    let mut rng = |buf: &mut [u8]| {
        let _ = getrandom_fill(buf);
    };
    let key_block = tr31::wrap(&secrets.kbpk_tdes, &header, ipek.secret(), &mut rng)?;
    let body = Body {
        party: sn.to_string(),
        counter: now_us(),
        message: Message::Download(Download {
            execution_id: index as u64 + 1,
            slot: KeySlot::PRODUCTION,
            key_type: KeyType::Ipek,
            key_block,
            key_id: ksn.as_bytes().to_vec(),
            kcv: kcv.as_bytes().to_vec(),
        }),
    };
    Ok(frame::seal(&secrets.signing_key, &body)?)
}

fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    let random = SecretBytes::random(buf.len())?;
    buf.copy_from_slice(random.expose_secret());
    Ok(())
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The backend's view of one terminal.
struct Entry {
    download: Arc<Vec<u8>>,
    hello: bool,
    acked_ms: Option<f64>,
    acks: u32,
}

/// The backend's shared state.
struct Backend {
    entries: Mutex<HashMap<String, Entry>>,
    /// Set when the push starts: hellos from then on are answered with the download.
    push_started: Mutex<Option<Instant>>,
    hellos: AtomicU64,
    acked: AtomicU64,
    extra_acks: AtomicU64,
}

impl Backend {
    /// Handles one up message; returns the SN to (re)send a download to.
    fn on_up(&self, topic: &str, payload: &[u8]) -> Option<String> {
        let Some(topic::Inbound::DeviceUp { sn }) = topic::parse_inbound(topic) else { return None };
        // No crypto: the message type is read from the frame without checking its tag.
        let unverified = frame::open(payload).ok()?;
        let started = *self.push_started.lock().ok()?;
        let mut entries = self.entries.lock().ok()?;
        let entry = entries.get_mut(sn)?;
        match unverified.peek().message {
            Message::Hello(_) => {
                if !entry.hello {
                    entry.hello = true;
                    self.hellos.fetch_add(1, Ordering::Relaxed);
                }
                (started.is_some() && entry.acked_ms.is_none()).then(|| sn.to_string())
            }
            Message::Ack(_) => {
                entry.acks += 1;
                if entry.acked_ms.is_none() {
                    entry.acked_ms = started.map(|s| s.elapsed().as_secs_f64() * 1000.0);
                    self.acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.extra_acks.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            _ => None,
        }
    }
}

/// Runs the baseline at one fleet size.
pub fn run(options: &BaselineOptions, runtime: &tokio::runtime::Runtime) -> Result<Summary> {
    let load_start = procfs::load_average()[0];
    let own_cpu_start = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    let n = options.devices;
    let kind = options.broker;
    let mut summary =
        Summary { scenario: "broker-baseline".into(), server: kind.name().into(), devices: n, ..Summary::default() };
    summary.extra.insert("broker_version".into(), json!(Broker::version(kind)));
    let broker = Broker::start(kind, &options.work_dir, &n.to_string(), options.keep)?;
    let pid = broker.child.id();

    // Prepared before any clock: secrets, and the download each terminal will get.
    let prepare_started = Instant::now();
    let bdk = SymmetricKey::tdes_from_hex(rki_tests::TEST_BDK)?;
    let sns = crate::setup::serial_numbers("BL", n);
    let mut seeds = Vec::with_capacity(n);
    let mut entries = HashMap::with_capacity(n);
    for (i, sn) in sns.iter().enumerate() {
        let seed = SecretBytes::random(SEED_LEN)?;
        let secrets = secrets_from(seed.expose_secret())?;
        let download = Arc::new(download_frame(i, sn, &secrets, &bdk)?);
        entries.insert(sn.clone(), Entry { download, hello: false, acked_ms: None, acks: 0 });
        seeds.push(seed);
    }
    summary.extra.insert("prepare_seconds".into(), json!(round3(prepare_started.elapsed().as_secs_f64())));
    let backend = Arc::new(Backend {
        entries: Mutex::new(entries),
        push_started: Mutex::new(None),
        hellos: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        extra_acks: AtomicU64::new(0),
    });
    let (publish_tx, publish_rx) = mpsc::unbounded_channel::<String>();
    runtime.block_on(start_backend(broker.port, backend.clone(), publish_rx))?;

    let progress = Progress::new(n);
    progress.set_phase("connect");
    let printer = progress.spawn_printer(options.quiet);
    let result = drive(options, runtime, &broker, &sns, seeds, &backend, &publish_tx, &progress, &mut summary);
    progress.stop();
    let _ = printer.join();
    result?;
    let after = procfs::sample(pid).unwrap_or_default();
    summary.gateway_rss_peak_bytes = after.rss_peak_bytes;
    summary.gateway_cpu_seconds = round3(after.cpu_seconds);
    summary.load_average_start = load_start;
    summary.load_average_end = procfs::load_average()[0];
    summary.loadtest_cpu_seconds =
        round3(procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0) - own_cpu_start);
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn drive(
    options: &BaselineOptions,
    runtime: &tokio::runtime::Runtime,
    broker: &Broker,
    sns: &[String],
    seeds: Vec<SecretBytes>,
    backend: &Arc<Backend>,
    publish_tx: &mpsc::UnboundedSender<String>,
    progress: &Arc<Progress>,
    summary: &mut Summary,
) -> Result<()> {
    let n = sns.len();
    let pid = broker.child.id();
    let before = procfs::sample(pid).unwrap_or_default();
    let threads_before = procfs::threads(pid);
    let brokers = spread(std::net::Ipv4Addr::LOCALHOST, broker.port, options.addresses)?;
    let _ = rki_device_sim::raise_fd_limit();
    let connect_started = Instant::now();
    let fleet = runtime.block_on(async {
        let mut fleet = Fleet::empty();
        let knobs = Knobs { connect_timeout: options.connect_timeout, ..Knobs::default() };
        for (i, (sn, seed)) in sns.iter().zip(seeds).enumerate() {
            let mut config =
                DeviceConfig::new(DeviceProfile::new(sn, Model::P3)?, brokers.for_index(i).clone(), StateStore::Memory);
            config.knobs = knobs.clone();
            config.preset_secrets = Some(secrets_from(seed.expose_secret())?);
            config.counters = Some(fleet.counters().clone());
            fleet.push(Device::spawn(config).await?);
            if !options.spawn_interval.is_zero() {
                tokio::time::sleep(options.spawn_interval).await;
            }
        }
        Ok::<Fleet, Box<dyn std::error::Error + Send + Sync>>(fleet)
    })?;
    progress.set_fleet(fleet.counters().clone());
    let mut samples: Vec<(f64, u64)> = Vec::new();
    loop {
        let connected = fleet.snapshot().connected;
        samples.push((connect_started.elapsed().as_secs_f64(), connected));
        if connected as usize >= n && backend.hellos.load(Ordering::Relaxed) as usize >= n {
            break;
        }
        if connect_started.elapsed() > options.phase_timeout {
            return Err(format!(
                "only {connected} of {n} terminals connected to {} ({} hellos) after {:?}",
                options.broker.name(),
                backend.hellos.load(Ordering::Relaxed),
                options.phase_timeout
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    summary.connect_seconds = round3(connect_started.elapsed().as_secs_f64());
    summary.connects_per_second = round3(n as f64 / summary.connect_seconds.max(1e-9));
    summary.connects_per_second_peak = crate::push::peak_per_second(&samples);
    std::thread::sleep(Duration::from_secs(2));
    let idle = procfs::sample(pid).unwrap_or_default();
    summary.bytes_per_device = round3(idle.rss_bytes.saturating_sub(before.rss_bytes) as f64 / n as f64);
    let threads_connected = procfs::threads(pid);
    summary.threads_connect = ThreadCpu::list(procfs::thread_delta(&threads_before, &threads_connected));

    // Push: a download to every terminal that said hello, then wait for every ack.
    progress.set_phase("push");
    let own_before = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    let push_started = Instant::now();
    if let Ok(mut started) = backend.push_started.lock() {
        *started = Some(push_started);
    }
    for sn in sns {
        publish_tx.send(sn.clone()).map_err(|_| "backend publisher stopped")?;
    }
    summary.task_create_seconds = round3(push_started.elapsed().as_secs_f64());
    loop {
        let acked = backend.acked.load(Ordering::Relaxed);
        progress.acked.store(acked, Ordering::Relaxed);
        if acked as usize >= n {
            break;
        }
        if push_started.elapsed() > options.phase_timeout {
            return Err(format!("only {acked} of {n} acks after {:?}", options.phase_timeout).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    summary.push_seconds = round3(push_started.elapsed().as_secs_f64());
    summary.keys_per_second = round3(n as f64 / summary.push_seconds.max(1e-9));
    let own_after = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    summary.extra.insert("loadtest_cpu_seconds_push".into(), json!(round3(own_after - own_before)));
    let after = procfs::sample(pid).unwrap_or_default();
    summary.gateway_cpu_seconds_push = round3(after.cpu_seconds - idle.cpu_seconds);
    summary.threads_push = ThreadCpu::list(procfs::thread_delta(&threads_connected, &procfs::threads(pid)));
    let latencies: Vec<f64> =
        backend.entries.lock().map(|e| e.values().filter_map(|x| x.acked_ms).collect()).unwrap_or_default();
    summary.latency_ms = Latency::of(&latencies);
    summary.curve = curve(&latencies);
    summary.acks_verified = latencies.len();
    summary.lost = n - latencies.len();
    let twice_injected: usize =
        fleet.devices().iter().map(|d| (d.status().injections as usize).saturating_sub(1)).sum();
    summary.duplicates = twice_injected;
    summary.extra.insert("repeated_acks".into(), json!(backend.extra_acks.load(Ordering::Relaxed)));
    let snapshot = fleet.snapshot();
    summary.errors = snapshot.errors;
    summary.extra.insert("connects_refused".into(), json!(snapshot.connects_refused));
    summary.extra.insert("connects_timed_out".into(), json!(snapshot.connects_timed_out));
    summary.extra.insert("rejected".into(), json!(snapshot.rejected_frames + snapshot.refusals_received));
    runtime.block_on(fleet.shutdown());
    Ok(())
}

/// The backend: one MQTT client subscribed to every terminal's up topic; a publisher task sends
/// the downloads it is asked for.
async fn start_backend(
    port: u16,
    backend: Arc<Backend>,
    mut publish_rx: mpsc::UnboundedReceiver<String>,
) -> Result<()> {
    let mut options = MqttOptions::new("rki-baseline-backend", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true)
        .set_inflight(BACKEND_INFLIGHT)
        .set_max_packet_size(PACKET_LEN_MAX, PACKET_LEN_MAX);
    let (client, mut event_loop) = AsyncClient::new(options, BACKEND_REQUESTS);
    // A backend someone tunes for throughput sends each download at once (Mosquitto's side is
    // set the same way in its configuration).
    let mut network = event_loop.network_options();
    network.set_tcp_nodelay(true);
    event_loop.set_network_options(network);
    client.subscribe(topic::FILTER_DEVICE_UP, QoS::AtLeastOnce).await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let resend = backend.clone();
    let publisher = client.clone();
    let (again_tx, mut again_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            match event_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(sn) = backend.on_up(&p.topic, &p.payload) {
                        let _ = again_tx.send(sn);
                    }
                }
                Ok(_) => {}
                // The broker is gone (the run ended, or it failed): the backend stops with it.
                Err(e) => {
                    if backend.acked.load(Ordering::Relaxed) < backend.hellos.load(Ordering::Relaxed) {
                        eprintln!("baseline backend: {e}");
                    }
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let sn = tokio::select! {
                Some(sn) = publish_rx.recv() => sn,
                Some(sn) = again_rx.recv() => sn,
                else => return,
            };
            let download = resend.entries.lock().ok().and_then(|e| e.get(&sn).map(|x| x.download.clone()));
            if let Some(download) = download {
                let _ = publisher.publish(topic::device_down(&sn), QoS::AtLeastOnce, false, download.to_vec()).await;
            }
        }
    });
    tokio::time::timeout(BROKER_START_TIMEOUT, ready_rx).await.map_err(|_| "backend subscription timed out")??;
    Ok(())
}
