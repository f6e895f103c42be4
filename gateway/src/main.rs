//! `rki-gateway`: run the gateway (the default), or bootstrap an organization or the key owner.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rki_gateway::config::Config;
use rki_gateway::server;
use rki_gateway::service::orgs;
use rki_gateway::store::Actor;

/// jemalloc instead of glibc's malloc: a fleet's per-connection buffers and the broker's topic and
/// filter strings sit in size-class slabs, which keeps the resident memory per connected terminal
/// about a fifth lower and the broker router's scans over those strings cheaper
/// (docs/benchmarks/HISTORY.md, "Session 9").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`_rjem_malloc_conf`, a C string; `MALLOC_CONF`'s
/// `_RJEM_MALLOC_CONF` still overrides them). A connect or push burst frees most of what it
/// allocated; by default jemalloc keeps such pages for 10 s and purges them only while the
/// process allocates, so an idle gateway kept a burst's pages for good (4 to 7 KB per connected
/// terminal, measured with jemalloc's statistics at 5,000). A background thread now gives back
/// pages unused for a second.
///
/// Each thread's cache keeps what the thread freed last, and a thread that goes idle keeps it:
/// after a connect storm the threads' caches held 36 MB (`tcache_bytes`, 5,000 terminals, while
/// the committer still copied each batch's outcome for every write). Only objects of 4 KiB and
/// under are now cached per thread (32 KiB by default), and half as many of each size
/// (`lg_tcache_nslots_mul:-1`): 19,000 idle terminals, 3,106 and 2,951 bytes each against 3,403
/// to 4,149 with the defaults, the gateway's CPU for the run unchanged.
const MALLOC_CONF: [u8; 100] =
    *b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache_max:4096,lg_tcache_nslots_mul:-1\0";
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: Option<&'static u8> = Some(&MALLOC_CONF[0]);

/// Threads of the runtime's blocking pool (tokio's default is 512). Blocking work is store calls,
/// which queue on the store's few connections anyway (SQLite: one writer, three readers), and the
/// initialisations' key wrapping; past a few dozen, more threads only wait on those locks, and
/// each one keeps its stack and its allocator cache resident (a 19,000-terminal connect phase
/// grew the pool to 512 threads, ~50 MB).
const BLOCKING_THREADS_MAX: usize = 64;
/// How long an idle thread of the blocking pool waits for work before it exits (tokio's default
/// is 10 s). A thread's allocator cache holds what it freed last (a connect phase's
/// initialisations: up to 20 objects of each size class, 32 KiB and under, per thread) and its
/// stack stays resident while it lives; a pool that grew for a burst gives both back a second
/// after the burst instead of ten.
const BLOCKING_THREAD_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "rki-gateway",
    version,
    about = "Remote key injection gateway: MQTT endpoint for terminals, task engine, admin API"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RKI_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store). Default ./rki-data.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// MQTT listen address. Default 127.0.0.1:1883.
    #[arg(long)]
    mqtt_addr: Option<std::net::SocketAddr>,
    /// Admin API and /metrics listen address. Default 127.0.0.1:8080.
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
    /// Start a new, empty store even though the master key file already exists (a missing or
    /// empty store beside an existing key is refused otherwise: a wrong data_dir, a lost disk).
    #[arg(long)]
    init: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Create an organization and print its admin token once.
    InitOrg { name: String },
    /// With the gateway stopped: generate a new master key and re-seal every key under it.
    RotateMasterKey,
    /// Create a key-owner token (authorizes BDKs) and print it once.
    InitKeyOwner {
        #[arg(long, default_value = "key-owner")]
        label: String,
    },
    /// Write a consistent copy of the SQLite store to FILE (mode 0600), safe while the gateway
    /// runs. The copy holds sealed keys only: back the master key up separately.
    Backup { file: PathBuf },
    /// With Mosquitto stopped: write the dynamic security plugin's configuration FILE (mode
    /// 0600): the admin identity of `[broker.dynsec]` (its password file generated if absent), the
    /// gateway's identity, and with `--from-store` every initialised device and live bootstrap
    /// identity from their stored hashes (the plugin takes no hash over its API).
    DynsecInit {
        file: PathBuf,
        #[arg(long)]
        from_store: bool,
        /// Replace an existing FILE.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    // Every file this process creates (the store, its WAL and shared memory, the lock file, the
    // master key, backups) is private to its user, and every directory too.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rki-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(a) = cli.mqtt_addr {
        config.mqtt_addr = a;
    }
    if let Some(a) = cli.http_addr {
        config.http_addr = a;
    }
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, cli.init),
        Command::InitOrg { name } => init_org(&config, &name),
        Command::InitKeyOwner { label } => init_key_owner(&config, &label),
        Command::RotateMasterKey => rotate_master_key(&config),
        Command::Backup { file } => backup(&config, &file),
        Command::DynsecInit { file, from_store, force } => dynsec_init(&config, &file, from_store, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rki-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn init_org(config: &Config, name: &str) -> Result<(), String> {
    let _lock = server::lock_data_dir(config, "rki-gateway init-org")?;
    let store = server::OpenedStore::open(config)?.as_dyn();
    let actor = Actor::named("rki-gateway init-org");
    let created = orgs::create_org(store.as_ref(), name, &actor, now_ms()).map_err(|e| e.to_string())?;
    println!("organization {} created (id {})", created.org.name, created.org.id);
    println!("admin token (shown once; keep it secret): {}", created.admin_token);
    Ok(())
}

fn init_key_owner(config: &Config, label: &str) -> Result<(), String> {
    let _lock = server::lock_data_dir(config, "rki-gateway init-key-owner")?;
    let store = server::OpenedStore::open(config)?.as_dyn();
    let actor = Actor::named("rki-gateway init-key-owner");
    let token = orgs::create_key_owner_token(store.as_ref(), label, &actor, now_ms()).map_err(|e| e.to_string())?;
    println!("key owner token (shown once; keep it secret): {token}");
    Ok(())
}

fn rotate_master_key(config: &Config) -> Result<(), String> {
    use rki_gateway::keyservice::MasterKey;
    let path = config.master_key_path();
    if !path.exists() {
        return Err(format!("no master key at {}", path.display()));
    }
    let _lock = server::lock_data_dir(config, "rki-gateway rotate-master-key")?;
    let (old, _) = MasterKey::load_or_create(&path).map_err(|e| e.to_string())?;
    let store = server::OpenedStore::open(config)?;
    if store.meta("master_key_kcv")?.is_some_and(|kcv| kcv != old.kcv().to_hex()) {
        return Err("the master key file does not match this store; nothing changed".into());
    }
    // GUDID MAC keys an older gateway stored in the clear are sealed (under the old key) first,
    // so that the rotation re-seals them with every other key.
    let old_keys = rki_gateway::keyservice::SoftwareKeyService::new(
        MasterKey::load_or_create(&path).map_err(|e| e.to_string())?.0,
    );
    server::seal_legacy_gudid_keys(&store, &old_keys)?;
    let new = MasterKey::generate().map_err(|e| e.to_string())?;
    let staged = path.with_extension("key.new");
    new.write_new(&staged).map_err(|e| e.to_string())?;
    let resealed = store
        .reseal_all(|sealed| old.reseal(sealed, &new).map_err(|e| e.to_string()), &new.kcv().to_hex())
        .map_err(|e: String| {
            let _ = std::fs::remove_file(&staged);
            format!("re-sealing failed, nothing changed: {e}")
        })?;
    let backup = path.with_extension("key.old");
    std::fs::rename(&path, &backup).map_err(|e| {
        format!("store re-sealed but {} could not be moved: {e}; the new key is {}", path.display(), staged.display())
    })?;
    std::fs::rename(&staged, &path)
        .map_err(|e| format!("store re-sealed; move {} to {} by hand: {e}", staged.display(), path.display()))?;
    println!("re-sealed {resealed} keys under a new master key (KCV {})", new.kcv());
    println!(
        "new key: {} (back it up now); old key kept as {} (delete it once the new one is backed up)",
        path.display(),
        backup.display()
    );
    Ok(())
}

/// `VACUUM INTO` a temporary file beside FILE, checked, then renamed: FILE is either the whole
/// copy or absent. Needs no lock on the data directory: the copy is one read transaction, and the
/// running gateway's locks keep SQLite's WAL in place.
fn backup(config: &Config, file: &std::path::Path) -> Result<(), String> {
    if config.store != "sqlite" {
        return Err("backup copies the SQLite store; back a PostgreSQL store up with pg_dump or pg_basebackup".into());
    }
    if file.exists() {
        return Err(format!("{} exists; nothing written (choose a new file)", file.display()));
    }
    let mut staged = file.as_os_str().to_owned();
    staged.push(format!(".partial-{}", std::process::id()));
    let staged = PathBuf::from(staged);
    let started = std::time::Instant::now();
    let bytes = rki_gateway::store::sqlite::SqliteStore::backup(&config.store_path(), &staged).map_err(|e| {
        let _ = std::fs::remove_file(&staged);
        format!("backup of {}: {e}", config.store_path().display())
    })?;
    std::fs::rename(&staged, file).map_err(|e| format!("{}: {e}", file.display()))?;
    println!(
        "backed up {} to {} ({bytes} bytes, {:.1} s); the master key is not in it: back it up separately",
        config.store_path().display(),
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dynsec_init(config: &Config, file: &std::path::Path, from_store: bool, force: bool) -> Result<(), String> {
    use rki_gateway::{dynsec, mosquitto};
    let broker = config.broker.external().ok_or("dynsec-init needs an external [broker]")?;
    let settings = broker.dynsec.as_ref().ok_or("dynsec-init needs [broker.dynsec]")?;
    let gateway_user = broker.username.as_deref().ok_or("dynsec-init needs broker.username")?;
    let gateway_password = zeroize::Zeroizing::new(
        broker.password.clone().ok_or("dynsec-init needs the gateway's broker password (RKI_BROKER_PASSWORD)")?,
    );
    if file.exists() && !force {
        return Err(format!("{} exists; nothing written (--force replaces it)", file.display()));
    }
    if !settings.admin_password_file.exists() {
        let password = rki_protocol::secret::SecretBytes::random(32).map_err(|e| e.to_string())?.to_hex_upper();
        write_private(&settings.admin_password_file, password.as_bytes(), true)?;
        println!("generated the admin password in {}", settings.admin_password_file.display());
    }
    let admin_password = dynsec::read_admin_password(settings)?;
    let identities = if from_store {
        let _lock = server::lock_data_dir(config, "rki-gateway dynsec-init")?;
        let store = server::OpenedStore::open(config)?.as_dyn();
        dynsec::store_identities(store.as_ref(), now_ms())?
    } else {
        Vec::new()
    };
    let text = dynsec::seed_file(
        (&settings.admin_username, &mosquitto::password_hash(admin_password.as_bytes())?),
        (gateway_user, &mosquitto::password_hash(gateway_password.as_bytes())?),
        &identities,
    )?;
    write_private(file, text.as_bytes(), false)?;
    println!("wrote {} ({} managed identities); start Mosquitto on it", file.display(), identities.len());
    Ok(())
}

/// Writes FILE with mode 0600, through a temporary file renamed over it (`new_only`: never
/// replacing one).
fn write_private(file: &std::path::Path, bytes: &[u8], new_only: bool) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let staged = file.with_extension("partial");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)
        .map_err(|e| format!("{}: {e}", staged.display()))?;
    out.write_all(bytes).and_then(|_| out.sync_all()).map_err(|e| format!("{}: {e}", staged.display()))?;
    if new_only && file.exists() {
        let _ = std::fs::remove_file(&staged);
        return Err(format!("{} appeared meanwhile; nothing written", file.display()));
    }
    std::fs::rename(&staged, file).map_err(|e| format!("{}: {e}", file.display()))
}

/// The process's log: `filter` (`RKI_LOG`), text or JSON lines.
fn log_subscriber(filter: tracing_subscriber::EnvFilter, json: bool) -> Box<dyn tracing::Subscriber + Send + Sync> {
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        Box::new(fmt.json().finish())
    } else {
        Box::new(fmt.finish())
    }
}

fn run(config: Config, init: bool) -> Result<(), String> {
    let json = config.log_format == "json";
    let filter = tracing_subscriber::EnvFilter::try_from_env("RKI_LOG").unwrap_or_else(|_| "info".into());
    // `try_init`, not `set_global_default`: it also forwards the `log` crate's records (the
    // PostgreSQL client's among them) into the same subscriber.
    tracing_subscriber::util::SubscriberInitExt::try_init(log_subscriber(filter, json)).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .thread_keep_alive(BLOCKING_THREAD_IDLE)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(server::run(config, init))
}
