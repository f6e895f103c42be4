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
//! - [`Api`]: a tiny JSON client with a bearer token; [`Api::ok_as`] reads one of the API's typed
//!   answers (`rki_gateway::api::types`), as the gateway writes them and `rkictl` reads them.
//! - [`create_task`], [`task_detail`], [`preview`], [`stop_task`], [`wait_task`],
//!   [`wait_task_done`]: the task routes, typed, so that a renamed field fails to compile instead
//!   of reading as null. A test that checks the raw JSON of an answer (its field names) reads it
//!   with [`Api::ok`].
//! - [`provision`]: key ceremony, device import, group, assignment, GUDIDs in one call.
//! - [`RawDevice`]: a hand-driven terminal for forged, replayed and malformed messages.
//! - [`expected_kcv`]: the KCV of an IPEK derived independently from the BDK and a KSN.
//! - [`mqtt`]: raw MQTT connections (rumqttc's codecs, plain or TLS), a terminal's credentials,
//!   and the independent clients (paho-mqtt, mosquitto_pub/sub) for the endpoint tests.
//! - [`Mosquitto`], [`pg::PgServer`] and [`Cluster`]: the external broker, a throwaway PostgreSQL,
//!   and several gateway nodes on both (`docs/SCALE-OUT.md`).
//! - [`wait`]: bounded waits on a condition, the only way a test waits for something to happen.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rki_gateway::api::types::{Preview, PreviewAnswer, TaskCounts, TaskCreated, TaskDetail, TaskRequest, TaskStopped};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{self, DeviceSecrets, Ephemeral, Gudid};
use rki_protocol::message::{Body, CreateKey, Message};
use rki_protocol::{topic, KcvLen, SymmetricKey};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

pub mod cluster;
pub mod mqtt;
pub mod pg;
pub mod pki;
pub mod wait;

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
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        let url = format!("{}/healthz", self.url());
        let exited = wait::poll("the gateway to answer /healthz", timeout, || {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => return Ok(Some(status.to_string())),
                    Ok(None) => {}
                    Err(e) => return Ok(Some(e.to_string())),
                }
            }
            agent.get(&url).call().map(|_| None).map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{e}; log: {}", self.log_tail()))?;
        match exited {
            Some(status) => Err(format!("gateway exited with {status}; log: {}", self.log_tail()).into()),
            None => Ok(()),
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
        let exited =
            wait::poll("the gateway to exit after SIGTERM", Duration::from_secs(30), || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(e.to_string()),
            });
        if exited.is_err() {
            child.kill()?;
        }
        exited
    }

    /// Replaces the extra environment of the next start (e.g. to start again without a crash
    /// point).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.options.env = env;
    }

    /// Waits for the process to exit on its own (a crash point), at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> TestResult<std::process::ExitStatus> {
        let mut child = self.child.take().ok_or("not running")?;
        wait::child_exit("the gateway to exit on its own", timeout, &mut child)
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

    /// Waits until `sample` of `/metrics` satisfies `condition`; returns its value then.
    pub fn wait_metric(&self, sample: &str, timeout: Duration, condition: impl Fn(f64) -> bool) -> TestResult<f64> {
        wait::poll(&format!("{sample} to reach the expected value"), timeout, || {
            let value = self.metric(sample);
            if condition(value) {
                Ok(value)
            } else {
                Err(format!("{value}"))
            }
        })
    }

    /// Waits until the admin API shows every one of `sns` online (or, with `online` false,
    /// offline): the gateway has handled their hellos (or their goodbyes).
    pub fn wait_online<S: AsRef<str>>(&self, sns: &[S], online: bool) -> TestResult {
        let api = self.api();
        for sn in sns {
            let sn = sn.as_ref();
            wait::poll(&format!("{sn} to be shown online = {online}"), Duration::from_secs(15), || {
                let v = api.ok(&format!("/v1/devices/{sn}")).map_err(|e| e.to_string())?;
                if v["device"]["online"] == online {
                    Ok(())
                } else {
                    Err(v["device"].to_string())
                }
            })?;
        }
        Ok(())
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

    /// GET that must answer 200 with one of the API's typed answers
    /// (`rki_gateway::api::types`).
    pub fn ok_as<T: DeserializeOwned>(&self, path: &str) -> TestResult<T> {
        typed(&format!("GET {path}"), &self.ok(path)?)
    }

    /// POST of a typed request that must answer 200 or 201 with a typed answer.
    pub fn ok_post_as<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> TestResult<T> {
        typed(&format!("POST {path}"), &self.ok_post(path, &serde_json::to_value(body)?)?)
    }
}

/// An answer decoded as `T`; the error names the request and shows the answer.
fn typed<T: DeserializeOwned>(request: &str, answer: &Value) -> TestResult<T> {
    T::deserialize(answer).map_err(|e| format!("{request}: unexpected answer ({e}): {answer}").into())
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

/// A task request for the group `group`, the rest by default; e.g.
/// `TaskRequest { expiry_days: Some(3), ..for_group("shop") }`.
pub fn for_group(group: &str) -> TaskRequest {
    TaskRequest { group: Some(group.to_string()), ..Default::default() }
}

/// A task request for the devices `sns`, the rest by default.
pub fn for_sns<S: AsRef<str>>(sns: &[S]) -> TaskRequest {
    TaskRequest { sns: Some(sns.iter().map(|sn| sn.as_ref().to_string()).collect()), ..Default::default() }
}

/// `POST /v1/tasks`: the task created and the preview it was made from.
pub fn create_task(api: &Api, request: &TaskRequest) -> TestResult<TaskCreated> {
    api.ok_post_as("/v1/tasks", request)
}

/// `POST /v1/tasks/preview`: which devices of `request`'s target are ready.
pub fn preview(api: &Api, request: &TaskRequest) -> TestResult<Preview> {
    Ok(api.ok_post_as::<PreviewAnswer>("/v1/tasks/preview", request)?.preview)
}

/// `GET /v1/tasks/{task}`: the task and its executions.
pub fn task_detail(api: &Api, task: i64) -> TestResult<TaskDetail> {
    api.ok_as(&format!("/v1/tasks/{task}"))
}

/// `POST /v1/tasks/{task}/stop`.
pub fn stop_task(api: &Api, task: i64) -> TestResult<TaskStopped> {
    api.ok_post_as(&format!("/v1/tasks/{task}/stop"), &json!({}))
}

/// Polls a task until `condition` holds for its counts, or the timeout.
pub fn wait_task(
    api: &Api,
    task: i64,
    timeout: Duration,
    condition: impl Fn(&TaskCounts) -> bool,
) -> TestResult<TaskDetail> {
    poll_task(api, task, &format!("task {task}'s counts to meet the condition"), timeout, |t| condition(&t.task.counts))
}

/// Polls a task until no execution is open, or the timeout.
pub fn wait_task_done(api: &Api, task: i64, timeout: Duration) -> TestResult<TaskDetail> {
    poll_task(api, task, &format!("task {task} to be done"), timeout, |t| t.task.status == "done")
}

/// Polls `GET /v1/tasks/{task}` until `holds`. An error status is polled again (a gateway
/// restarting, a store coming back); an answer that does not decode fails at once.
fn poll_task(
    api: &Api,
    task: i64,
    what: &str,
    timeout: Duration,
    holds: impl Fn(&TaskDetail) -> bool,
) -> TestResult<TaskDetail> {
    let path = format!("/v1/tasks/{task}");
    wait::poll(what, timeout, || {
        let answer = api.ok(&path).map_err(|e| e.to_string())?;
        match typed::<TaskDetail>(&format!("GET {path}"), &answer) {
            Ok(detail) if holds(&detail) => Ok(Ok(detail)),
            Ok(detail) => Err(format!("{:?}", detail.task.counts)),
            Err(undecodable) => Ok(Err(undecodable)),
        }
    })?
}

/// A hand-driven terminal: initialises with a GUDID like a real one, then sends whatever frames a
/// test wants, forged or not.
pub struct RawDevice {
    pub sn: String,
    pub secrets: DeviceSecrets,
    pub client: AsyncClient,
    events: Publishes,
    counter: u64,
}

/// What an MQTT test client receives: every publish, as (topic, payload).
pub type Publishes = tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>;

/// How long a test client waits for its CONNACK and for its SUBACKs.
const MQTT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects an MQTT client and forwards received publishes to a channel.
pub async fn mqtt_connect(
    port: u16,
    client_id: &str,
    password: &str,
    clean: bool,
) -> TestResult<(AsyncClient, Publishes)> {
    mqtt_connect_subscribed(port, client_id, password, clean, &[]).await
}

/// Connects an MQTT client, subscribes to `filters` and returns once the broker has acknowledged
/// every subscription (its SUBACKs, whatever their codes): a publish made after this returns is
/// routed to the client. Publishes received meanwhile are kept for the channel.
pub async fn mqtt_connect_subscribed(
    port: u16,
    client_id: &str,
    password: &str,
    clean: bool,
    filters: &[String],
) -> TestResult<(AsyncClient, Publishes)> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_credentials(client_id, password);
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(16 * 1024, 16 * 1024);
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 64);
    // Wait for the CONNACK (or the refusal) before returning.
    let first =
        tokio::time::timeout(MQTT_HANDSHAKE_TIMEOUT, eventloop.poll()).await.map_err(|_| "CONNECT timed out")?;
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == rumqttc::ConnectReturnCode::Success => {}
        Ok(other) => return Err(format!("CONNECT refused: {other:?}").into()),
        Err(e) => return Err(format!("CONNECT failed: {e}").into()),
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for filter in filters {
        client.subscribe(filter.as_str(), QoS::AtLeastOnce).await?;
    }
    let deadline = tokio::time::Instant::now() + MQTT_HANDSHAKE_TIMEOUT;
    let mut acked = 0;
    while acked < filters.len() {
        let event = tokio::time::timeout_at(deadline, eventloop.poll()).await.map_err(|_| {
            format!("{client_id}: {acked} of {} SUBACKs within {MQTT_HANDSHAKE_TIMEOUT:?}", filters.len())
        })?;
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => acked += 1,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("{client_id}: connection lost while subscribing: {e}").into()),
        }
    }
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
        let down = [topic::device_down(sn)];
        let (client, events) = wait::poll_async(&format!("the broker to admit {sn}"), Duration::from_secs(15), || {
            mqtt_connect_subscribed(port, sn, &password, false, &down)
        })
        .await?;
        Ok(RawDevice { sn: sn.to_string(), secrets, client, events, counter })
    }

    /// Initialises `sn` with `gudid` over the bootstrap identity (the `CreateKey` exchange) and
    /// returns the device's secrets, without connecting as the device.
    pub async fn initialise_secrets(port: u16, sn: &str, gudid: &str) -> TestResult<DeviceSecrets> {
        let gudid = Gudid::parse(gudid)?;
        // One attempt: a refused bootstrap CONNECT is an answer some tests expect (and count).
        // Before an external broker, wait for it to admit the identity first
        // ([`wait_bootstrap_admitted`]).
        let down = [topic::device_down(sn)];
        let (boot, mut rx) =
            mqtt_connect_subscribed(port, &format!("init@{sn}"), &bootstrap_password(&gudid, sn), true, &down).await?;
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
        if a.request_counter != counter {
            return Err(format!("the answer names CreateKey {}, not ours ({counter})", a.request_counter).into());
        }
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

/// Microseconds since the UNIX epoch: a fresh frame counter (PROTOCOL.md §4.4).
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Waits until the broker on `port` admits the bootstrap identity of the first and the last of
/// `gudids` (SN, GUDID text): an external broker loads them from the password file the gateway
/// rewrites after a provisioning, and the simulated terminals take a refused CONNECT as final.
pub async fn wait_bootstrap_admitted(port: u16, gudids: &[(String, String)], timeout: Duration) -> TestResult {
    let ends = [gudids.first(), gudids.last()];
    for (sn, gudid) in ends.into_iter().flatten() {
        let password = bootstrap_password(&Gudid::parse(gudid)?, sn);
        let id = format!("init@{sn}");
        let (client, _) = wait::poll_async(&format!("the broker to admit {id}"), timeout, || {
            mqtt_connect(port, &id, &password, true)
        })
        .await?;
        let _ = client.disconnect().await;
    }
    Ok(())
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
    events: Publishes,
}

impl RawBootstrap {
    pub async fn connect(port: u16, sn: &str, gudid: &Gudid) -> TestResult<RawBootstrap> {
        let down = [topic::device_down(sn)];
        let (client, events) =
            mqtt_connect_subscribed(port, &format!("init@{sn}"), &bootstrap_password(gudid, sn), true, &down).await?;
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
    events: Publishes,
    pub seen: Vec<(String, Vec<u8>)>,
}

impl Capture {
    /// Connects as `client_id` / `password` (any identity the broker admits) and subscribes to `#`.
    pub async fn start(port: u16, client_id: &str, password: &str) -> TestResult<Capture> {
        let (client, events) = mqtt_connect_subscribed(port, client_id, password, true, &["#".to_string()]).await?;
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
        Self::start_with_conf(port, |dir| {
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
            )
        })
    }

    /// Writes the configuration `conf_text` makes for the broker's own new directory, starts
    /// Mosquitto on it and waits until it listens on `port`: every `start_*` above and below.
    fn start_with_conf(port: u16, conf_text: impl FnOnce(&Path) -> String) -> TestResult<Mosquitto> {
        let dir = temp_dir("mosquitto");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, conf_text(&dir))?;
        let child = Self::spawn(&conf)?;
        Mosquitto { child, port, dir }.wait_listening()
    }

    /// Starts Mosquitto with the dynamic security plugin on `config_file` (the plugin's JSON,
    /// which must exist: `rki-gateway dynsec-init` writes it), and no password or ACL file.
    pub fn start_dynsec(port: u16, config_file: &Path) -> TestResult<Mosquitto> {
        let plugin = Self::dynsec_plugin()?;
        Self::start_with_conf(port, |dir| {
            format!(
                "user root\nper_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous false\n\
                 plugin {}\nplugin_opt_config_file {}\npersistence false\n\
                 max_inflight_messages 1000\nmax_queued_messages 100000\nlog_dest file {}\n\
                 log_type error\nlog_type warning\nlog_type notice\n",
                plugin.display(),
                config_file.display(),
                dir.join("mosquitto.log").display()
            )
        })
    }

    /// Starts Mosquitto with the store plugin (`librki_mosquitto_auth.so`, built beside the
    /// binaries), which reads the store URL from `url_file`, and a password file and an ACL file
    /// that hold only the gateway's identity (`defer_usernames`).
    pub fn start_store_auth(
        port: u16,
        url_file: &Path,
        defer_usernames: &str,
        password_file: &Path,
        acl_file: &Path,
    ) -> TestResult<Mosquitto> {
        let plugin = Self::store_auth_plugin()?;
        Self::start_with_conf(port, |dir| {
            format!(
                "user root\nper_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous false\n\
                 plugin {}\nplugin_opt_store_url_file {}\nplugin_opt_defer_usernames {defer_usernames}\n\
                 password_file {}\nacl_file {}\npersistence false\n\
                 max_inflight_messages 1000\nmax_queued_messages 100000\nlog_dest file {}\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n\
                 log_type unsubscribe\nconnection_messages false\n",
                plugin.display(),
                url_file.display(),
                password_file.display(),
                acl_file.display(),
                dir.join("mosquitto.log").display()
            )
        })
    }

    /// The store plugin, as `cargo build --workspace --release` leaves it beside the binaries.
    pub fn store_auth_plugin() -> TestResult<PathBuf> {
        let path = binary("librki_mosquitto_auth.so");
        if path.exists() {
            Ok(path)
        } else {
            Err(format!("{} not found: build it with `cargo build --workspace --release`", path.display()).into())
        }
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
        let child = &mut self.child;
        wait::poll("mosquitto to exit after SIGTERM", MOSQUITTO_STOP_TIMEOUT, || match child.try_wait() {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        })?;
        self.child = Self::spawn(&self.dir.join("mosquitto.conf"))?;
        self.wait_port()?;
        Ok(stopped.elapsed())
    }

    fn wait_listening(mut self) -> TestResult<Mosquitto> {
        self.wait_port()?;
        Ok(self)
    }

    /// Waits until the broker accepts TCP connections on its port (an error at once if it exits).
    fn wait_port(&mut self) -> TestResult {
        let port = self.port;
        let child = &mut self.child;
        let exited = wait::poll(&format!("mosquitto to listen on {port}"), Duration::from_secs(10), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(Some(status));
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| None).map_err(|e| e.to_string())
        })?;
        match exited {
            Some(status) => Err(format!("mosquitto exited: {status}; log: {}", self.log()).into()),
            None => Ok(()),
        }
    }

    /// Waits until the client `client_id` (a gateway node) has `count` subscriptions in the
    /// broker's log (the configuration logs every SUBSCRIBE): from then on, what devices publish
    /// reaches it.
    pub fn wait_subscribed(&self, client_id: &str, count: usize, timeout: Duration) -> TestResult {
        wait::poll(&format!("{client_id} to subscribe {count} time(s) on mosquitto"), timeout, || {
            let seen = self.subscriptions(client_id);
            if seen >= count {
                Ok(())
            } else {
                Err(format!("{seen} subscription line(s)"))
            }
        })
    }

    /// How many SUBSCRIBE filters of `client_id` the broker's log shows so far (lines
    /// `<time>: <client id> <qos> <filter>`; the log survives a restart of the broker).
    pub fn subscriptions(&self, client_id: &str) -> usize {
        let needle = format!(": {client_id} ");
        self.log().lines().filter(|l| l.contains(&needle)).count()
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
