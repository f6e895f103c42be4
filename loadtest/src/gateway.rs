//! The gateway under test: a child process started here (its own data directory, free ports, MQTT
//! on every loopback address), or one already running that the tool attaches to.
//!
//! The `rki-tests` harness's `GatewayProcess` binds MQTT to 127.0.0.1 only; spreading terminals
//! over 127.0.0.1–127.0.0.N needs the listener on 0.0.0.0, so the load tester starts the binary
//! itself, the same way (same bootstrap commands, same health check).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rki_device_sim::{BrokerAddr, Brokers};
use rki_tests::{binary, free_port, Api};

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

/// A gateway child process with its own data directory.
pub struct GatewayChild {
    child: Option<Child>,
    pub dir: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub key_owner_token: String,
    pub org_token: String,
    /// Number of starts, to name each start's log file.
    starts: u32,
    /// Keep the directory (logs, store) when dropped.
    keep: bool,
}

fn token_from(output: &str) -> Result<String> {
    output
        .lines()
        .find_map(|l| l.split("): ").nth(1).map(|t| t.trim().to_string()))
        .ok_or_else(|| format!("no token in {output:?}").into())
}

impl GatewayChild {
    /// Bootstraps a key owner and the organization `acme` in a fresh directory under `work_dir`,
    /// then starts the gateway with MQTT on 0.0.0.0.
    pub fn start(work_dir: &Path, label: &str, keep: bool) -> Result<Self> {
        let exe = binary("rki-gateway");
        if !exe.exists() {
            return Err(format!("{} is not built: run `cargo build --release --workspace` first", exe.display()).into());
        }
        let dir = work_dir.join(format!("gateway-{label}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let run = |args: &[&str]| -> Result<String> {
            let out = Command::new(&exe).args(args).arg("--data-dir").arg(&data).output()?;
            if !out.status.success() {
                return Err(format!("rki-gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let key_owner_token = token_from(&run(&["init-key-owner"])?)?;
        let org_token = token_from(&run(&["init-org", "acme"])?)?;
        let mut gateway = GatewayChild {
            child: None,
            dir,
            mqtt_port: free_port(),
            http_port: free_port(),
            key_owner_token,
            org_token,
            starts: 0,
            keep,
        };
        gateway.spawn()?;
        Ok(gateway)
    }

    /// Starts the process on the same directory and ports and waits until it is healthy.
    /// Returns how long that took.
    pub fn spawn(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let child = Command::new(binary("rki-gateway"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--mqtt-addr")
            .arg(format!("0.0.0.0:{}", self.mqtt_port))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.wait_healthy()?;
        Ok(started.elapsed())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("gateway-{}.log", self.starts))
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let started = Instant::now();
        let api = Api::new(&self.url(), "");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(format!("gateway exited with {status}; log {}", self.log_path().display()).into());
                }
            }
            if api.get("/healthz").0 == 200 {
                return Ok(());
            }
            if started.elapsed() > HEALTHY_TIMEOUT {
                return Err(format!("gateway not healthy after {HEALTHY_TIMEOUT:?}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            url: self.url(),
            org_token: self.org_token.clone(),
            key_owner_token: Some(self.key_owner_token.clone()),
            mqtt_host: Ipv4Addr::LOCALHOST,
            mqtt_port: self.mqtt_port,
            pid: self.pid(),
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for GatewayChild {
    fn drop(&mut self) {
        let _ = self.kill();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
