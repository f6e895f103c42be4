//! The gateway under test: a child process started here (its own data directory, free ports, MQTT
//! on every loopback address), or one already running that the tool attaches to.
//!
//! The child is the `rki-tests` harness's `GatewayProcess` (same bootstrap commands, same health
//! check), with the listener on 0.0.0.0 so that terminals can spread over 127.0.0.1–127.0.0.N.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use rki_device_sim::{BrokerAddr, Brokers};
use rki_tests::{Api, GatewayOptions, GatewayProcess};

use crate::Result;

/// How long a (re)started gateway may take to answer `/healthz`.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the gateway is and how to reach it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Admin API base URL.
    pub url: String,
    /// An organization admin token.
    pub org_token: String,
    /// The key owner's token, to authorize the test BDK if the organization has none.
    pub key_owner_token: Option<String>,
    /// The MQTT port; terminals connect to 127.0.0.1 ..= 127.0.0.`addresses` on it.
    pub mqtt_host: Ipv4Addr,
    pub mqtt_port: u16,
    /// The server's process, for /proc readings (none when attached without `--pid`).
    pub pid: Option<u32>,
}

impl Endpoint {
    pub fn api(&self) -> Api {
        Api::new(&self.url, &self.org_token)
    }

    /// `addresses` consecutive IPv4 addresses from the MQTT host on, for the terminals.
    pub fn brokers(&self, addresses: u8) -> Result<Brokers> {
        spread(self.mqtt_host, self.mqtt_port, addresses)
    }
}

/// Terminals spread over `count` consecutive addresses from `first`, so that each destination
/// address has its own range of ephemeral ports.
pub fn spread(first: Ipv4Addr, port: u16, count: u8) -> Result<Brokers> {
    let base = u32::from(first);
    let addresses =
        (0..u32::from(count.max(1))).map(|i| BrokerAddr::new(Ipv4Addr::from(base + i).to_string(), port)).collect();
    Ok(Brokers::new(addresses)?)
}

/// A gateway child process with its own data directory: the end-to-end harness's
/// `GatewayProcess`, with MQTT on 0.0.0.0, the directory under the tool's work directory, the
/// gateway's own log filter, and a longer start timeout (a large store takes a while to load).
pub struct GatewayChild {
    process: GatewayProcess,
}

impl GatewayChild {
    /// Bootstraps a key owner and the organization `acme` in a fresh directory under `work_dir`,
    /// then starts the gateway with MQTT on 0.0.0.0.
    pub fn start(work_dir: &Path, label: &str, keep: bool) -> Result<Self> {
        let options = GatewayOptions {
            mqtt_bind: Ipv4Addr::UNSPECIFIED,
            dir: Some(work_dir.join(format!("gateway-{label}"))),
            keep_dir: keep,
            log_filter: None,
            healthy_timeout: HEALTHY_TIMEOUT,
            ..GatewayOptions::default()
        };
        Ok(GatewayChild { process: GatewayProcess::start(options)? })
    }

    /// Starts the process again on the same directory and ports (after [`GatewayChild::kill`])
    /// and waits until it is healthy. Returns how long that took.
    pub fn spawn(&mut self) -> Result<Duration> {
        self.process.start_again()
    }

    pub fn url(&self) -> String {
        self.process.url()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            url: self.url(),
            org_token: self.process.org_token.clone(),
            key_owner_token: Some(self.process.key_owner_token.clone()),
            mqtt_host: Ipv4Addr::LOCALHOST,
            mqtt_port: self.process.mqtt_port,
            pid: self.pid(),
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill()
    }
}
