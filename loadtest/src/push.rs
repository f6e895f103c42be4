//! The scenarios against the gateway: `fleet-push`, `reconnect-storm` and `churn`.
//!
//! Each one: start (or attach to) a gateway, prepare the fleet through the admin API, start the
//! simulated terminals in this process (each initialises with its GUDID, then connects under its
//! device identity and says hello), create one download task for the whole group, and wait until
//! every execution has ended. The figures come from the gateway's durable records (each ack's
//! time and KCV), the terminals' own state (one injection each) and /proc.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rki_device_sim::{DeviceProfile, Fleet, FleetConfig, FleetMember, Knobs};
use rki_protocol::terminal::Model;
use rki_tests::Api;
use serde_json::json;

use crate::gateway::{Endpoint, GatewayChild};
use crate::procfs;
use crate::progress::Progress;
use crate::setup::{self, Counts};
use crate::summary::{round3, Latency, Summary, ThreadCpu};
use crate::topology::{self, ClusterPids, ClusterSample, Topology};
use crate::Result;

/// How often the task's counts are read while a push runs.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the gateway may take to see every terminal's hello after they are all connected.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause with every terminal connected and idle before memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Ack delay given to every terminal before the reconnect storm's kill, so the push is still
/// pending when the gateway dies.
const STORM_ACK_DELAY: Duration = Duration::from_secs(600);
/// How long after the storm's last ack the tool waits for every terminal to be online at once.
const RECONNECT_GRACE: Duration = Duration::from_secs(60);

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    FleetPush,
    ReconnectStorm,
    /// `fraction` of the terminals power-cycle or lose the network once during the first
    /// `window` of the push, alternately; `flapping` of them flap for the whole push.
    Churn {
        fraction: f64,
        flapping: f64,
        window: Duration,
    },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::FleetPush => "fleet-push",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::Churn { .. } => "churn",
        }
    }
}

/// A gateway the tool attaches to instead of starting one.
#[derive(Debug, Clone)]
pub struct Attach {
    pub endpoint: Endpoint,
    pub org: String,
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub devices: usize,
    /// Loopback addresses the terminals spread over (127.0.0.1 ..= 127.0.0.N).
    pub addresses: u8,
    /// Pause between two terminals' start (0: all at once).
    pub spawn_interval: Duration,
    /// The terminals' CONNECT timeout (they back off and retry after it).
    pub connect_timeout: Duration,
    /// Longest wait for each phase (connect, push).
    pub phase_timeout: Duration,
    pub work_dir: PathBuf,
    pub keep: bool,
    pub attach: Option<Attach>,
    pub quiet: bool,
    /// Record `perf` profiles of the gateway's connect and push phases into this directory.
    pub profile: Option<PathBuf>,
    /// One gateway (embedded broker, SQLite) or several nodes on Mosquitto and PostgreSQL.
    pub topology: Topology,
}

/// Sampling rate of the optional `perf` profiles.
const PROFILE_HZ: u32 = 499;

fn start_profile(options: &PushOptions, pid: Option<u32>, phase: &str) -> Option<procfs::Profiler> {
    let dir = options.profile.as_ref()?;
    let _ = std::fs::create_dir_all(dir);
    procfs::Profiler::start(pid?, &dir.join(format!("perf-{phase}-{}.data", options.devices)), PROFILE_HZ)
}

/// The gateway in use: started here (and owned), attached, or a cluster of nodes started here.
enum Server {
    Child(GatewayChild),
    Attached(Endpoint),
    Cluster(Box<rki_tests::Cluster>),
}

impl Server {
    /// For a cluster: node 1's API, Mosquitto's port, no single pid (the nodes are read apart).
    fn endpoint(&self) -> Endpoint {
        match self {
            Server::Child(c) => c.endpoint(),
            Server::Attached(e) => e.clone(),
            Server::Cluster(c) => Endpoint {
                url: c.nodes[0].url(),
                org_token: c.nodes[0].org_token.clone(),
                key_owner_token: Some(c.nodes[0].key_owner_token.clone()),
                mqtt_host: std::net::Ipv4Addr::LOCALHOST,
                mqtt_port: c.mosquitto.port,
                pid: None,
            },
        }
    }

    /// Every node's admin URL.
    fn urls(&self) -> Vec<String> {
        match self {
            Server::Cluster(c) => c.nodes.iter().map(|n| n.url()).collect(),
            _ => vec![self.endpoint().url],
        }
    }

    fn cluster_pids(&self) -> Option<ClusterPids> {
        match self {
            Server::Cluster(c) => Some(ClusterPids::of(c)),
            _ => None,
        }
    }
}

/// The gateway's reading: its process, or the nodes summed.
fn gateway_sample(pid: Option<u32>, cluster: Option<&ClusterSample>) -> procfs::ProcSample {
    match cluster {
        Some(c) => c.gateways(),
        None => pid.and_then(procfs::sample).unwrap_or_default(),
    }
}

/// The best one-second increase of a count sampled over time: (seconds, count) in time order.
pub fn peak_per_second(samples: &[(f64, u64)]) -> f64 {
    let mut best: f64 = 0.0;
    for (i, &(t, n)) in samples.iter().enumerate() {
        if let Some(&(_, m)) = samples[i..].iter().take_while(|(u, _)| *u <= t + 1.0).last() {
            best = best.max(m.saturating_sub(n) as f64);
        }
    }
    best
}

/// Runs one scenario at one fleet size.
pub fn run(scenario: Scenario, options: &PushOptions, runtime: &tokio::runtime::Runtime) -> Result<Summary> {
    let load_start = procfs::load_average()[0];
    let own_cpu_start = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    options.topology.check()?;
    let mut server = match &options.attach {
        Some(a) => Server::Attached(a.endpoint.clone()),
        None if !options.topology.is_single_embedded() => {
            if scenario != Scenario::FleetPush {
                return Err(format!("{} runs on one gateway only", scenario.name()).into());
            }
            Server::Cluster(Box::new(topology::start_cluster(&options.topology)?))
        }
        None => Server::Child(GatewayChild::start(
            &options.work_dir,
            &format!("{}-{}", scenario.name(), options.devices),
            options.keep,
        )?),
    };
    let org = options.attach.as_ref().map(|a| a.org.clone()).unwrap_or_else(|| "acme".to_string());
    let endpoint = server.endpoint();
    let api = endpoint.api();
    let key_owner = endpoint.key_owner_token.as_ref().map(|t| Api::new(&endpoint.url, t));
    // A prefix unique to this run, so that a run against an attached gateway never meets the
    // (locked) terminals of an earlier one.
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let prefix = format!("LT{}-", run_id % 1_000_000);
    let group = format!("lt-{}", run_id % 1_000_000);
    let sns = setup::serial_numbers(&prefix, options.devices);
    let progress = Progress::new(options.devices);
    progress.set_phase("prepare");
    let printer = progress.spawn_printer(options.quiet);
    let result =
        drive(scenario, options, runtime, &mut server, &api, key_owner.as_ref(), &org, &sns, &group, &progress);
    progress.stop();
    let _ = printer.join();
    let mut summary = result?;
    summary.load_average_start = load_start;
    summary.load_average_end = procfs::load_average()[0];
    summary.loadtest_cpu_seconds =
        round3(procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0) - own_cpu_start);
    drop(server);
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn drive(
    scenario: Scenario,
    options: &PushOptions,
    runtime: &tokio::runtime::Runtime,
    server: &mut Server,
    api: &Api,
    key_owner: Option<&Api>,
    org: &str,
    sns: &[String],
    group: &str,
    progress: &Arc<Progress>,
) -> Result<Summary> {
    let n = sns.len();
    let mut summary =
        Summary { scenario: scenario.name().into(), server: "rki-gateway".into(), devices: n, ..Summary::default() };
    let prepared = setup::prepare_fleet(api, key_owner, org, sns, group)?;
    summary.extra.insert("prepare_seconds".into(), json!(round3(prepared.seconds)));
    let mut endpoint = server.endpoint();
    let pid = endpoint.pid;
    let urls = server.urls();
    let cluster = server.cluster_pids();
    summary.extra.insert("topology".into(), options.topology.to_json());
    let cluster_before = cluster.as_ref().map(ClusterPids::sample);
    let before = gateway_sample(pid, cluster_before.as_ref());
    let threads_before = pid.map(procfs::threads).unwrap_or_default();

    // Connect: every terminal initialises with its GUDID, reconnects as itself, says hello.
    progress.set_phase("connect");
    let members = prepared
        .gudids
        .iter()
        .map(|(sn, gudid)| Ok(FleetMember { profile: DeviceProfile::new(sn, Model::P3)?, gudid: Some(gudid.clone()) }))
        .collect::<Result<Vec<_>>>()?;
    // Mosquitto listens on 127.0.0.1 only.
    let addresses = if cluster.is_some() { 1 } else { options.addresses };
    let mut config = FleetConfig::new(members, endpoint.brokers(addresses)?);
    config.knobs = Knobs { connect_timeout: options.connect_timeout, ..Knobs::default() };
    config.spawn_interval = options.spawn_interval;
    let gudid_of: HashMap<&str, &str> = prepared.gudids.iter().map(|(s, g)| (s.as_str(), g.as_str())).collect();
    let profiler = start_profile(options, pid, "connect");
    let connect_started = Instant::now();
    let fleet = runtime.block_on(Fleet::spawn(config))?;
    progress.set_fleet(fleet.counters().clone());
    let Connected { trace, reprovisioned, kicked } =
        wait_connected(&fleet, &gudid_of, api, runtime, n, connect_started, options.phase_timeout)?;
    summary.extra.insert("gudids_reprovisioned".into(), json!(reprovisioned));
    summary.extra.insert("stuck_terminals_kicked".into(), json!(kicked));
    summary.connect_seconds = round3(connect_started.elapsed().as_secs_f64());
    summary.connects_per_second = round3(n as f64 / summary.connect_seconds.max(1e-9));
    summary.connects_per_second_peak = peak_per_second(&trace);
    if let Some(p) = profiler {
        p.stop();
    }
    let online = setup::wait_gateways_online(&urls, n, ONLINE_TIMEOUT);
    summary.extra.insert("gateway_saw_every_hello".into(), json!(online));
    std::thread::sleep(SETTLE);
    let cluster_idle = cluster.as_ref().map(ClusterPids::sample);
    let idle = gateway_sample(pid, cluster_idle.as_ref());
    summary.bytes_per_device = round3(idle.rss_bytes.saturating_sub(before.rss_bytes) as f64 / n as f64);
    summary.extra.insert("gateway_rss_idle_bytes".into(), json!(idle.rss_bytes));
    summary.extra.insert("gateway_rss_before_fleet_bytes".into(), json!(before.rss_bytes));
    let threads_connected = pid.map(procfs::threads).unwrap_or_default();
    summary.threads_connect = ThreadCpu::list(procfs::thread_delta(&threads_before, &threads_connected));

    // Push.
    if matches!(scenario, Scenario::ReconnectStorm) {
        set_ack_delay(runtime, &fleet, STORM_ACK_DELAY)?;
    }
    progress.set_phase("push");
    let profiler = if matches!(scenario, Scenario::FleetPush) { start_profile(options, pid, "push") } else { None };
    let base = fleet.snapshot();
    let histograms_before = read_histograms(&urls);
    // The terminals' CPU from the push's first moment: they ack while the task is still created.
    let own_before = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    let push_started = Instant::now();
    // Latencies count from the creation request, on the system clock the gateway also stamps its
    // records with (same machine); the task's own `created_at` comes after derivation.
    let requested_at_ms = unix_ms();
    let (task, created_at) = setup::create_task(api, group)?;
    summary.extra.insert("task_created_at_after_request_ms".into(), json!(created_at - requested_at_ms));
    summary.task_create_seconds = round3(push_started.elapsed().as_secs_f64());
    let mut waited_from = push_started;
    match scenario {
        Scenario::FleetPush => {}
        Scenario::ReconnectStorm => {
            let Server::Child(child) = server else {
                return Err("reconnect-storm restarts the gateway: it cannot attach".into());
            };
            let installed_at_kill = fleet.snapshot().keys_installed;
            child.kill()?;
            set_ack_delay(runtime, &fleet, Duration::ZERO)?;
            progress.set_phase("restart");
            let restarted = Instant::now();
            let healthy = child.spawn()?;
            endpoint = child.endpoint();
            waited_from = restarted;
            let counts = setup::task_counts(api, task)?;
            summary.extra.insert("keys_installed_at_kill".into(), json!(installed_at_kill));
            summary.extra.insert("open_executions_at_restart".into(), json!(counts.total - counts.ended()));
            summary.extra.insert("restart_to_healthy_seconds".into(), json!(round3(healthy.as_secs_f64())));
            progress.set_phase("storm");
            let storm =
                watch_storm(runtime, &fleet, api, &endpoint.url, task, n, restarted, options.phase_timeout, progress)?;
            for (k, v) in storm {
                summary.extra.insert(k, v);
            }
        }
        Scenario::Churn { fraction, flapping, window } => {
            let events = start_churn(runtime, &fleet, fraction, flapping, window);
            summary.extra.insert("churn_events".into(), json!(events));
        }
    }
    let mut timeline = Vec::new();
    let base = if matches!(scenario, Scenario::ReconnectStorm) { fleet.snapshot() } else { base };
    let counts = wait_push(api, &fleet, task, n, waited_from, options.phase_timeout, progress, base, &mut timeline)?;
    summary.push_seconds = round3(waited_from.elapsed().as_secs_f64());
    let own_after = procfs::sample(std::process::id()).map(|s| s.cpu_seconds).unwrap_or(0.0);
    summary.extra.insert("loadtest_cpu_seconds_push".into(), json!(round3(own_after - own_before)));
    if !matches!(scenario, Scenario::ReconnectStorm) {
        summary.extra.insert("stages_seconds".into(), stage_times(&timeline, n));
        // A restart starts the histogram afresh, so the storm has no "before" to subtract.
        for ((key, _, scale), (after, before)) in
            PUSH_HISTOGRAMS.iter().zip(read_histograms(&urls).iter().zip(&histograms_before))
        {
            summary.extra.insert((*key).into(), after.since(before).summary(*scale));
        }
    }
    if let Some(p) = profiler {
        p.stop();
    }
    if matches!(scenario, Scenario::Churn { .. }) {
        runtime.block_on(async {
            for d in fleet.devices() {
                let _ = d.update_knobs(|k| k.flapping = None).await;
                let _ = d.power_on().await;
            }
        });
    }
    let pid = endpoint.pid;
    let cluster_after = cluster.as_ref().map(ClusterPids::sample);
    let after = gateway_sample(pid, cluster_after.as_ref());
    if let (Some(b), Some(a)) = (&cluster_idle, &cluster_after) {
        let push = Duration::from_secs_f64(summary.push_seconds);
        summary.extra.insert("cluster".into(), topology::report(b, a, &urls, push));
    }
    let threads_after = pid.map(procfs::threads).unwrap_or_default();
    // After a restart the new process's whole life is the push.
    let (cpu_base, threads_base) = if matches!(scenario, Scenario::ReconnectStorm) {
        (0.0, Default::default())
    } else {
        (idle.cpu_seconds, threads_connected)
    };
    summary.gateway_cpu_seconds_push = round3(after.cpu_seconds - cpu_base);
    summary.gateway_cpu_seconds = round3(after.cpu_seconds);
    summary.gateway_rss_peak_bytes = after.rss_peak_bytes;
    summary.threads_push = ThreadCpu::list(procfs::thread_delta(&threads_base, &threads_after));
    summary.keys_per_second = round3(counts.succeeded as f64 / summary.push_seconds.max(1e-9));
    summary.extra.insert("failed".into(), json!(counts.failed));

    // What is durable, checked here.
    progress.set_phase("verify");
    let records = setup::task_records(api, task)?;
    let verdict = verify(&records, &fleet, sns, requested_at_ms)?;
    summary.latency_ms = Latency::of(&verdict.latencies_ms);
    summary.curve = curve(&verdict.latencies_ms);
    summary.acks_verified = verdict.verified;
    summary.lost = verdict.lost;
    summary.duplicates = verdict.duplicates;
    let snapshot = fleet.snapshot();
    summary.errors = snapshot.errors;
    summary.extra.insert("connects_refused".into(), json!(snapshot.connects_refused));
    summary.extra.insert("connects_timed_out".into(), json!(snapshot.connects_timed_out));
    let rejected =
        urls.iter().map(|u| rejected_total(u)).sum::<u64>() + snapshot.rejected_frames + snapshot.refusals_received;
    summary.extra.insert("rejected".into(), json!(rejected));
    runtime.block_on(fleet.shutdown());
    Ok(summary)
}

fn set_ack_delay(runtime: &tokio::runtime::Runtime, fleet: &Fleet, delay: Duration) -> Result<()> {
    runtime.block_on(async {
        for d in fleet.devices() {
            d.set_ack_delay(delay).await?;
        }
        Ok::<(), rki_device_sim::DeviceError>(())
    })?;
    Ok(())
}

/// How the connect phase went.
struct Connected {
    /// (seconds since the start, terminals connected), every 100 ms.
    trace: Vec<(f64, u64)>,
    /// GUDIDs provisioned anew after `gudid_used` refusals.
    reprovisioned: usize,
    /// Stuck terminals restarted: "SN: last error".
    kicked: Vec<String>,
}

/// How long the connect phase may make no progress before spent GUDIDs are replaced.
const STALL: Duration = Duration::from_secs(15);

/// Waits until `n` terminals are connected. A terminal whose CreateKey timed out and whose GUDID
/// the gateway nevertheless spent is refused (`gudid_used`) when it retries, and never retries
/// again: as an operator would, the tool provisions it a new GUDID and initialises it with that.
/// A terminal stuck otherwise (initialised, powered, not connected, nothing moving) has its
/// network cut for a moment, as a technician would power-cycle it; each is named in the summary
/// with its last error, because it points at a bug to fix.
/// Returns the (seconds, connected) trace, how many GUDIDs were re-provisioned, and the kicks.
fn wait_connected(
    fleet: &Fleet,
    gudids: &HashMap<&str, &str>,
    api: &Api,
    runtime: &tokio::runtime::Runtime,
    n: usize,
    started: Instant,
    timeout: Duration,
) -> Result<Connected> {
    let mut trace = Vec::new();
    let mut reprovisioned = 0;
    let mut kicked = Vec::new();
    let (mut last_count, mut last_change) = (0, Instant::now());
    loop {
        let snapshot = fleet.snapshot();
        trace.push((started.elapsed().as_secs_f64(), snapshot.connected));
        if snapshot.connected as usize >= n {
            return Ok(Connected { trace, reprovisioned, kicked });
        }
        if snapshot.connected != last_count {
            (last_count, last_change) = (snapshot.connected, Instant::now());
        } else if last_change.elapsed() > STALL {
            let fixed = reprovision_spent(fleet, api, runtime)?;
            reprovisioned += fixed;
            if fixed == 0 {
                kicked.extend(kick_stuck(fleet, gudids, runtime));
            }
            last_change = Instant::now();
        }
        if started.elapsed() > timeout {
            let first_errors: Vec<String> = fleet
                .devices()
                .iter()
                .filter(|d| !d.status().connected)
                .filter_map(|d| d.status().last_error.map(|e| format!("{}: {e}", d.sn())))
                .take(5)
                .collect();
            return Err(format!(
                "only {} of {n} terminals connected after {timeout:?} ({}); first errors: {first_errors:?}",
                snapshot.connected,
                snapshot.status_line()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restarts every stuck terminal: an initialised one that is not connected has its network cut
/// for a moment; one not initialised (and not refused) is asked to initialise again with its
/// GUDID. Returns "SN: last error" of each.
fn kick_stuck(fleet: &Fleet, gudids: &HashMap<&str, &str>, runtime: &tokio::runtime::Runtime) -> Vec<String> {
    let mut out = Vec::new();
    for device in fleet.devices() {
        let status = device.status();
        if status.connected || status.last_error.as_deref().is_some_and(gudid_spent) {
            continue;
        }
        out.push(format!("{}: {}", device.sn(), status.last_error.unwrap_or_default()));
        let device = device.clone();
        if status.initialised {
            runtime.spawn(async move {
                let _ = device.go_offline(Duration::from_millis(100)).await;
            });
        } else if let Some(gudid) = gudids.get(device.sn()).map(|g| g.to_string()) {
            runtime.spawn(async move {
                let _ = device.initialise(&gudid).await;
            });
        }
    }
    out
}

/// Whether a terminal's last error says its GUDID is spent: its CreateKey was refused as
/// `gudid_used`, or (the gateway's own endpoint checks the GUDID at CONNECT) its bootstrap
/// CONNECT was refused for its credentials, which for a terminal holding the GUDID it was given
/// means the GUDID is no longer live.
fn gudid_spent(error: &str) -> bool {
    error.contains("gudid_used")
        || (error.contains("initialisation failed")
            && (error.contains("BadUserNamePassword") || error.contains("NotAuthorized")))
}

/// New GUDIDs for the terminals whose GUDID is spent ([`gudid_spent`]).
fn reprovision_spent(fleet: &Fleet, api: &Api, runtime: &tokio::runtime::Runtime) -> Result<usize> {
    let stuck: Vec<_> = fleet
        .devices()
        .iter()
        .filter(|d| {
            let status = d.status();
            !status.initialised && status.last_error.is_some_and(|e| gudid_spent(&e))
        })
        .cloned()
        .collect();
    if stuck.is_empty() {
        return Ok(0);
    }
    let sns: Vec<&str> = stuck.iter().map(|d| d.sn()).collect();
    let mut fresh: HashMap<String, String> = HashMap::with_capacity(sns.len());
    // The API provisions at most 1,000 GUDIDs per call.
    for chunk in sns.chunks(1000) {
        let answer = api.ok_post("/v1/gudids", &json!({ "sns": chunk }))?;
        for g in answer["gudids"].as_array().into_iter().flatten() {
            if let (Some(sn), Some(gudid)) = (g["sn"].as_str(), g["gudid"].as_str()) {
                fresh.insert(sn.to_string(), gudid.to_string());
            }
        }
    }
    for device in &stuck {
        if let Some(gudid) = fresh.get(device.sn()).cloned() {
            let device = device.clone();
            runtime.spawn(async move {
                let _ = device.initialise(&gudid).await;
            });
        }
    }
    Ok(stuck.len())
}

/// Where the push stood at one poll: seconds since it started, downloads installed on terminals,
/// acks the terminals sent, acks durable in the gateway's store.
#[derive(Debug, Clone, Copy)]
struct Stage {
    at: f64,
    installed: u64,
    acks_sent: u64,
    durable: i64,
}

/// The first time each stage reached half and all of `n`, from the polls.
fn stage_times(timeline: &[Stage], n: usize) -> serde_json::Value {
    let first = |pick: &dyn Fn(&Stage) -> f64, share: f64| {
        timeline.iter().find(|s| pick(s) >= share * n as f64).map(|s| round3(s.at))
    };
    let installed = |s: &Stage| s.installed as f64;
    let sent = |s: &Stage| s.acks_sent as f64;
    let durable = |s: &Stage| s.durable as f64;
    json!({
        "installed_on_terminals": {"half": first(&installed, 0.5), "all": first(&installed, 1.0)},
        "acks_sent_by_terminals": {"half": first(&sent, 0.5), "all": first(&sent, 1.0)},
        "acks_durable": {"half": first(&durable, 0.5), "all": first(&durable, 1.0)},
    })
}

/// Polls the task until every execution has ended; records where each stage stood at each poll.
#[allow(clippy::too_many_arguments)]
fn wait_push(
    api: &Api,
    fleet: &Fleet,
    task: i64,
    n: usize,
    started: Instant,
    timeout: Duration,
    progress: &Progress,
    base: rki_device_sim::FleetSnapshot,
    timeline: &mut Vec<Stage>,
) -> Result<Counts> {
    loop {
        let counts = setup::task_counts(api, task)?;
        let snapshot = fleet.snapshot();
        timeline.push(Stage {
            at: started.elapsed().as_secs_f64(),
            installed: snapshot.keys_installed - base.keys_installed,
            acks_sent: snapshot.acks_sent - base.acks_sent,
            durable: counts.succeeded,
        });
        progress.acked.store(counts.succeeded.max(0) as u64, Ordering::Relaxed);
        if counts.total > 0 && counts.ended() >= counts.total {
            if counts.total as usize != n {
                return Err(format!("the task has {} executions for {n} devices", counts.total).into());
            }
            return Ok(counts);
        }
        if started.elapsed() > timeout {
            // The terminals that installed nothing, as they see it: what a stuck key's cause is.
            let waiting: Vec<String> = fleet
                .devices()
                .iter()
                .filter_map(|d| {
                    let status = d.status();
                    (status.injections == 0).then(|| format!("{}: {status:?}", d.sn()))
                })
                .take(5)
                .collect();
            return Err(
                format!("push not done after {timeout:?}: {counts:?}; terminals without a key: {waiting:?}").into()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// After the restart: when every terminal is back, when the new process had published a download
/// for every execution still open, when every one had ended.
#[allow(clippy::too_many_arguments)]
fn watch_storm(
    runtime: &tokio::runtime::Runtime,
    fleet: &Fleet,
    api: &Api,
    url: &str,
    task: i64,
    n: usize,
    restarted: Instant,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<(String, serde_json::Value)>> {
    let open_at_start = {
        let c = setup::task_counts(api, task)?;
        (c.total - c.ended()).max(0) as f64
    };
    let (mut reconnected, mut delivered) = (None, None);
    let mut out = Vec::new();
    loop {
        let t = restarted.elapsed().as_secs_f64();
        if reconnected.is_none() && fleet.snapshot().connected as usize >= n {
            reconnected = Some(t);
        }
        if delivered.is_none() && setup::metric(url, "rki_deliveries_total") >= open_at_start {
            delivered = Some(t);
        }
        let counts = setup::task_counts(api, task)?;
        progress.acked.store(counts.succeeded.max(0) as u64, Ordering::Relaxed);
        if counts.ended() >= counts.total {
            out.push(("restart_to_all_acked_seconds".into(), json!(round3(t))));
            break;
        }
        if restarted.elapsed() > timeout {
            return Err(format!("storm not over after {timeout:?}: {counts:?}").into());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // Every terminal acked, but a terminal that gave up on a congested broker may still be
    // reconnecting: the fleet is all online at once only later. Its count is in-process, so
    // waiting for it costs the gateway nothing.
    if reconnected.is_none() && runtime.block_on(fleet.wait_connected(n as u64, RECONNECT_GRACE)).is_ok() {
        reconnected = Some(restarted.elapsed().as_secs_f64());
    }
    out.push(("restart_to_all_reconnected_seconds".into(), json!(reconnected.map(round3))));
    out.push(("restart_to_all_open_delivered_seconds".into(), json!(delivered.map(round3))));
    Ok(out)
}

/// Schedules the churn: a deterministic choice of terminals, each power-cycled or cut from the
/// network once at a point of the window, for 1 to 3 s; and a share flapping throughout.
/// Returns how many events were scheduled.
fn start_churn(
    runtime: &tokio::runtime::Runtime,
    fleet: &Fleet,
    fraction: f64,
    flapping: f64,
    window: Duration,
) -> usize {
    let n = fleet.len();
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let events = (n as f64 * fraction) as usize;
    let flappers = (n as f64 * flapping) as usize;
    let stride = (n / events.max(1)).max(1);
    for (k, device) in fleet.devices().iter().step_by(stride).take(events).enumerate() {
        let at = Duration::from_millis(next() % window.as_millis().max(1) as u64);
        let off = Duration::from_millis(1000 + next() % 2000);
        let device = device.clone();
        runtime.spawn(async move {
            tokio::time::sleep(at).await;
            if k % 2 == 0 {
                let _ = device.power_off().await;
                let _ = device.power_on_after(off).await;
            } else {
                let _ = device.go_offline(off).await;
            }
        });
    }
    // Flapping starts with the next session: cut each flapper's network briefly.
    for device in fleet.devices().iter().skip(stride / 2).step_by(stride).take(flappers) {
        let device = device.clone();
        runtime.spawn(async move {
            let flap = rki_device_sim::Flapping { online: Duration::from_secs(2), offline: Duration::from_secs(1) };
            let _ = device.update_knobs(move |k| k.flapping = Some(flap)).await;
            let _ = device.go_offline(Duration::from_millis(100)).await;
        });
    }
    events + flappers
}

/// What the records and the terminals say about the push.
struct Verdict {
    latencies_ms: Vec<f64>,
    verified: usize,
    lost: usize,
    duplicates: usize,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Checks the records: one per device, succeeded, with the KCV recomputed here. Latencies count
/// from `since_ms` (Unix milliseconds).
fn verify(records: &[setup::Record], fleet: &Fleet, sns: &[String], since_ms: i64) -> Result<Verdict> {
    let mut per_sn: HashMap<&str, usize> = HashMap::new();
    let mut latencies_ms = Vec::with_capacity(records.len());
    let mut verified = 0;
    for r in records {
        *per_sn.entry(r.sn.as_str()).or_default() += 1;
        latencies_ms.push((r.at_ms - since_ms) as f64);
        if r.result == "succeeded" && rki_tests::expected_kcv(&r.key_id)? == r.kcv {
            verified += 1;
        }
    }
    let lost = sns.iter().filter(|sn| !per_sn.contains_key(sn.as_str())).count();
    let twice_recorded: usize = per_sn.values().map(|c| c.saturating_sub(1)).sum();
    let twice_injected: usize =
        fleet.devices().iter().map(|d| (d.status().injections as usize).saturating_sub(1)).sum();
    Ok(Verdict { latencies_ms, verified, lost, duplicates: twice_recorded + twice_injected })
}

/// Cumulative acks over time from per-device latencies.
pub fn curve(latencies_ms: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = latencies_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut points = vec![(0.0, 0.0)];
    let step = (sorted.len() / 400).max(1);
    for (i, ms) in sorted.iter().enumerate() {
        if i % step == 0 || i + 1 == sorted.len() {
            points.push((ms / 1000.0, (i + 1) as f64));
        }
    }
    points
}

/// One unlabelled histogram of the gateways (`rki_inbound_wait_seconds`: broker hand-over → the
/// device's shard takes the message up; `rki_store_commit_seconds`, `rki_store_batch_writes`),
/// summed over the nodes: cumulative counts by upper bound, and the sum.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
}

/// The push-window histograms the summary reports.
const PUSH_HISTOGRAMS: [(&str, &str, f64); 3] = [
    ("inbound_wait_ms", "rki_inbound_wait_seconds", 1000.0),
    ("store_commit_ms", "rki_store_commit_seconds", 1000.0),
    ("store_batch_writes", "rki_store_batch_writes", 1.0),
];

/// Every histogram of [`PUSH_HISTOGRAMS`], read once from each node.
fn read_histograms(urls: &[String]) -> Vec<Histogram> {
    let texts: Vec<String> = urls.iter().map(|url| Api::new(url, "").get_text("/metrics").1).collect();
    PUSH_HISTOGRAMS
        .iter()
        .map(|(_, name, _)| {
            let mut total = Histogram::default();
            for text in &texts {
                total.add(&Histogram::parse(text, name));
            }
            total
        })
        .collect()
}

impl Histogram {
    fn parse(text: &str, metric: &str) -> Self {
        let mut out = Histogram::default();
        let bucket = format!("{metric}_bucket{{le=\"");
        let sum = format!("{metric}_sum");
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if let Some(le) = name.strip_prefix(&bucket) {
                let le = le.trim_end_matches("\"}");
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
                out.buckets.push((bound, value));
            } else if name == sum {
                out.sum = value;
            }
        }
        out
    }

    fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else {
            for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
                mine.1 += theirs.1;
            }
        }
        self.sum += other.sum;
    }

    /// What was recorded between `before` and now.
    fn since(&self, before: &Histogram) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| (le, n - before.buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
            .collect();
        Histogram { buckets, sum: self.sum - before.sum }
    }

    fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The quantile as Prometheus's `histogram_quantile` estimates it: linear within the bucket.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let share = if n > lower.1 { (rank - lower.1) / (n - lower.1) } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, n);
        }
        None
    }

    /// Count, mean, p50 and p99, the values multiplied by `scale` (1000: seconds to ms).
    fn summary(&self, scale: f64) -> serde_json::Value {
        let scaled = |s: Option<f64>| s.map(|s| round3(s * scale));
        let count = self.count();
        json!({
            "count": count as u64,
            "mean": scaled((count > 0.0).then(|| self.sum / count)),
            "p50": scaled(self.quantile(0.5)),
            "p99": scaled(self.quantile(0.99)),
        })
    }
}

/// Sum of every `rki_rejected_messages_total` sample of the gateway.
fn rejected_total(url: &str) -> u64 {
    let (_, text) = Api::new(url, "").get_text("/metrics");
    text.lines()
        .filter(|l| l.starts_with("rki_rejected_messages_total"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    const WAIT: &str = "rki_inbound_wait_seconds";

    const BEFORE: &str = "# TYPE rki_inbound_wait_seconds histogram\n\
        rki_inbound_wait_seconds_bucket{le=\"0.001\"} 10\n\
        rki_inbound_wait_seconds_bucket{le=\"0.01\"} 10\n\
        rki_inbound_wait_seconds_bucket{le=\"0.1\"} 10\n\
        rki_inbound_wait_seconds_bucket{le=\"+Inf\"} 10\n\
        rki_inbound_wait_seconds_sum 0.005\n\
        rki_inbound_wait_seconds_count 10\n";
    const AFTER: &str = "rki_inbound_wait_seconds_bucket{le=\"0.001\"} 10\n\
        rki_inbound_wait_seconds_bucket{le=\"0.01\"} 60\n\
        rki_inbound_wait_seconds_bucket{le=\"0.1\"} 110\n\
        rki_inbound_wait_seconds_bucket{le=\"+Inf\"} 110\n\
        rki_inbound_wait_seconds_sum 3.005\n\
        rki_other_bucket{le=\"1\"} 7\n";

    #[test]
    fn the_push_window_is_the_difference_and_quantiles_interpolate_within_buckets() {
        let push = Histogram::parse(AFTER, WAIT).since(&Histogram::parse(BEFORE, WAIT));
        assert_eq!(push.count(), 100.0);
        // 50 of 100 fell in (1 ms, 10 ms]: the median is that bucket's upper bound.
        assert!((push.quantile(0.5).expect("a median") - 0.01).abs() < 1e-12);
        // The 99th is 49/50 of the way through (10 ms, 100 ms].
        let p99 = push.quantile(0.99).expect("a 99th percentile");
        assert!((p99 - (0.01 + 0.09 * 49.0 / 50.0)).abs() < 1e-12, "{p99}");
        let s = push.summary(1000.0);
        assert_eq!(s["count"], 100);
        assert_eq!(s["mean"], 30.0);
        // Another metric's lines are not this one's.
        assert_eq!(Histogram::parse(AFTER, "rki_other").count(), 7.0);
    }

    #[test]
    fn nodes_add_up_and_an_empty_window_has_no_quantile() {
        let mut two = Histogram::parse(AFTER, WAIT);
        two.add(&Histogram::parse(AFTER, WAIT));
        assert_eq!(two.count(), 220.0);
        let none = Histogram::parse(BEFORE, WAIT).since(&Histogram::parse(BEFORE, WAIT));
        assert_eq!(none.quantile(0.5), None);
        assert!(none.summary(1000.0)["p50"].is_null());
    }
}
