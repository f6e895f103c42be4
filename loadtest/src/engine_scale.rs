//! `engine`: a download task for a group of 1,000,000 registered, initialised devices, through the
//! gateway's own library and store, with no socket: preview, derive one DUKPT initial key per
//! device, wrap it under that device's key-block protection key, persist every execution.
//!
//! The fleet is built once and cached: a million devices with sealed credentials cannot be made
//! through the API in reasonable time (one GUDID and one initialisation each), so it is written
//! through the `Store` trait: `import_devices`, `add_group_members`, `assign`, one `insert_gudid`
//! per device and batched `Write::Initialise` (the same write a real initialisation commits),
//! with secrets sealed by `SoftwareKeyService::seal_device_secrets`. `insert_gudid` is one
//! transaction each, so the build runs on tmpfs (an fsync there costs nothing) and the finished
//! store is copied to disk, where the measurement runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rki_gateway::clock::Clock;
use rki_gateway::engine::{Engine, Outbound, Target, TaskSpec};
use rki_gateway::keyservice::{KeyService, MasterKey, SoftwareKeyService};
use rki_gateway::service::orgs;
use rki_gateway::store::sqlite::SqliteStore;
use rki_gateway::store::{
    Actor, Audit, Delivery, DeviceFilter, GudidRow, Gudids, ImportRow, KeySourceRow, KeySources, NewCredentials,
    Registry, Store, Write as StoreWrite,
};
use rki_protocol::frame::MacKey;
use rki_protocol::init::{self, DeviceSecrets, GUDID_VALIDITY_SECONDS};
use rki_protocol::{KeyAlgorithm, SecretBytes, SymmetricKey};
use serde_json::json;

use crate::procfs;
use crate::summary::{round3, Summary, ThreadCpu};
use crate::Result;

/// Organization and group of the engine fleet.
const ORG: &str = "bench";
const GROUP: &str = "million";
/// Devices per import transaction and per batch of initialisations.
const BUILD_CHUNK: usize = 10_000;
/// Name of the cached store and master key inside a cache directory.
const STORE_FILE: &str = "rki.sqlite";
const MASTER_FILE: &str = "master.key";

/// Which BDK family to derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Two-key TDES BDK: IPEK per X9.24-1, TR-31 version B block.
    Tdes,
    /// AES-128 BDK: initial key per X9.24-3, TR-31 version D block.
    Aes,
}

impl Family {
    fn key_source(self) -> &'static str {
        match self {
            Family::Tdes => "bdk-tdes",
            Family::Aes => "bdk-aes",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub devices: usize,
    pub family: Family,
    /// Where built fleets are kept between runs (on disk).
    pub cache_dir: PathBuf,
    /// Where a fleet is built (tmpfs).
    pub build_dir: PathBuf,
    /// Where the measured store lives (disk).
    pub work_dir: PathBuf,
    pub rebuild: bool,
}

/// Publishes nowhere: no device is online in this scenario.
struct NoOutbound;

impl Outbound for NoOutbound {
    fn publish(&self, _topic: String, _payload: Vec<u8>) {}
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Builds the cached fleet of `n` devices if it is not there; returns its directory. The cache is
/// per schema version: a fleet built by an older gateway would be migrated on every run, and the
/// measurement would carry the migration's WAL.
pub fn ensure_fleet(options: &EngineOptions) -> Result<PathBuf> {
    let cache = options.cache_dir.join(format!("engine-{}-schema{}", options.devices, SqliteStore::SCHEMA_VERSION));
    if cache.join(STORE_FILE).exists() && !options.rebuild {
        return Ok(cache);
    }
    let build = options.build_dir.join(format!("rki-loadtest-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&build)?;
    let started = Instant::now();
    build_fleet(&build, options.devices)?;
    eprintln!(
        "built {} devices in {:.1} s; copying to {}",
        options.devices,
        started.elapsed().as_secs_f64(),
        cache.display()
    );
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache)?;
    for entry in std::fs::read_dir(&build)? {
        let entry = entry?;
        std::fs::copy(entry.path(), cache.join(entry.file_name()))?;
    }
    std::fs::remove_dir_all(&build)?;
    Ok(cache)
}

fn build_fleet(dir: &Path, n: usize) -> Result<()> {
    let store = SqliteStore::open(&dir.join(STORE_FILE))?;
    let (master, _) = MasterKey::load_or_create(&dir.join(MASTER_FILE))?;
    store.set_meta("master_key_kcv", &master.kcv().to_hex())?;
    let keys = SoftwareKeyService::new(master);
    let now = now_ms();
    let actor = Actor::named("rki-loadtest");
    let audit =
        |action: &'static str, object: &str| Audit::new(&actor, None, action, object, serde_json::json!({}), now);
    let org = orgs::create_org(&store, ORG, &actor, now)?.org;
    for (family, bdk, key_set_len) in [
        (Family::Tdes, SymmetricKey::tdes_from_hex(rki_tests::TEST_BDK)?, 5),
        (Family::Aes, SymmetricKey::random(KeyAlgorithm::Aes128)?, 4),
    ] {
        let sealed = keys.seal_bdk(&bdk)?;
        store.insert_key_source(
            &KeySourceRow {
                id: 0,
                org_id: org.id,
                name: family.key_source().into(),
                algorithm: sealed.algorithm.as_str().into(),
                kcv: sealed.kcv.to_hex(),
                sealed: sealed.sealed,
                key_set_id: hex::encode_upper(SecretBytes::random(key_set_len)?.expose_secret()),
                created_at: now,
            },
            &audit("key_source.authorize", family.key_source()),
        )?;
    }
    let sns: Vec<String> = (1..=n).map(|i| format!("ENG{i:07}")).collect();
    for (c, chunk) in sns.chunks(BUILD_CHUNK * 10).enumerate() {
        let rows: Vec<ImportRow> = chunk
            .iter()
            .enumerate()
            .map(|(i, sn)| ImportRow { line: c * BUILD_CHUNK * 10 + i + 2, sn: sn.clone(), model: Some("P3".into()) })
            .collect();
        store.import_devices(org.id, &rows, now, &audit("devices.upload", "fleet"))?;
    }
    let devices = store.list_devices(org.id, &DeviceFilter { limit: 0, ..DeviceFilter::default() })?;
    let ids: Vec<i64> = devices.iter().map(|d| d.id).collect();
    let group = store.create_group(org.id, GROUP, "rki-loadtest engine fleet", &audit("group.create", GROUP))?;
    for chunk in ids.chunks(BUILD_CHUNK * 10) {
        store.add_group_members(group.id, chunk, &audit("group.add_devices", GROUP))?;
    }
    let started = Instant::now();
    for (c, chunk) in devices.chunks(BUILD_CHUNK).enumerate() {
        let mut writes = Vec::with_capacity(chunk.len());
        let sealed = seal_in_parallel(&keys, chunk.len())?;
        for (d, creds) in chunk.iter().zip(sealed) {
            let gudid = store.insert_gudid(&GudidRow {
                id: 0,
                org_id: org.id,
                device_id: d.id,
                sn: d.sn.clone(),
                gudid_id: SecretBytes::random(32)?.expose_secret().to_vec(),
                sealed_mac_key: keys.seal_gudid_mac_key(&MacKey::random()?)?,
                provisioned_by: "rki-loadtest".into(),
                provisioned_at: now,
                expires_at: now + GUDID_VALIDITY_SECONDS as i64 * 1000,
                used_at: None,
                proven_at: None,
                bootstrap_hash: None,
                revoked_at: None,
                revoked_by: None,
            })?;
            writes.push(StoreWrite::Initialise { gudid_row: gudid.id, device_id: d.id, creds, at: now });
        }
        let outcome = store.apply_batch(&writes)?;
        if outcome.initialised.iter().any(|(_, c)| c.is_none()) {
            return Err("an initialisation of the build was refused".into());
        }
        if c % 10 == 9 {
            let done = (c + 1) * BUILD_CHUNK;
            let rate = done as f64 / started.elapsed().as_secs_f64();
            eprint!("\rinitialised {done}/{n} ({rate:.0}/s)");
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    Ok(())
}

/// Fresh device secrets, sealed as an initialisation seals them, on every core.
fn seal_in_parallel(keys: &SoftwareKeyService, count: usize) -> Result<Vec<NewCredentials>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per_thread = count.div_ceil(threads);
    let parts: Vec<Result<Vec<NewCredentials>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let size = per_thread.min(count.saturating_sub(t * per_thread));
                scope.spawn(move || (0..size).map(|_| sealed_credentials(keys)).collect::<Result<Vec<_>>>())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("sealing thread panicked".into()))).collect()
    });
    let mut out = Vec::with_capacity(count);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

fn sealed_credentials(keys: &SoftwareKeyService) -> Result<NewCredentials> {
    let password = SecretBytes::random(32)?;
    let secrets = DeviceSecrets {
        signing_key: MacKey::random()?,
        kbpk_aes: SymmetricKey::random(KeyAlgorithm::Aes256)?,
        kbpk_tdes: SymmetricKey::random(KeyAlgorithm::Tdes3)?,
        mqtt_password: SecretBytes::from_vec(password.to_hex_upper().as_bytes().to_vec()),
    };
    let sealed = keys.seal_device_secrets(&secrets)?;
    let broker_password_hash = rki_gateway::mosquitto::password_hash(secrets.mqtt_password.expose_secret())?;
    Ok(NewCredentials {
        broker_password_hash,
        signing_key: sealed.signing_key,
        kbpk_aes: sealed.kbpk_aes,
        kbpk_tdes: sealed.kbpk_tdes,
        password_hash: init::password_hash(secrets.mqtt_password.expose_secret()).to_vec(),
        counter: 0,
        x_pos_device_id: String::new(),
    })
}

/// Captures the gateway's log lines (to read the engine's own phase timings) and echoes them.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl LogCapture {
    /// The last value logged for `field` (`field=123`).
    fn last_number(&self, field: &str) -> Option<f64> {
        let text = self.0.lock().ok().map(|v| String::from_utf8_lossy(&v).into_owned())?;
        let key = format!("{field}=");
        text.rmatch_indices(&key).next().and_then(|(i, _)| {
            text[i + key.len()..].split(|c: char| !c.is_ascii_digit() && c != '.').next()?.parse().ok()
        })
    }
}

/// Runs the measurement on a fresh copy of the cached fleet. One family per process: the engine
/// keeps its hot maps for the life of the process, so a second measurement would start heavier.
pub fn run(options: &EngineOptions, runtime: &tokio::runtime::Runtime) -> Result<Summary> {
    let cache = ensure_fleet(options)?;
    let logs = LogCapture::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();
    measure(options, &cache, options.family, runtime, &logs)
}

fn measure(
    options: &EngineOptions,
    cache: &Path,
    family: Family,
    runtime: &tokio::runtime::Runtime,
    logs: &LogCapture,
) -> Result<Summary> {
    let load_start = procfs::load_average()[0];
    let dir = options.work_dir.join(format!("engine-{}-{:?}", options.devices, family));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for name in [STORE_FILE, MASTER_FILE] {
        std::fs::copy(cache.join(name), dir.join(name))?;
    }
    let store = Arc::new(SqliteStore::open(&dir.join(STORE_FILE))?);
    let (master, _) = MasterKey::load_or_create(&dir.join(MASTER_FILE))?;
    let keys: Arc<dyn KeyService> = Arc::new(SoftwareKeyService::new(master));
    let org = store.org_by_name(ORG)?.ok_or("the cached fleet has no organization")?;
    let source = store.key_source_by_name(org.id, family.key_source())?;
    let group = store.group_by_name(org.id, GROUP)?;
    let ids = store.group_member_ids(group.id)?;
    let actor = Actor::named("rki-loadtest");
    let audit = Audit::new(&actor, Some(org.id), "assignment.set", GROUP, serde_json::json!({}), now_ms());
    store.assign(org.id, &ids, Some(source.id), &audit)?;
    drop(ids);
    let me = std::process::id();
    let started = Instant::now();
    let store_dyn: Arc<dyn Store> = store.clone();
    let engine = runtime.block_on(Engine::start(store_dyn, keys, Arc::new(Clock::system()), Arc::new(NoOutbound)))?;
    let engine_start_seconds = started.elapsed().as_secs_f64();
    let before = procfs::sample(me).unwrap_or_default();
    let peak_reset = procfs::reset_peak(me);
    let threads_before = procfs::threads(me);
    let spec = TaskSpec {
        target: Target::Group(GROUP.into()),
        key_source: None,
        slot: 1,
        expiry_days: None,
        request_id: None,
    };
    let created = Instant::now();
    let (task, preview) = runtime.block_on(engine.create_task(org.id, &spec, &actor))?;
    let create_seconds = created.elapsed().as_secs_f64();
    let after = procfs::sample(me).unwrap_or_default();
    let threads_after = procfs::threads(me);
    if task.counts.total as usize != options.devices {
        return Err(format!(
            "the task has {} executions for {} devices ({} not ready)",
            task.counts.total,
            options.devices,
            preview.not_ready.len()
        )
        .into());
    }
    // The preview alone, on a warm cache, to split the creation time.
    let preview_started = Instant::now();
    let _ = runtime.block_on(engine.preview(org.id, &spec))?;
    let preview_seconds = preview_started.elapsed().as_secs_f64();
    let derive_ms = logs.last_number("derive_ms");
    let store_ms = logs.last_number("store_ms");
    let commit_ms = logs.last_number("commit_ms");
    let preview_ms = logs.last_number("preview_ms");
    let db_bytes = std::fs::metadata(dir.join(STORE_FILE)).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(dir.join(format!("{STORE_FILE}-wal"))).map(|m| m.len()).unwrap_or(0);
    let mut summary = Summary {
        scenario: "engine".into(),
        server: "engine".into(),
        devices: options.devices,
        push_seconds: round3(create_seconds),
        task_create_seconds: round3(create_seconds),
        keys_per_second: round3(options.devices as f64 / create_seconds),
        acks_verified: 0,
        gateway_rss_peak_bytes: after.rss_peak_bytes,
        gateway_cpu_seconds: round3(after.cpu_seconds - before.cpu_seconds),
        gateway_cpu_seconds_push: round3(after.cpu_seconds - before.cpu_seconds),
        threads_push: ThreadCpu::list(procfs::thread_delta(&threads_before, &threads_after)),
        load_average_start: load_start,
        load_average_end: procfs::load_average()[0],
        ..Summary::default()
    };
    let e = &mut summary.extra;
    e.insert("key_family".into(), json!(format!("{family:?}")));
    e.insert("algorithm".into(), json!(source.algorithm));
    e.insert("engine_start_seconds".into(), json!(round3(engine_start_seconds)));
    e.insert("rss_before_create_bytes".into(), json!(before.rss_bytes));
    e.insert("rss_after_create_bytes".into(), json!(after.rss_bytes));
    e.insert("peak_reset_before_create".into(), json!(peak_reset));
    e.insert("preview_seconds_warm".into(), json!(round3(preview_seconds)));
    e.insert("derive_and_wrap_seconds".into(), json!(derive_ms.map(|ms| round3(ms / 1000.0))));
    e.insert("store_seconds".into(), json!(store_ms.map(|ms| round3(ms / 1000.0))));
    e.insert("commit_seconds".into(), json!(commit_ms.map(|ms| round3(ms / 1000.0))));
    e.insert("preview_seconds".into(), json!(preview_ms.map(|ms| round3(ms / 1000.0))));
    e.insert("store_bytes_after".into(), json!(db_bytes));
    drop(engine);
    drop(store);
    // Dropping the engine leaves its workers parked in the runtime; give the store a moment.
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(summary)
}
