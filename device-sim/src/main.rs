//! `rki-device-sim`: run simulated terminals against a broker, and the technician's local
//! operations on a stored terminal (key query, manual injection, slot reset). A thin layer over
//! the library: every bad input exits non-zero with a one-line reason.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rki_device_sim::config::{parse_model, parse_region};
use rki_device_sim::fleet::{parse_fleet_csv, FleetMember};
use rki_device_sim::{
    BrokerAddr, Brokers, Device, DeviceConfig, DeviceHandle, DeviceProfile, FailingShare, Flapping, Fleet, FleetConfig,
    Knobs, SnPattern, StateStore,
};
use rki_protocol::message::{Ack, SlotStatus};
use rki_protocol::terminal::{KeySlot, Model, TerminalError};

/// How often the live status line is printed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The slots the terminal's Key Query screen always lists, "null" when empty.
const STANDARD_SLOTS: [KeySlot; 4] =
    [KeySlot::PRODUCTION, KeySlot::DEVELOPMENT, KeySlot::DEBUG, KeySlot::HARDWARE_CERTIFICATE];

#[derive(Parser)]
#[command(name = "rki-device-sim", version, about = "Simulated payment terminals for the RKI gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one terminal or a fleet until Ctrl-C or --duration-s.
    Run(Box<RunArgs>),
    /// Print a stored terminal's key slots, like its "Key Query" screen.
    KeyQuery(StoredArgs),
    /// Force the kept (refused) download of a stored terminal locally and send the manual ack.
    ForceManual(ForceArgs),
    /// Delete the key in one slot of a stored terminal (e.g. the debug key in slot 8).
    ResetSlot(ResetArgs),
}

#[derive(Args)]
struct StoredArgs {
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    sn: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForceArgs {
    #[command(flatten)]
    stored: StoredArgs,
    /// Broker HOST:PORT to send the manual ack through.
    #[arg(long)]
    broker: String,
    /// How long to wait for the broker to confirm the ack.
    #[arg(long, default_value_t = 15)]
    timeout_s: u64,
}

#[derive(Args)]
struct ResetArgs {
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    sn: String,
    #[arg(long)]
    slot: u16,
}

#[derive(Args)]
struct RunArgs {
    /// One terminal with this SN.
    #[arg(long, conflicts_with_all = ["count", "csv"])]
    sn: Option<String>,
    /// A fleet of N terminals named by --pattern.
    #[arg(long, conflicts_with = "csv")]
    count: Option<usize>,
    /// SN pattern for --count: one placeholder, {} or {:0N}.
    #[arg(long, default_value = "SIM{:06}")]
    pattern: String,
    /// First number for --pattern.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// A fleet from a CSV file: sn[,gudid[,model,rom,app,region]] per line.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// GUDID to initialise the single terminal (--sn) with, if it has no secrets yet.
    #[arg(long, requires = "sn")]
    gudid: Option<String>,
    /// Broker HOST:PORT (repeatable: terminals are spread over the addresses).
    #[arg(long = "broker")]
    brokers: Vec<String>,
    /// Broker addresses FIRST-LAST:PORT, e.g. 127.0.0.1-127.0.0.8:1883.
    #[arg(long, conflicts_with = "brokers")]
    broker_range: Option<String>,
    /// Keep each terminal's state in DIR/{sn}.state.json (holds secrets: keep DIR private).
    /// Without it, state is kept in memory only.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Do not fsync state writes (faster for big fleets; survives a process crash, not a
    /// machine crash).
    #[arg(long)]
    no_fsync: bool,
    #[arg(long, default_value = "P3")]
    model: String,
    /// ROM version (default: the model's minimum).
    #[arg(long)]
    rom: Option<String>,
    /// Key-injection app version (default: the region's minimum).
    #[arg(long)]
    app: Option<String>,
    #[arg(long, default_value = "EU")]
    region: String,
    /// Terminals start locked.
    #[arg(long)]
    locked: bool,
    /// Terminals start in debug mode.
    #[arg(long)]
    debug_mode: bool,
    /// Terminals start with a debug key in slot 8.
    #[arg(long)]
    debug_key: bool,
    /// Delay before each ack.
    #[arg(long, default_value_t = 0)]
    ack_delay_ms: u64,
    /// Fraction (0..=1) of the fleet that fails every injection with --fail-code.
    #[arg(long)]
    fail_fraction: Option<f64>,
    #[arg(long, default_value_t = -3000, allow_negative_numbers = true)]
    fail_code: i32,
    /// Crash between install and ack on the first install (power off without acking).
    #[arg(long)]
    crash_after_install: bool,
    /// Flapping connectivity: online this long, then offline --flap-offline-ms, repeated.
    #[arg(long, requires = "flap_offline_ms")]
    flap_online_ms: Option<u64>,
    #[arg(long, requires = "flap_online_ms")]
    flap_offline_ms: Option<u64>,
    #[arg(long, default_value_t = 60)]
    keep_alive_s: u64,
    /// How long a connection (TCP plus CONNACK) may take before a retry.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Pause between two terminals' start, in microseconds.
    #[arg(long, default_value_t = 0)]
    spawn_interval_us: u64,
    /// Print the final counters as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                error.exit();
            }
            let text = error.to_string();
            let line = text.lines().next().unwrap_or("bad arguments").trim_start_matches("error: ");
            eprintln!("rki-device-sim: {line}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rki-device-sim: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("rki-device-sim: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<(), String> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::KeyQuery(args) => key_query(args).await,
        Command::ForceManual(args) => force_manual(args).await,
        Command::ResetSlot(args) => reset_slot(args).await,
    }
}

/// Opens a stored terminal, powered off: its state must exist.
async fn open_stored(state_dir: &std::path::Path, sn: &str, broker: BrokerAddr) -> Result<DeviceHandle, String> {
    if !state_dir.is_dir() {
        return Err(format!("state directory {} does not exist", state_dir.display()));
    }
    let profile = DeviceProfile::new(sn, Model::P3).map_err(|e| e.to_string())?;
    let mut config = DeviceConfig::new(profile, broker, StateStore::directory(state_dir));
    config.require_existing_state = true;
    config.knobs.start_powered = false;
    Device::spawn(config).await.map_err(|e| e.to_string())
}

/// A broker address for commands that never connect.
fn no_broker() -> BrokerAddr {
    BrokerAddr::new("127.0.0.1", 1883)
}

async fn key_query(args: StoredArgs) -> Result<(), String> {
    let device = open_stored(&args.state_dir, &args.sn, no_broker()).await?;
    let status = device.status();
    device.shutdown().await;
    if args.json {
        let slots: Vec<serde_json::Value> = status.slots.iter().map(slot_json).collect();
        let value = serde_json::json!({
            "sn": args.sn,
            "initialised": status.initialised,
            "locked": status.locked,
            "debug_mode": status.debug_mode,
            "kept_download": status.kept_download,
            "slots": slots,
        });
        println!("{value}");
        return Ok(());
    }
    println!("Key Query: {}", args.sn);
    println!(
        "initialised: {}  locked: {}  debug mode: {}",
        yes_no(status.initialised),
        yes_no(status.locked),
        yes_no(status.debug_mode)
    );
    println!("{:<6} {:<10} {:<26} KCV", "Index", "Key type", "KSN / key ID");
    let mut shown: Vec<KeySlot> = STANDARD_SLOTS.to_vec();
    shown.extend(status.slots.iter().map(|s| s.slot).filter(|s| !STANDARD_SLOTS.contains(s)));
    shown.sort();
    for slot in shown {
        match status.slots.iter().find(|s| s.slot == slot) {
            Some(record) => println!(
                "{:<6} {:<10} {:<26} {}",
                slot.0,
                record.key_type.as_str(),
                hex::encode_upper(&record.key_id),
                hex::encode_upper(&record.kcv)
            ),
            None => println!("{:<6} null", slot.0),
        }
    }
    if let Some(execution_id) = status.kept_download {
        println!("kept refused download: execution {execution_id} (force it with force-manual)");
    }
    Ok(())
}

fn slot_json(slot: &SlotStatus) -> serde_json::Value {
    serde_json::json!({
        "index": slot.slot.0,
        "key_type": slot.key_type.as_str(),
        "key_id": hex::encode_upper(&slot.key_id),
        "kcv": hex::encode_upper(&slot.kcv),
    })
}

fn ack_json(ack: &Ack) -> serde_json::Value {
    serde_json::json!({
        "execution_id": ack.execution_id,
        "result": ack.result,
        "slot": ack.slot.0,
        "key_id": hex::encode_upper(&ack.key_id),
        "kcv": hex::encode_upper(&ack.kcv),
        "injection": ack.injection.as_str(),
    })
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

async fn reset_slot(args: ResetArgs) -> Result<(), String> {
    let device = open_stored(&args.state_dir, &args.sn, no_broker()).await?;
    let outcome = device.reset_slot(KeySlot(args.slot)).await;
    device.shutdown().await;
    match outcome.map_err(|e| e.to_string())? {
        true => println!("{}: slot {} emptied", args.sn, args.slot),
        false => println!("{}: slot {} was already empty", args.sn, args.slot),
    }
    Ok(())
}

async fn force_manual(args: ForceArgs) -> Result<(), String> {
    let broker: BrokerAddr = args.broker.parse().map_err(|e: rki_device_sim::config::ConfigError| e.to_string())?;
    let device = open_stored(&args.stored.state_dir, &args.stored.sn, broker).await?;
    let outcome = force_and_send(&device, Duration::from_secs(args.timeout_s)).await;
    device.shutdown().await;
    let ack = outcome?;
    if args.stored.json {
        println!("{}", ack_json(&ack));
    } else {
        println!(
            "{}: execution {} injected manually in slot {} (KSN {}, KCV {}); ack sent",
            args.stored.sn,
            ack.execution_id,
            ack.slot,
            hex::encode_upper(&ack.key_id),
            hex::encode_upper(&ack.kcv)
        );
    }
    Ok(())
}

/// Forces the kept download while powered off (so a refusal costs no connection), then powers on
/// and waits until the broker confirmed every pending ack.
async fn force_and_send(device: &DeviceHandle, timeout: Duration) -> Result<Ack, String> {
    if !device.status().initialised {
        return Err(format!("{} is not initialised: it has no keys to unwrap with", device.sn()));
    }
    let ack = device.force_manual_injection().await.map_err(|e| e.to_string())?;
    device.power_on().await.map_err(|e| e.to_string())?;
    device
        .wait_for("the broker to confirm the manual ack", timeout, |s| s.connected && s.unconfirmed_acks == 0)
        .await
        .map_err(|e| {
            let last = device.status().last_error.unwrap_or_default();
            format!("{e} (the key is installed; the ack will be re-sent at the next connection) {last}")
        })?;
    Ok(ack)
}

fn brokers(args: &RunArgs) -> Result<Brokers, String> {
    if let Some(range) = &args.broker_range {
        return Brokers::parse_range(range).map_err(|e| e.to_string());
    }
    let addresses = args
        .brokers
        .iter()
        .map(|b| b.parse::<BrokerAddr>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Brokers::new(addresses).map_err(|_| "give --broker HOST:PORT or --broker-range".to_string())
}

fn template(args: &RunArgs) -> Result<DeviceProfile, String> {
    let model = parse_model(&args.model).map_err(|e| e.to_string())?;
    let region = parse_region(&args.region).map_err(|e| e.to_string())?;
    let mut profile = DeviceProfile::new("TEMPLATE", model)
        .map_err(|e| e.to_string())?
        .with_region(region)
        .locked(args.locked)
        .in_debug_mode(args.debug_mode)
        .with_debug_key(args.debug_key);
    if region != rki_protocol::terminal::Region::Eu {
        profile = profile.with_app(&region.minimum_app().to_string()).map_err(|e| e.to_string())?;
    }
    if let Some(rom) = &args.rom {
        profile = profile.with_rom(rom).map_err(|e| e.to_string())?;
    }
    if let Some(app) = &args.app {
        profile = profile.with_app(app).map_err(|e| e.to_string())?;
    }
    Ok(profile)
}

fn members(args: &RunArgs, template: &DeviceProfile) -> Result<Vec<FleetMember>, String> {
    if let Some(sn) = &args.sn {
        let profile = template.for_sn(sn).map_err(|e| e.to_string())?;
        if let Some(gudid) = &args.gudid {
            rki_protocol::init::Gudid::parse(gudid).map_err(|_| "--gudid is not 32 hex digits".to_string())?;
        }
        return Ok(vec![FleetMember { profile, gudid: args.gudid.clone() }]);
    }
    if let Some(path) = &args.csv {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return parse_fleet_csv(&text, template).map_err(|e| format!("{}: {e}", path.display()));
    }
    let count = args.count.ok_or("give --sn, --count or --csv")?;
    if count == 0 {
        return Err("--count must be at least 1".to_string());
    }
    let pattern = SnPattern::parse(&args.pattern).map_err(|e| e.to_string())?;
    FleetConfig::members_from_pattern(&pattern, args.first, count, template).map_err(|e| e.to_string())
}

fn knobs(args: &RunArgs) -> Knobs {
    Knobs {
        ack_delay: Duration::from_millis(args.ack_delay_ms),
        crash_after_next_install: args.crash_after_install,
        flapping: match (args.flap_online_ms, args.flap_offline_ms) {
            (Some(online), Some(offline)) => {
                Some(Flapping { online: Duration::from_millis(online), offline: Duration::from_millis(offline) })
            }
            _ => None,
        },
        keep_alive: Duration::from_secs(args.keep_alive_s.max(5)),
        connect_timeout: Duration::from_secs(args.connect_timeout_s.max(1)),
        ..Knobs::default()
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let brokers = brokers(&args)?;
    let template = template(&args)?;
    let members = members(&args, &template)?;
    let failing = match args.fail_fraction {
        None => None,
        Some(fraction) => {
            let error = TerminalError::from_code(args.fail_code)
                .ok_or_else(|| format!("--fail-code {} is not a terminal error code", args.fail_code))?;
            Some(FailingShare::new(fraction, error).map_err(|e| e.to_string())?)
        }
    };
    let store = match &args.state_dir {
        None => StateStore::Memory,
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            StateStore::Directory { path: dir.clone(), fsync: !args.no_fsync }
        }
    };
    let total = members.len();
    let config = FleetConfig {
        members,
        brokers,
        store,
        knobs: knobs(&args),
        failing,
        spawn_interval: Duration::from_micros(args.spawn_interval_us),
    };
    let without_gudid: Vec<bool> = config.members.iter().map(|m| m.gudid.is_none()).collect();
    let fleet = Fleet::spawn(config).await.map_err(|e| e.to_string())?;
    let idle = fleet
        .devices()
        .iter()
        .zip(without_gudid)
        .filter(|(device, no_gudid)| *no_gudid && !device.status().initialised)
        .count();
    if idle > 0 {
        eprintln!("rki-device-sim: {idle} terminal(s) have neither secrets nor a GUDID: they stay offline");
    }
    let counters = fleet.counters().clone();
    let printer = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(STATUS_INTERVAL);
        loop {
            ticker.tick().await;
            eprintln!("[{total} terminals] {}", counters.snapshot().status_line());
        }
    });
    let stop = async {
        match args.duration_s {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    stop.await;
    printer.abort();
    let last = fleet.snapshot();
    fleet.shutdown().await;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "terminals": total,
                "connected": last.connected,
                "initialised": last.initialised,
                "keys_installed": last.keys_installed,
                "acks_sent": last.acks_sent,
                "acks_confirmed": last.acks_confirmed,
                "failure_acks": last.failure_acks,
                "hellos_sent": last.hellos_sent,
                "rejected_frames": last.rejected_frames,
                "refusals_received": last.refusals_received,
                "errors": last.errors,
            })
        );
    } else {
        println!("[{total} terminals] {}", last.status_line());
    }
    Ok(())
}
