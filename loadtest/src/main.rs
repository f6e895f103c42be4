//! `rki-loadtest`: the scenarios as subcommands. A thin layer over the library: parse, run, print
//! the human report on stderr and, with `--json`, one summary object on stdout.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rki_loadtest::baseline::{self, BaselineBroker, BaselineOptions};
use rki_loadtest::engine_scale::{self, EngineOptions, Family};
use rki_loadtest::gateway::Endpoint;
use rki_loadtest::plot::{self, Chart, Series};
use rki_loadtest::push::{self, Attach, PushOptions, Scenario};
use rki_loadtest::summary::{round3, Summary};
use rki_loadtest::topology::{BrokerKind, StoreKind, Topology};
use rki_loadtest::Result;
use serde_json::json;

/// The gateway's allocator: the `engine` scenario runs the gateway's engine and store in this
/// process, and its peak memory should be the gateway's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes in a MiB, for the memory axis.
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser)]
#[command(name = "rki-loadtest", version, about = "Fleet-scale pushes against the RKI gateway, measured")]
struct Cli {
    /// Print one JSON summary object on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Draw the delivery curve (or, with --sweep, the scaling curve) into this PNG file.
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect N terminals, initialise them, create one task for all, wait for every verified ack.
    FleetPush(FleetPushArgs),
    /// With a push pending, SIGKILL the gateway, start it again, measure until every execution ends.
    ReconnectStorm(FleetArgs),
    /// Terminals power-cycle and flap while a push runs; nothing may be lost or injected twice.
    Churn(ChurnArgs),
    /// The same terminals and message sizes against Mosquitto, with a backend doing no crypto, no store.
    BrokerBaseline(FleetArgs),
    /// No sockets: one task for a group of N (1,000,000) devices: derive, wrap, persist.
    Engine(EngineArgs),
    /// Draw the scaling curve from saved `--json` outputs of fleet-push (one size or a sweep each).
    Plot {
        /// JSON files written by `fleet-push --json` (with or without --with-baseline, --sweep).
        files: Vec<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct FleetArgs {
    /// Fleet size.
    #[arg(long, default_value_t = 1000, value_parser = fleet_size)]
    devices: usize,
    /// Run at each size (comma-separated) and plot time and memory against fleet size.
    #[arg(long, value_delimiter = ',', value_parser = fleet_size)]
    sweep: Vec<usize>,
    /// Terminals spread over 127.0.0.1 ..= 127.0.0.N (ephemeral ports are per destination).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..))]
    addresses: u8,
    /// Pause between two terminals' start, in microseconds (0: all at once).
    #[arg(long, default_value_t = 0)]
    spawn_interval_us: u64,
    /// A terminal's CONNECT timeout, in seconds; it backs off and retries after it.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// Longest wait for one phase (connect, push), in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// Where gateway and broker directories go.
    #[arg(long, default_value = "/tmp/rki-loadtest")]
    work_dir: PathBuf,
    /// Keep the gateway's directory (logs, store) after the run.
    #[arg(long)]
    keep: bool,
    /// Record `perf` profiles (cpu-clock, call chains) of the gateway's connect and push phases
    /// into this directory (fleet-push).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// The broker(s) broker-baseline runs on, comma-separated, each at every size: Mosquitto, or
    /// rumqttd alone with the old embedded broker's settings (`rki-plain-broker`). With
    /// `fleet-push --with-baseline --baseline-broker mosquitto,rumqttd` both run in the same run
    /// as the gateway; the first is `baseline` in the JSON, every one is in `baselines`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mosquitto")]
    baseline_broker: Vec<BaselineBroker>,
}

#[derive(Args)]
struct FleetPushArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Also run broker-baseline at the same size, in the same run, and report the ratio.
    #[arg(long)]
    with_baseline: bool,
    /// Attach to a running gateway's admin API (e.g. http://127.0.0.1:8080) instead of starting one.
    #[arg(long, requires_all = ["token", "mqtt", "key_owner_token"])]
    url: Option<String>,
    /// The organization admin token (attach).
    #[arg(long, env = "RKI_TOKEN")]
    token: Option<String>,
    /// The organization's name (attach).
    #[arg(long, default_value = "acme")]
    org: String,
    /// The key owner's token (attach): it uploads the fleet's SNs to the organization, and
    /// authorizes the test BDK if the organization lacks it.
    #[arg(long)]
    key_owner_token: Option<String>,
    /// The gateway's MQTT address (attach); with --addresses > 1 it must listen on 0.0.0.0.
    #[arg(long)]
    mqtt: Option<SocketAddrV4>,
    /// The gateway's process id (attach), for /proc readings.
    #[arg(long)]
    pid: Option<u32>,
    /// Gateway nodes to start (more than one needs --broker mosquitto --store postgres).
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    /// The broker the terminals connect to: the gateway's embedded one, or a Mosquitto started
    /// here whose clients the gateway nodes are (shared subscription).
    #[arg(long, value_enum, default_value = "embedded")]
    broker: BrokerArg,
    /// The gateways' store: SQLite in the data directory, or a PostgreSQL started here.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreArg,
    /// With `--broker mosquitto`: how Mosquitto authenticates the terminals: from the password
    /// and ACL files node 1 rewrites, through its dynamic security plugin (every node), or from
    /// PostgreSQL at each CONNECT through the store plugin (`librki_mosquitto_auth.so`).
    #[arg(long, value_enum, default_value = "files")]
    broker_auth: BrokerAuthArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum BrokerAuthArg {
    Files,
    Dynsec,
    Store,
}

#[derive(Clone, Copy, ValueEnum)]
enum BrokerArg {
    Embedded,
    Mosquitto,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreArg {
    Sqlite,
    Postgres,
}

impl FleetPushArgs {
    fn topology(&self) -> Topology {
        Topology {
            gateways: self.gateways,
            broker: match self.broker {
                BrokerArg::Embedded => BrokerKind::Embedded,
                BrokerArg::Mosquitto => BrokerKind::Mosquitto,
            },
            store: match self.store {
                StoreArg::Sqlite => StoreKind::Sqlite,
                StoreArg::Postgres => StoreKind::Postgres,
            },
            broker_auth: match self.broker_auth {
                BrokerAuthArg::Files => rki_tests::BrokerAuth::Files,
                BrokerAuthArg::Dynsec => rki_tests::BrokerAuth::Dynsec,
                BrokerAuthArg::Store => rki_tests::BrokerAuth::Store,
            },
        }
    }
}

#[derive(Args)]
struct ChurnArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Share of terminals power-cycled or cut from the network once during the push.
    #[arg(long, default_value_t = 0.2, value_parser = share)]
    churn_fraction: f64,
    /// Share of terminals flapping (2 s online, 1 s offline) for the whole push.
    #[arg(long, default_value_t = 0.05, value_parser = share)]
    flapping_fraction: f64,
    /// The churn events fall within this many seconds after task creation.
    #[arg(long, default_value_t = 5)]
    churn_window_s: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    Tdes,
    Aes,
}

#[derive(Args)]
struct EngineArgs {
    #[arg(long, default_value_t = 1_000_000, value_parser = fleet_size)]
    devices: usize,
    /// The BDK family: TDES (TR-31 B) or AES-128 (TR-31 D).
    #[arg(long, value_enum, default_value = "tdes")]
    family: FamilyArg,
    /// Built fleets are kept here between runs.
    #[arg(long, default_value = "target/loadtest-cache")]
    cache_dir: PathBuf,
    /// A fleet is built here first (tmpfs: one transaction per GUDID costs no fsync there).
    #[arg(long, default_value = "/dev/shm")]
    build_dir: PathBuf,
    /// The measured store lives here (on disk).
    #[arg(long, default_value = "/tmp/rki-loadtest")]
    work_dir: PathBuf,
    /// Build the fleet again even if it is cached.
    #[arg(long)]
    rebuild: bool,
}

/// A fleet size: a whole number of devices, at least one.
fn fleet_size(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("a fleet has at least 1 device".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of devices: {e}")),
    }
}

/// A share of the fleet, from 0 to 1.
fn share(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Ok(x) => Err(format!("{x} is not a share of the fleet (0 to 1)")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rki-loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn run(cli: &Cli) -> Result<()> {
    let _ = rki_device_sim::raise_fd_limit();
    let rt = runtime()?;
    match &cli.command {
        Command::FleetPush(args) => {
            let attach = attach_of(args)?;
            let topology = args.topology();
            topology.check()?;
            if attach.is_some() && !topology.is_single_embedded() {
                return Err("--url attaches to a running gateway: --gateways, --broker, --store do not apply".into());
            }
            fleet_sizes(&args.fleet, cli, |devices| {
                let mut options = push_options(&args.fleet, devices, attach.clone(), cli.quiet);
                options.topology = topology;
                let mut gateway = push::run(Scenario::FleetPush, &options, &rt)?;
                eprintln!("{}", gateway.report());
                if args.with_baseline {
                    let mut run = Vec::new();
                    for broker in &args.fleet.baseline_broker {
                        let base = baseline::run(&baseline_options(&args.fleet, devices, *broker, cli.quiet), &rt)?;
                        eprintln!("{}", base.report());
                        compare(&mut gateway, &base, run.is_empty());
                        run.push(base);
                    }
                    if let Some(mosquitto) = run.iter().find(|b| b.server == BaselineBroker::Mosquitto.name()) {
                        let targets = issue21_targets(&gateway, mosquitto);
                        eprintln!("  issue 21 targets: {targets}");
                        gateway.extra.insert("targets".into(), targets);
                    }
                    run.insert(0, gateway);
                    return Ok(run);
                }
                Ok(vec![gateway])
            })
        }
        Command::ReconnectStorm(fleet) => fleet_sizes(fleet, cli, |devices| {
            let options = push_options(fleet, devices, None, cli.quiet);
            let summary = push::run(Scenario::ReconnectStorm, &options, &rt)?;
            eprintln!("{}", summary.report());
            Ok(vec![summary])
        }),
        Command::Churn(args) => fleet_sizes(&args.fleet, cli, |devices| {
            let options = push_options(&args.fleet, devices, None, cli.quiet);
            let scenario = Scenario::Churn {
                fraction: args.churn_fraction,
                flapping: args.flapping_fraction,
                window: Duration::from_secs(args.churn_window_s),
            };
            let summary = push::run(scenario, &options, &rt)?;
            eprintln!("{}", summary.report());
            Ok(vec![summary])
        }),
        Command::BrokerBaseline(fleet) => fleet_sizes(fleet, cli, |devices| {
            let mut run = Vec::new();
            for broker in &fleet.baseline_broker {
                let summary = baseline::run(&baseline_options(fleet, devices, *broker, cli.quiet), &rt)?;
                eprintln!("{}", summary.report());
                run.push(summary);
            }
            Ok(run)
        }),
        Command::Plot { files } => {
            let path = cli.plot.as_ref().ok_or("plot needs --plot FILE.png")?;
            let mut runs = Vec::new();
            for file in files {
                let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
                let entries = match value.get("sweep").and_then(|s| s.as_array()) {
                    Some(sweep) => sweep.clone(),
                    None => vec![value],
                };
                for entry in entries {
                    let mut run: Vec<Summary> = vec![serde_json::from_value(entry.clone())?];
                    let bases = match (entry.get("baselines").and_then(|b| b.as_array()), entry.get("baseline")) {
                        (Some(all), _) => all.clone(),
                        (None, Some(one)) => vec![one.clone()],
                        (None, None) => Vec::new(),
                    };
                    for base in bases {
                        run.push(serde_json::from_value(base)?);
                    }
                    runs.push(run);
                }
            }
            runs.sort_by_key(|r| r[0].devices);
            draw(path, &runs, true)?;
            eprintln!("plot written to {}", path.display());
            Ok(())
        }
        Command::Engine(args) => {
            let options = EngineOptions {
                devices: args.devices,
                family: match args.family {
                    FamilyArg::Tdes => Family::Tdes,
                    FamilyArg::Aes => Family::Aes,
                },
                cache_dir: args.cache_dir.clone(),
                build_dir: args.build_dir.clone(),
                work_dir: args.work_dir.clone(),
                rebuild: args.rebuild,
            };
            let summary = engine_scale::run(&options, &rt)?;
            eprintln!("{}", summary.report());
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
            Ok(())
        }
    }
}

fn attach_of(args: &FleetPushArgs) -> Result<Option<Attach>> {
    let Some(url) = &args.url else { return Ok(None) };
    let (Some(token), Some(mqtt)) = (&args.token, args.mqtt) else {
        return Err("--url needs --token, --key-owner-token and --mqtt".into());
    };
    Ok(Some(Attach {
        endpoint: Endpoint {
            url: url.trim_end_matches('/').to_string(),
            org_token: token.clone(),
            key_owner_token: args.key_owner_token.clone(),
            mqtt_host: if mqtt.ip().is_unspecified() { Ipv4Addr::LOCALHOST } else { *mqtt.ip() },
            mqtt_port: mqtt.port(),
            pid: args.pid,
        },
        org: args.org.clone(),
    }))
}

fn push_options(fleet: &FleetArgs, devices: usize, attach: Option<Attach>, quiet: bool) -> PushOptions {
    PushOptions {
        devices,
        addresses: fleet.addresses,
        spawn_interval: Duration::from_micros(fleet.spawn_interval_us),
        connect_timeout: Duration::from_secs(fleet.connect_timeout_s.max(1)),
        phase_timeout: Duration::from_secs(fleet.timeout_s),
        work_dir: fleet.work_dir.clone(),
        keep: fleet.keep,
        attach,
        quiet,
        profile: fleet.profile.clone(),
        topology: Topology::default(),
    }
}

fn baseline_options(fleet: &FleetArgs, devices: usize, broker: BaselineBroker, quiet: bool) -> BaselineOptions {
    BaselineOptions {
        devices,
        addresses: fleet.addresses,
        spawn_interval: Duration::from_micros(fleet.spawn_interval_us),
        connect_timeout: Duration::from_secs(fleet.connect_timeout_s.max(1)),
        phase_timeout: Duration::from_secs(fleet.timeout_s),
        work_dir: fleet.work_dir.clone(),
        keep: fleet.keep,
        quiet,
        broker,
    }
}

/// The gateway's figures against one baseline of the same run, into the gateway's `extra`:
/// throughput, connect time and memory per idle terminal, each as gateway / baseline. The first
/// baseline's throughput ratio is also `throughput_ratio_vs_baseline`, as before.
fn compare(gateway: &mut Summary, base: &Summary, first: bool) {
    let ratio = |a: f64, b: f64| round3(a / b.max(1e-9));
    let throughput = ratio(gateway.keys_per_second, base.keys_per_second);
    let connect = ratio(gateway.connect_seconds, base.connect_seconds);
    let memory = ratio(gateway.bytes_per_device, base.bytes_per_device);
    eprintln!(
        "  rki-gateway / {}: throughput {throughput:.3}, connect time {connect:.3}, memory per idle terminal {memory:.3}",
        base.server
    );
    if first {
        gateway.extra.insert("throughput_ratio_vs_baseline".into(), json!(throughput));
    }
    gateway.extra.insert(format!("throughput_ratio_vs_{}", base.server), json!(throughput));
    gateway.extra.insert(format!("connect_ratio_vs_{}", base.server), json!(connect));
    gateway.extra.insert(format!("memory_ratio_vs_{}", base.server), json!(memory));
}

/// Issue 21's fleet-push figures against their goals, Mosquitto from the same run.
fn issue21_targets(gateway: &Summary, mosquitto: &Summary) -> serde_json::Value {
    let number = |key: &str| gateway.extra.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let connect_ratio = round3(gateway.connect_seconds / mosquitto.connect_seconds.max(1e-9));
    let throughput_ratio = round3(gateway.keys_per_second / mosquitto.keys_per_second.max(1e-9));
    let (timed_out, reprovisioned) = (number("connects_timed_out"), number("gudids_reprovisioned"));
    json!({
        "connect_ratio_vs_mosquitto": {"value": connect_ratio, "goal": "<= 1.5", "met": connect_ratio <= 1.5},
        "connects_timed_out": {"value": timed_out, "goal": "0", "met": timed_out == 0.0},
        "gudids_reprovisioned": {"value": reprovisioned, "goal": "0", "met": reprovisioned == 0.0},
        "throughput_ratio_vs_mosquitto": {"value": throughput_ratio, "goal": ">= 1.5", "met": throughput_ratio >= 1.5},
        "bytes_per_idle_terminal": {
            "value": gateway.bytes_per_device, "goal": "<= 4096", "met": gateway.bytes_per_device <= 4096.0,
            "mosquitto": mosquitto.bytes_per_device,
        },
    })
}

/// Runs `one` at `--devices`, or at each size of `--sweep`; prints the JSON and draws the plot.
/// `one` returns the gateway's summary first, then the baseline's if it ran.
fn fleet_sizes(fleet: &FleetArgs, cli: &Cli, mut one: impl FnMut(usize) -> Result<Vec<Summary>>) -> Result<()> {
    let sizes = if fleet.sweep.is_empty() { vec![fleet.devices] } else { fleet.sweep.clone() };
    let mut runs: Vec<Vec<Summary>> = Vec::new();
    let mut failures = Vec::new();
    for devices in sizes {
        // A sweep goes on past a failed size, so the sizes that worked are still reported.
        match one(devices) {
            Ok(run) => runs.push(run),
            Err(e) => {
                // A single size's error is the command's; a sweep's is said as it happens.
                if !fleet.sweep.is_empty() {
                    eprintln!("rki-loadtest: {devices} devices: {e}");
                }
                failures.push(format!("{devices} devices: {e}"));
            }
        }
    }
    if runs.is_empty() {
        return Err(failures.join("; ").into());
    }
    if cli.json {
        let json = if fleet.sweep.is_empty() {
            summary_json(&runs[0])
        } else {
            json!({ "sweep": runs.iter().map(|r| summary_json(r)).collect::<Vec<_>>() })
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if let Some(path) = &cli.plot {
        draw(path, &runs, !fleet.sweep.is_empty())?;
        eprintln!("plot written to {}", path.display());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}

/// The gateway's summary, with the first baseline's nested under `baseline` when it ran, and
/// every baseline's under `baselines`.
fn summary_json(run: &[Summary]) -> serde_json::Value {
    let mut main = serde_json::to_value(&run[0]).unwrap_or_default();
    if let Some(base) = run.get(1) {
        main["baseline"] = serde_json::to_value(base).unwrap_or_default();
        main["baselines"] = serde_json::to_value(&run[1..]).unwrap_or_default();
    }
    main
}

fn draw(path: &Path, runs: &[Vec<Summary>], sweep: bool) -> Result<()> {
    let servers: Vec<String> = runs.first().map(|r| r.iter().map(|s| s.server.clone()).collect()).unwrap_or_default();
    let by_size = |pick: &dyn Fn(&Summary) -> f64| -> Vec<Series> {
        servers
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                name: name.clone(),
                points: runs.iter().filter_map(|r| r.get(i)).map(|s| (s.devices as f64, pick(s))).collect(),
            })
            .collect()
    };
    let delivery = Chart {
        title: "Acked devices over time (from task creation)".into(),
        x_label: "seconds".into(),
        y_label: "acked devices".into(),
        series: runs
            .iter()
            .flat_map(|r| r.iter())
            .map(|s| Series { name: format!("{} {}", s.server, s.devices), points: s.curve.clone() })
            .collect(),
        markers: false,
    };
    let mut charts = Vec::new();
    if sweep {
        charts.push(Chart {
            title: "Push time: task creation to last verified durable ack".into(),
            x_label: "devices".into(),
            y_label: "seconds".into(),
            series: by_size(&|s| s.push_seconds),
            markers: true,
        });
        charts.push(Chart {
            title: "Server peak RSS".into(),
            x_label: "devices".into(),
            y_label: "MiB".into(),
            series: by_size(&|s| s.gateway_rss_peak_bytes as f64 / MIB),
            markers: true,
        });
        charts.push(Chart {
            title: "Server RSS growth, every terminal connected and idle".into(),
            x_label: "devices".into(),
            y_label: "MiB".into(),
            series: by_size(&|s| s.bytes_per_device * s.devices as f64 / MIB),
            markers: true,
        });
        charts.push(Chart {
            title: "Connect phase (gateway: initialisation + device CONNECT)".into(),
            x_label: "devices".into(),
            y_label: "seconds".into(),
            series: by_size(&|s| s.connect_seconds),
            markers: true,
        });
    }
    charts.push(delivery);
    plot::write_png(path, &charts)?;
    Ok(())
}
