//! # rki-tests
//!
//! The end-to-end harness. It starts the real `rki-gateway` binary as a child process (its own
//! data directory, free loopback ports, optionally an adjustable clock), bootstraps the key owner
//! and an organization with the binary's own offline commands, and drives the admin API over HTTP
//! and devices over real MQTT, with `rki-device-sim` terminals or a [`RawDevice`] that crafts
//! frames by hand for hostile tests.
//!
//! ## Layout
//! - [`GatewayProcess`]: start, SIGKILL, SIGTERM, restart; `/metrics` readings.
//! - [`Api`]: a tiny JSON client with a bearer token.
//! - [`provision`]: key ceremony, device import, group, assignment, GUDIDs in one call.
//! - [`RawDevice`]: a hand-driven terminal for forged, replayed and malformed messages.
//! - [`expected_kcv`]: the KCV of an IPEK derived independently from the BDK and a KSN.
//! - [`mqtt`]: raw MQTT connections (rumqttc's codecs, plain or TLS), a terminal's credentials,
//!   and the independent clients (paho-mqtt, mosquitto_pub/sub) for the endpoint tests.
//! - [`Mosquitto`], [`pg::PgServer`] and [`Cluster`]: the external broker, a throwaway PostgreSQL,
//!   and several gateway nodes on both (`docs/SCALE-OUT.md`).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{self, DeviceSecrets, Ephemeral, Gudid};
use rki_protocol::message::{Body, CreateKey, Message};
use rki_protocol::{topic, KcvLen, SymmetricKey};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

pub mod cluster;
pub mod mqtt;
pub mod pg;

pub use cluster::{BrokerAuth, Cluster, ClusterOptions};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The test BDK (ANSI X9.24-1 sample BDK), entered as two components.
pub const TEST_BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
/// The second of its two components (the first is the BDK XOR this).
pub const COMPONENT_2: &str = "1111111111111111EEEEEEEEEEEEEEEE";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The directory of the workspace's built binaries (next to this test executable's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rki-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Use the adjustable clock (`POST /v1/admin/clock`).
    pub adjustable_clock: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A TOML configuration file's content (`{dir}` is replaced by the gateway's directory).
    pub config_toml: Option<String>,
    /// The address the MQTT listener binds: 127.0.0.1 by default. The load tester binds 0.0.0.0,
    /// to spread its terminals over 127.0.0.1–127.0.0.N.
    pub mqtt_bind: Ipv4Addr,
    /// The gateway's directory, emptied first; by default a fresh one under the system temp dir.
    pub dir: Option<PathBuf>,
    /// Keep the directory when dropped (it is also kept when a test panics, or with
    /// `RKI_TEST_KEEP` set).
    pub keep_dir: bool,
    /// `RKI_LOG` for the process ("info" in the tests); `None` leaves the
    /// gateway's own default (or the caller's environment), as the load tester measures it.
    pub log_filter: Option<String>,
    /// How long a start may take until `/healthz` answers.
    pub healthy_timeout: Duration,
    /// The data directory, when it is not `<dir>/data` (a test that puts it on a filesystem of
    /// its own). The master key stays beside it, `<data_dir>.master.key`.
    pub data_dir: Option<PathBuf>,
    /// Start the gateway under `prlimit --nofile=N:N`: a low open-file limit.
    pub nofile_limit: Option<u64>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            adjustable_clock: false,
            env: Vec::new(),
            config_toml: None,
            mqtt_bind: Ipv4Addr::LOCALHOST,
            dir: None,
            keep_dir: false,
            log_filter: Some("info".to_string()),
            healthy_timeout: Duration::from_secs(30),
            data_dir: None,
            nofile_limit: None,
        }
    }
}

/// A running `rki-gateway` child process with its own data directory.
pub struct GatewayProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub key_owner_token: String,
    pub org_token: String,
    options: GatewayOptions,
    starts: u32,
}

fn token_from(output: &str) -> TestResult<String> {
    output
        .lines()
        .find_map(|l| l.split("): ").nth(1).map(|t| t.trim().to_string()))
        .ok_or_else(|| format!("no token in {output:?}").into())
}

impl GatewayProcess {
    /// Bootstraps a key owner and the organization `acme`, then starts the gateway.
    pub fn start(options: GatewayOptions) -> TestResult<Self> {
        Self::start_node(options, None)
    }

    /// Starts another node on a store that is already bootstrapped (several gateway nodes on one
    /// PostgreSQL database): the tokens are the first node's.
    pub fn join(options: GatewayOptions, key_owner_token: &str, org_token: &str) -> TestResult<Self> {
        Self::start_node(options, Some((key_owner_token.to_string(), org_token.to_string())))
    }

    /// The bootstrap commands read the same configuration file and environment as the gateway,
    /// so that they reach the configured store.
    fn start_node(options: GatewayOptions, tokens: Option<(String, String)>) -> TestResult<Self> {
        let exe = binary("rki-gateway");
        if !exe.exists() {
            return Err(format!("{} is not built: run `cargo build --workspace --release` first", exe.display()).into());
        }
        let dir = match &options.dir {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(dir);
                std::fs::create_dir_all(dir)?;
                dir.clone()
            }
            None => temp_dir("gw"),
        };
        let mut gw = GatewayProcess {
            child: None,
            dir,
            mqtt_port: free_port(),
            http_port: free_port(),
            key_owner_token: String::new(),
            org_token: String::new(),
            options,
            starts: 0,
        };
        (gw.key_owner_token, gw.org_token) = match tokens {
            Some(tokens) => tokens,
            None => {
                let run = |args: &[&str]| -> TestResult<String> {
                    let out = gw.offline(args)?;
                    if !out.status.success() {
                        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
                    }
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                };
                (token_from(&run(&["init-key-owner"])?)?, token_from(&run(&["init-org", "acme"])?)?)
            }
        };
        gw.spawn()?;
        Ok(gw)
    }

    /// The data directory: `<dir>/data` unless the options name another.
    pub fn data_dir(&self) -> PathBuf {
        self.options.data_dir.clone().unwrap_or_else(|| self.dir.join("data"))
    }

    /// `rki-gateway` with this gateway's data directory, configuration file and environment.
    fn command(&self) -> TestResult<Command> {
        let mut cmd = Command::new(binary("rki-gateway"));
        cmd.arg("--data-dir").arg(self.data_dir());
        if let Some(toml) = &self.options.config_toml {
            let path = self.dir.join("config.toml");
            std::fs::write(&path, toml.replace("{dir}", &self.dir.display().to_string()))?;
            cmd.arg("--config").arg(path);
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Creates another organization through the running gateway's API, as the key owner
    /// (`rki-gateway init-org` is refused while the gateway holds its data directory), and
    /// returns its admin token.
    pub fn init_org(&self, name: &str) -> TestResult<String> {
        let (status, v) = self.key_owner().post("/v1/orgs", &json!({ "name": name }));
        if status != 201 {
            return Err(format!("create org {name}: {status} {v}").into());
        }
        v["admin_token"].as_str().map(str::to_string).ok_or_else(|| format!("no admin_token in {v}").into())
    }

    /// The key owner uploads the device CSV `csv` (`sn[,model]` per line) to the organization
    /// `org`, as the provider does for each of its partners; the answer as it comes.
    pub fn upload_devices(&self, org: &str, csv: &str) -> (u16, Value) {
        self.key_owner().post_csv(&format!("/v1/orgs/{org}/devices/import"), csv)
    }

    /// Runs `rki-gateway ARGS --data-dir <this gateway's data dir>` (with its configuration file
    /// and environment) and returns its output.
    pub fn offline(&self, args: &[&str]) -> TestResult<std::process::Output> {
        Ok(self.command()?.args(args).output()?)
    }

    /// Starts the process again after [`GatewayProcess::terminate`] or [`GatewayProcess::kill`],
    /// on the same directory and ports; returns how long it took to answer `/healthz`.
    pub fn start_again(&mut self) -> TestResult<Duration> {
        self.spawn()
    }

    fn spawn(&mut self) -> TestResult<Duration> {
        let started = Instant::now();
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let mut cmd = match self.options.nofile_limit {
            // prlimit sets the limit on itself and execs the gateway: same process, same pid.
            Some(n) => {
                let inner = self.command()?;
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg(inner.get_program()).args(inner.get_args());
                for (k, v) in inner.get_envs() {
                    if let Some(v) = v {
                        cmd.env(k, v);
                    }
                }
                cmd
            }
            None => self.command()?,
        };
        cmd.arg("--mqtt-addr")
            .arg(format!("{}:{}", self.options.mqtt_bind, self.mqtt_port))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(filter) = &self.options.log_filter {
            cmd.env("RKI_LOG", filter);
        }
        if self.options.adjustable_clock {
            cmd.env("RKI_CLOCK", "adjustable");
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn()?);
        self.wait_healthy(self.options.healthy_timeout)?;
        Ok(started.elapsed())
    }

    /// The log file of the current start (`gateway-N.log` in the gateway's directory).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("gateway-{}.log", self.starts))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> TestResult {
        let started = Instant::now();
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(format!("gateway exited with {status}; log: {}", self.log_tail()).into());
                }
            }
            if agent.get(&format!("{}/healthz", self.url())).call().is_ok() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!("gateway not healthy after {timeout:?}; log: {}", self.log_tail()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the current log, for failure messages.
    pub fn log_tail(&self) -> String {
        let lines: Vec<String> = std::fs::File::open(self.log_path())
            .map(|f| BufReader::new(f).lines().map_while(Result::ok).collect())
            .unwrap_or_default();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The admin API with the organization's token.
    pub fn api(&self) -> Api {
        Api::new(&self.url(), &self.org_token)
    }

    /// The admin API with the key owner's token.
    pub fn key_owner(&self) -> Api {
        Api::new(&self.url(), &self.key_owner_token)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a graceful exit.
    pub fn terminate(&mut self) -> TestResult<std::process::ExitStatus> {
        let mut child = self.child.take().ok_or("not running")?;
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > Duration::from_secs(30) {
                child.kill()?;
                return Err("gateway did not stop within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again on the same data directory and ports.
    pub fn restart(&mut self) -> TestResult {
        self.kill()?;
        self.spawn().map(drop)
    }

    /// The value of one sample of `/metrics`, e.g. `rki_acks_total{result="succeeded"}`; 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.url()))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default();
        metric_value(&text, sample)
    }

    /// Moves the adjustable clock forward by `days`, which also runs the expiry sweep.
    pub fn advance_days(&self, days: i64) -> TestResult<Value> {
        let (status, v) = self.key_owner().post("/v1/admin/clock", &json!({"advance_seconds": days * 86_400}));
        if status != 200 {
            return Err(format!("clock advance: {status} {v}").into());
        }
        Ok(v)
    }
}

/// Reads one sample from a Prometheus text page; the labels must match exactly as rendered.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.kill();
        // Kept for diagnosis when a test panics or RKI_TEST_KEEP is set, and when asked to.
        if !self.options.keep_dir && !std::thread::panicking() && std::env::var_os("RKI_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("gateway files kept in {}", self.dir.display());
        }
    }
}

/// A minimal JSON client for the admin API.
#[derive(Clone)]
pub struct Api {
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            url: url.to_string(),
            token: token.to_string(),
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build(),
        }
    }

    fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
        match result {
            Ok(r) => {
                let status = r.status();
                let text = r.into_string().unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(
            self.agent
                .get(&format!("{}{path}", self.url))
                .set("Authorization", &format!("Bearer {}", self.token))
                .call(),
        )
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        match self
            .agent
            .get(&format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
        {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        Self::answer(
            self.agent
                .post(&format!("{}{path}", self.url))
                .set("Authorization", &format!("Bearer {}", self.token))
                .send_json(body.clone()),
        )
    }

    pub fn post_csv(&self, path: &str, csv: &str) -> (u16, Value) {
        Self::answer(
            self.agent
                .post(&format!("{}{path}", self.url))
                .set("Authorization", &format!("Bearer {}", self.token))
                .set("Content-Type", "text/csv")
                .send_string(csv),
        )
    }

    /// GET that must answer 200.
    pub fn ok(&self, path: &str) -> TestResult<Value> {
        match self.get(path) {
            (200, v) => Ok(v),
            (s, v) => Err(format!("GET {path}: {s} {v}").into()),
        }
    }

    /// POST that must answer 200 or 201.
    pub fn ok_post(&self, path: &str, body: &Value) -> TestResult<Value> {
        match self.post(path, body) {
            (200 | 201, v) => Ok(v),
            (s, v) => Err(format!("POST {path}: {s} {v}").into()),
        }
    }
}

/// What [`provision`] set up.
pub struct Provisioned {
    pub sns: Vec<String>,
    /// SN → GUDID text.
    pub gudids: Vec<(String, String)>,
}

/// The key ceremony (the test BDK as two components, `bdk-test` authorized for `acme`) if not done
/// yet, then: the key owner uploads `sns` to `acme`, which adds them to `group`, assigns `bdk-test`
/// and provisions one GUDID per SN.
pub fn provision(gw: &GatewayProcess, sns: &[String], group: &str) -> TestResult<Provisioned> {
    let api = gw.api();
    let sources = api.ok("/v1/key-sources")?;
    if !sources["key_sources"].as_array().is_some_and(|a| a.iter().any(|k| k["name"] == "bdk-test")) {
        authorize_test_bdk(gw, "acme", "bdk-test")?;
    }
    let csv = std::iter::once("sn,model".to_string())
        .chain(sns.iter().map(|sn| format!("{sn},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    let (status, v) = gw.upload_devices("acme", &csv);
    if status != 200 {
        return Err(format!("upload: {status} {v}").into());
    }
    let _ = api.post("/v1/groups", &json!({"name": group}));
    api.ok_post(&format!("/v1/groups/{group}/devices"), &json!({"sns": sns}))?;
    api.ok_post("/v1/assignments", &json!({"group": group, "key_source": "bdk-test"}))?;
    let mut gudids = Vec::with_capacity(sns.len());
    // At most 1000 GUDIDs per call (`api::GUDIDS_PER_REQUEST_MAX`).
    for chunk in sns.chunks(1000) {
        let v = api.ok_post("/v1/gudids", &json!({"sns": chunk}))?;
        for g in v["gudids"].as_array().cloned().unwrap_or_default() {
            gudids.push((
                g["sn"].as_str().unwrap_or_default().to_string(),
                g["gudid"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    Ok(Provisioned { sns: sns.to_vec(), gudids })
}

/// Authorizes the test BDK for `org` under `name`, as the key owner.
pub fn authorize_test_bdk(gw: &GatewayProcess, org: &str, name: &str) -> TestResult<Value> {
    let bdk = SymmetricKey::tdes_from_hex(TEST_BDK)?;
    let c2 = SymmetricKey::tdes_from_hex(COMPONENT_2)?;
    let mut c1 = hex::decode(TEST_BDK)?;
    for (a, b) in c1.iter_mut().zip(hex::decode(COMPONENT_2)?) {
        *a ^= b;
    }
    let c1_key = SymmetricKey::tdes_from_hex(&hex::encode(&c1))?;
    let body = json!({
        "name": name,
        "algorithm": "tdes",
        "components": [
            {"key": hex::encode_upper(&c1), "kcv": c1_key.kcv(KcvLen::Three).to_hex()},
            {"key": COMPONENT_2, "kcv": c2.kcv(KcvLen::Three).to_hex()},
        ],
        "kcv": bdk.kcv(KcvLen::Three).to_hex(),
    });
    gw.key_owner().ok_post(&format!("/v1/orgs/{org}/key-sources"), &body)
}

/// The KCV of the IPEK derived from the test BDK and `ksn_hex`, computed here, independently of
/// the gateway.
pub fn expected_kcv(ksn_hex: &str) -> TestResult<String> {
    let bdk = SymmetricKey::tdes_from_hex(TEST_BDK)?;
    let ksn = rki_protocol::dukpt::tdes::Ksn::from_hex(ksn_hex)?;
    let ipek = rki_protocol::dukpt::tdes::derive_ipek(&bdk, &ksn)?;
    Ok(ipek.kcv(KcvLen::Three).to_hex())
}

/// Creates a task and returns its id.
pub fn create_task(api: &Api, body: &Value) -> TestResult<i64> {
    let v = api.ok_post("/v1/tasks", body)?;
    v["task"]["id"].as_i64().ok_or_else(|| format!("no task id in {v}").into())
}

/// Polls a task until `condition` holds for its counts, or the timeout.
pub fn wait_task(api: &Api, task: i64, timeout: Duration, condition: impl Fn(&Value) -> bool) -> TestResult<Value> {
    let started = Instant::now();
    loop {
        let v = api.ok(&format!("/v1/tasks/{task}"))?;
        if condition(&v["task"]["counts"]) {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            return Err(format!("task {task}: condition not met after {timeout:?}: {}", v["task"]["counts"]).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls a task until no execution is open, or the timeout.
pub fn wait_task_done(api: &Api, task: i64, timeout: Duration) -> TestResult<Value> {
    let started = Instant::now();
    loop {
        let v = api.ok(&format!("/v1/tasks/{task}"))?;
        if v["task"]["status"] == "done" {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            return Err(format!("task {task} not done after {timeout:?}: {}", v["task"]["counts"]).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A hand-driven terminal: initialises with a GUDID like a real one, then sends whatever frames a
/// test wants, forged or not.
pub struct RawDevice {
    pub sn: String,
    pub secrets: DeviceSecrets,
    pub client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    counter: u64,
}

/// Connects an MQTT client and forwards received publishes to a channel.
pub async fn mqtt_connect(
    port: u16,
    client_id: &str,
    password: &str,
    clean: bool,
) -> TestResult<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>)> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_credentials(client_id, password);
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(16 * 1024, 16 * 1024);
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 64);
    // Wait for the CONNACK (or the refusal) before returning.
    let first =
        tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await.map_err(|_| "CONNECT timed out")?;
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == rumqttc::ConnectReturnCode::Success => {}
        Ok(other) => return Err(format!("CONNECT refused: {other:?}").into()),
        Err(e) => return Err(format!("CONNECT failed: {e}").into()),
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok((client, rx))
}

impl RawDevice {
    /// Initialises `sn` with `gudid` over the bootstrap identity, then connects as the device.
    pub async fn initialise(port: u16, sn: &str, gudid: &str) -> TestResult<RawDevice> {
        let secrets = Self::initialise_secrets(port, sn, gudid).await?;
        let counter = now_us();
        let password = String::from_utf8(secrets.mqtt_password.expose_secret().to_vec())?;
        // An external broker may need a moment to load the new credentials (with several nodes,
        // up to the syncing node's 5 s rewrite when another node handled the CreateKey).
        let mut attempt = 0;
        let (client, events) = loop {
            match mqtt_connect(port, sn, &password, false).await {
                Ok(c) => break c,
                Err(e) if attempt >= 100 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        client.subscribe(topic::device_down(sn), QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(RawDevice { sn: sn.to_string(), secrets, client, events, counter })
    }

    /// Initialises `sn` with `gudid` over the bootstrap identity (the `CreateKey` exchange) and
    /// returns the device's secrets, without connecting as the device.
    pub async fn initialise_secrets(port: u16, sn: &str, gudid: &str) -> TestResult<DeviceSecrets> {
        let gudid = Gudid::parse(gudid)?;
        let (boot, mut rx) = mqtt_connect(port, &format!("init@{sn}"), &bootstrap_password(&gudid, sn), true).await?;
        boot.subscribe(topic::device_down(sn), QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ephemeral = Ephemeral::random()?;
        let counter = now_us();
        let request = Body {
            party: sn.to_string(),
            counter,
            message: Message::CreateKey(CreateKey {
                gudid_id: gudid.id(),
                x_pos_device_id: format!("RAW-{sn}"),
                device_public: ephemeral.public(),
            }),
        };
        let request_frame = frame::seal(&gudid.mac_key(), &request)?;
        boot.publish(topic::init(sn), QoS::AtLeastOnce, false, request_frame.clone()).await?;
        let (_, answer) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?.ok_or("no answer")?;
        let opened = frame::open(&answer)?;
        let answer_body = opened.body_bytes().to_vec();
        let verified = opened.verify(&gudid.mac_key()).map_err(|e| format!("answer: {e}"))?;
        let Message::CreateKeyAnswer(a) = verified.body.message else {
            return Err(format!("not an answer: {:?}", verified.body.message).into());
        };
        let secrets = init::derive_device_secrets(
            ephemeral,
            &a.gateway_public,
            &gudid.mac_key(),
            frame::body_bytes_of(&request_frame).ok_or("request body")?,
            &answer_body,
        )?;
        let _ = boot.disconnect().await;
        Ok(secrets)
    }

    pub fn next_counter(&mut self) -> u64 {
        self.counter = self.counter.max(now_us()) + 1;
        self.counter
    }

    /// Seals `message` under `key` with a fresh counter and publishes it on this device's up topic.
    pub async fn send_with(&mut self, key: &MacKey, message: Message) -> TestResult<Vec<u8>> {
        let body = Body { party: self.sn.clone(), counter: self.next_counter(), message };
        let bytes = frame::seal(key, &body)?;
        self.publish_raw(&topic::device_up(&self.sn), bytes.clone()).await?;
        Ok(bytes)
    }

    pub async fn send(&mut self, message: Message) -> TestResult<Vec<u8>> {
        let key = self.secrets.signing_key.clone_secret();
        self.send_with(&key, message).await
    }

    pub async fn publish_raw(&self, topic: &str, bytes: Vec<u8>) -> TestResult {
        self.client.publish(topic, QoS::AtLeastOnce, false, bytes).await?;
        Ok(())
    }

    /// The next message on the down topic that verifies under the signing key.
    pub async fn next_down(&mut self, timeout: Duration) -> TestResult<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, bytes) = tokio::time::timeout(left, self.events.recv()).await?.ok_or("disconnected")?;
            if let Ok(v) = frame::open(&bytes).and_then(|u| u.verify(&self.secrets.signing_key)) {
                return Ok(v.body.message);
            }
        }
    }

    /// The success ack a terminal sends for download `d`, echoing its KCV.
    pub fn ack(d: &rki_protocol::message::Download) -> Message {
        Self::ack_with_kcv(d, d.kcv.clone())
    }

    /// The same ack with another KCV (a terminal that installed some other key).
    pub fn ack_with_kcv(d: &rki_protocol::message::Download, kcv: Vec<u8>) -> Message {
        Message::Ack(rki_protocol::message::Ack {
            execution_id: d.execution_id,
            result: 0,
            slot: d.slot,
            key_id: d.key_id.clone(),
            kcv,
            injection: rki_protocol::terminal::InjectionType::Auto,
        })
    }

    /// A signed hello with a P3 at its minimum firmware.
    pub fn hello(locked: bool) -> Message {
        Message::Hello(rki_protocol::message::Hello {
            model: "P3".into(),
            rom_version: "3.0.15".into(),
            app_version: "2.0.0".into(),
            region: rki_protocol::terminal::Region::Eu,
            debug_mode: false,
            locked,
            slots: vec![],
        })
    }
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The bootstrap identity's password for `sn` under `gudid` (PROTOCOL.md §2.2).
pub fn bootstrap_password(gudid: &Gudid, sn: &str) -> String {
    String::from_utf8_lossy(gudid.bootstrap_password(sn).expose_secret()).into_owned()
}

/// A bootstrap connection (`init@{SN}`, proving `gudid`) that sends hand-made CreateKey frames and
/// reads what comes back on the device's down topic.
pub struct RawBootstrap {
    pub sn: String,
    pub client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl RawBootstrap {
    pub async fn connect(port: u16, sn: &str, gudid: &Gudid) -> TestResult<RawBootstrap> {
        let (client, events) = mqtt_connect(port, &format!("init@{sn}"), &bootstrap_password(gudid, sn), true).await?;
        client.subscribe(topic::device_down(sn), QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok(RawBootstrap { sn: sn.to_string(), client, events })
    }

    /// A CreateKey frame for `gudid` with a fresh ephemeral key, as `sn`.
    pub fn create_key(sn: &str, gudid: &Gudid) -> TestResult<Vec<u8>> {
        let ephemeral = Ephemeral::random()?;
        let body = Body {
            party: sn.to_string(),
            counter: now_us(),
            message: Message::CreateKey(CreateKey {
                gudid_id: gudid.id(),
                x_pos_device_id: format!("RAW-{sn}"),
                device_public: ephemeral.public(),
            }),
        };
        Ok(frame::seal(&gudid.mac_key(), &body)?)
    }

    pub async fn send(&self, frame: Vec<u8>) -> TestResult {
        self.client.publish(topic::init(&self.sn), QoS::AtLeastOnce, false, frame).await?;
        Ok(())
    }

    /// The next message on the down topic, decoded but not verified (refusals carry no secret).
    pub async fn next(&mut self, timeout: Duration) -> TestResult<Message> {
        let (_, bytes) = tokio::time::timeout(timeout, self.events.recv()).await?.ok_or("disconnected")?;
        Ok(frame::open(&bytes)?.peek().message.clone())
    }
}

/// A client that asks for `#`: records every publish the endpoint (or a broker) lets it see.
pub struct Capture {
    pub client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pub seen: Vec<(String, Vec<u8>)>,
}

impl Capture {
    /// Connects as `client_id` / `password` (any identity the broker admits) and subscribes to `#`.
    pub async fn start(port: u16, client_id: &str, password: &str) -> TestResult<Capture> {
        let (client, events) = mqtt_connect(port, client_id, password, true).await?;
        client.subscribe("#", QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok(Capture { client, events, seen: Vec::new() })
    }

    /// Collects what arrived until nothing more comes for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> &[(String, Vec<u8>)] {
        while let Ok(Some(item)) = tokio::time::timeout(quiet, self.events.recv()).await {
            self.seen.push(item);
        }
        &self.seen
    }
}

/// A Mosquitto 2 broker (Debian's package) on a free loopback port, with its own directory,
/// stopped on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

/// How long a restarted Mosquitto may take to exit on SIGTERM (it writes its persistence file).
const MOSQUITTO_STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl Mosquitto {
    /// The binary, or an error naming the package to install.
    pub fn binary() -> TestResult<PathBuf> {
        for path in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
            if Path::new(path).exists() {
                return Ok(PathBuf::from(path));
            }
        }
        Err("mosquitto not found: install Debian's `mosquitto` package (.ci/run does)".into())
    }

    /// Starts Mosquitto with `password_file` and `acl_file` (which must exist), writing its pid to
    /// `pid_file` so that the gateway can make it reload them.
    pub fn start(port: u16, password_file: &Path, acl_file: &Path, pid_file: &Path) -> TestResult<Mosquitto> {
        Self::start_with(port, password_file, acl_file, pid_file, false)
    }

    /// The same, with `persistence true` (sessions, subscriptions and queued messages saved in its
    /// directory at shutdown and loaded at start), as `deploy/mosquitto.conf` ships it.
    pub fn start_persistent(
        port: u16,
        password_file: &Path,
        acl_file: &Path,
        pid_file: &Path,
    ) -> TestResult<Mosquitto> {
        Self::start_with(port, password_file, acl_file, pid_file, true)
    }

    fn start_with(
        port: u16,
        password_file: &Path,
        acl_file: &Path,
        pid_file: &Path,
        persistence: bool,
    ) -> TestResult<Mosquitto> {
        let dir = temp_dir("mosquitto");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npid_file {}\n\
                 persistence {persistence}\npersistence_location {}/\n\
                 max_inflight_messages 1000\nmax_queued_messages 100000\nlog_dest file {}\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\nlog_type unsubscribe\n",
                password_file.display(),
                acl_file.display(),
                pid_file.display(),
                dir.display(),
                dir.join("mosquitto.log").display()
            ),
        )?;
        let child = Self::spawn(&conf)?;
        let m = Mosquitto { child, port, dir };
        m.wait_listening()
    }

    /// Starts Mosquitto with the dynamic security plugin on `config_file` (the plugin's JSON,
    /// which must exist: `rki-gateway dynsec-init` writes it), and no password or ACL file.
    pub fn start_dynsec(port: u16, config_file: &Path) -> TestResult<Mosquitto> {
        let dir = temp_dir("mosquitto");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous false\n\
                 plugin {}\nplugin_opt_config_file {}\npersistence false\n\
                 max_inflight_messages 1000\nmax_queued_messages 100000\nlog_dest file {}\n\
                 log_type error\nlog_type warning\nlog_type notice\n",
                Self::dynsec_plugin()?.display(),
                config_file.display(),
                dir.join("mosquitto.log").display()
            ),
        )?;
        let child = Self::spawn(&conf)?;
        let m = Mosquitto { child, port, dir };
        m.wait_listening()
    }

    /// Debian's `mosquitto_dynamic_security.so`.
    pub fn dynsec_plugin() -> TestResult<PathBuf> {
        for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"] {
            let path = Path::new(dir).join("mosquitto_dynamic_security.so");
            if path.exists() {
                return Ok(path);
            }
        }
        Err("mosquitto_dynamic_security.so not found (Debian's `mosquitto` package ships it)".into())
    }

    fn spawn(conf: &Path) -> TestResult<Child> {
        Ok(Command::new(Self::binary()?).arg("-c").arg(conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
    }

    /// SIGTERM (Mosquitto publishes the wills of its clients, saves its persistence file and
    /// exits), then starts it again at once on the same configuration and port. Returns how long
    /// it was not listening.
    pub fn terminate_and_restart(&mut self) -> TestResult<Duration> {
        let stopped = Instant::now();
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if stopped.elapsed() > MOSQUITTO_STOP_TIMEOUT {
                return Err(format!("mosquitto did not exit within {MOSQUITTO_STOP_TIMEOUT:?} of SIGTERM").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Self::spawn(&self.dir.join("mosquitto.conf"))?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("mosquitto exited after a restart: {status}; log: {}", self.log()).into());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("mosquitto did not listen again within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(stopped.elapsed())
    }

    fn wait_listening(mut self) -> TestResult<Mosquitto> {
        let m = &mut self;
        let port = m.port;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = m.child.try_wait()? {
                return Err(format!("mosquitto exited: {status}; log: {}", m.log()).into());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("mosquitto did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// The broker's process id, for `/proc` readings.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() && std::env::var_os("RKI_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SNs `PREFIX000001`… `PREFIX{n}`.
pub fn sns(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:06}")).collect()
}
