//! Measures the memory one process needs per connected, idle simulated terminal.
//!
//! ```text
//! cargo run --release -p rki-device-sim --example idle_fleet_memory -- --devices 15000
//! ```
//!
//! The broker (rumqttd, no authentication) runs in a child process started from this same
//! binary (`--broker-only`), so that the terminals' process holds only terminals: one socket
//! each. The terminals get preset secrets (as if initialised at the factory), connect in batches
//! spread over 127.0.0.1 ..= 127.0.0.N (one ephemeral-port range per destination address), and
//! the resident set size (VmRSS) of both processes is read after each batch has connected and
//! settled. Output: one line per step, then a JSON summary on stdout.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rki_device_sim::{BrokerAddr, Device, DeviceConfig, DeviceProfile, Fleet, FleetCounters, StateStore};
use rki_protocol::frame::MacKey;
use rki_protocol::init::DeviceSecrets;
use rki_protocol::terminal::Model;
use rki_protocol::{KeyAlgorithm, SecretBytes, SymmetricKey};

/// Terminals started between two measurements.
const BATCH: usize = 2500;
/// How long a batch may take to connect.
const BATCH_TIMEOUT: Duration = Duration::from_secs(180);
/// Pause after a batch connected, so that connection bursts are over before measuring.
const SETTLE: Duration = Duration::from_secs(3);

struct Options {
    devices: usize,
    /// Pause between two terminals' start: rumqttd accepts on one thread, and a burst beyond its
    /// listen backlog costs SYN retransmissions of a second or more.
    spawn_interval: Duration,
    addresses: u8,
    port: Option<u16>,
    broker_only: bool,
    /// Keep the terminals powered off: the footprint of a terminal without its MQTT client.
    powered_off: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        devices: 15_000,
        spawn_interval: Duration::from_micros(400),
        addresses: 4,
        port: None,
        broker_only: false,
        powered_off: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--devices" => options.devices = value("--devices")?.parse().map_err(|e| format!("--devices: {e}"))?,
            "--addresses" => {
                options.addresses = value("--addresses")?.parse().map_err(|e| format!("--addresses: {e}"))?
            }
            "--spawn-interval-us" => {
                let micros: u64 =
                    value("--spawn-interval-us")?.parse().map_err(|e| format!("--spawn-interval-us: {e}"))?;
                options.spawn_interval = Duration::from_micros(micros);
            }
            "--port" => options.port = Some(value("--port")?.parse().map_err(|e| format!("--port: {e}"))?),
            "--broker-only" => options.broker_only = true,
            "--powered-off" => options.powered_off = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.addresses == 0 {
        return Err("--addresses must be at least 1".to_string());
    }
    Ok(options)
}

fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(reason) => {
            eprintln!("idle_fleet_memory: {reason}");
            std::process::exit(2);
        }
    };
    let _ = rki_device_sim::raise_fd_limit();
    if options.broker_only {
        run_broker(options.port.unwrap_or(1883), options.devices);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if let Err(reason) = runtime.block_on(measure(options)) {
        eprintln!("idle_fleet_memory: {reason}");
        std::process::exit(1);
    }
}

/// The broker process: rumqttd on 0.0.0.0:port, sized for `devices`, no authentication.
fn run_broker(port: u16, devices: usize) {
    let server = rumqttd::ServerSettings {
        name: "bench-v4".to_string(),
        listen: SocketAddr::from(([0, 0, 0, 0], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 8 * 1024,
            max_inflight_count: 16,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: devices + 100,
            max_outgoing_packet_count: 16,
            max_segment_size: 100 * 1024,
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([("bench-v4".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    if let Err(error) = broker.start() {
        eprintln!("broker: {error}");
    }
}

fn vm_rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(|| "/proc/self/status".to_string(), |p| format!("/proc/{p}/status"));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Secrets as if provisioned at the factory: the broker here checks no password.
fn preset_secrets() -> DeviceSecrets {
    let password = SecretBytes::random(32).expect("random").to_hex_upper();
    DeviceSecrets {
        signing_key: MacKey::random().expect("random"),
        kbpk_aes: SymmetricKey::random(KeyAlgorithm::Aes256).expect("random"),
        kbpk_tdes: SymmetricKey::random(KeyAlgorithm::Tdes3).expect("random"),
        mqtt_password: SecretBytes::from_slice(password.as_bytes()),
    }
}

struct BrokerChild(Child);

impl Drop for BrokerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn measure(options: Options) -> Result<(), String> {
    let port = match options.port {
        Some(port) => port,
        None => TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port(),
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["--broker-only", "--port", &port.to_string(), "--devices", &options.devices.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the broker: {e}"))?;
    let broker = BrokerChild(child);
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("the broker did not start".to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let broker_pid = broker.0.id();
    let addresses: Vec<BrokerAddr> =
        (1..=options.addresses).map(|last| BrokerAddr::new(format!("127.0.0.{last}"), port)).collect();

    let mut fleet = Fleet::empty();
    let counters: Arc<FleetCounters> = fleet.counters().clone();
    let rss_start_kib = vm_rss_kib(None);
    let broker_start_kib = vm_rss_kib(Some(broker_pid));
    eprintln!(
        "start: terminals process {rss_start_kib} KiB, broker process {broker_start_kib} KiB; {} terminals over {} addresses",
        options.devices, options.addresses
    );
    println!("devices,connected,sim_rss_kib,sim_kib_per_device,broker_rss_kib,broker_kib_per_device,batch_connect_s");
    let mut steps = Vec::new();
    while fleet.len() < options.devices {
        let batch_start = Instant::now();
        let target = (fleet.len() + BATCH).min(options.devices);
        for index in fleet.len()..target {
            let sn = format!("MEM{index:06}");
            let profile = DeviceProfile::new(&sn, Model::P3).map_err(|e| e.to_string())?;
            let mut config = DeviceConfig::new(profile, addresses[index % addresses.len()].clone(), StateStore::Memory);
            config.preset_secrets = Some(preset_secrets());
            config.counters = Some(counters.clone());
            config.knobs.start_powered = !options.powered_off;
            fleet.push(Device::spawn(config).await.map_err(|e| e.to_string())?);
            if !options.spawn_interval.is_zero() {
                tokio::time::sleep(options.spawn_interval).await;
            }
        }
        let wanted = if options.powered_off { 0 } else { target as u64 };
        let snapshot = fleet
            .wait_connected(wanted, BATCH_TIMEOUT)
            .await
            .map_err(|e| format!("{e} (errors: {})", e.last.errors))?;
        let connect_s = batch_start.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let sim = vm_rss_kib(None);
        let brk = vm_rss_kib(Some(broker_pid));
        let per_device = (sim.saturating_sub(rss_start_kib)) as f64 / target as f64;
        let broker_per_device = (brk.saturating_sub(broker_start_kib)) as f64 / target as f64;
        println!("{target},{},{sim},{per_device:.1},{brk},{broker_per_device:.1},{connect_s:.2}", snapshot.connected);
        steps.push(serde_json::json!({
            "devices": target,
            "connected": snapshot.connected,
            "sim_rss_kib": sim,
            "sim_kib_per_device": (per_device * 10.0).round() / 10.0,
            "broker_rss_kib": brk,
            "broker_kib_per_device": (broker_per_device * 10.0).round() / 10.0,
            "batch_connect_s": (connect_s * 100.0).round() / 100.0,
        }));
    }
    let last = counters.snapshot();
    let mut error_kinds: HashMap<String, usize> = HashMap::new();
    for device in fleet.devices() {
        if let Some(error) = device.status().last_error {
            // Drop the address, keep the kind of error.
            let kind = error.split_once(": ").map_or(error.as_str(), |(_, kind)| kind).to_string();
            *error_kinds.entry(kind).or_default() += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "devices": options.devices,
            "addresses": options.addresses,
            "sim_rss_start_kib": rss_start_kib,
            "broker_rss_start_kib": broker_start_kib,
            "errors": last.errors,
            "error_kinds": error_kinds,
            "steps": steps,
        })
    );
    fleet.shutdown().await;
    drop(broker);
    Ok(())
}
