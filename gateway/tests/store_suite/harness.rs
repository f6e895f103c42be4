//! The two backends under one face, and the small world the specs start from.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rki_gateway::clock::Millis;
use rki_gateway::domain::ExecutionState;
use rki_gateway::store::postgres::PostgresStore;
use rki_gateway::store::sqlite::SqliteStore;
use rki_gateway::store::*;

use crate::pg::PgServer;

/// 2023-11-14T22:13:20Z: every time in the specs counts from here.
pub const T0: Millis = 1_700_000_000_000;

/// The audit entry a store spec's action writes (the specs that check the log name what they need).
pub fn audit(action: &'static str) -> Audit {
    Audit::new(&Actor::named("store suite"), None, action, "", serde_json::json!({}), T0)
}
pub const DAY_MS: Millis = 86_400_000;
/// Connections per PostgreSQL store in the specs: enough for the concurrency specs' threads.
const PG_POOL_SIZE: usize = 4;

/// `unwrap` with the store error in the message, at the caller's line.
pub trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for StoreResult<T> {
    #[track_caller]
    fn must(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("store call failed: {e}"),
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One PostgreSQL server for the whole test binary; each subject gets its own database.
pub fn pg_server() -> &'static PgServer {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    match SERVER.get_or_init(PgServer::start) {
        Ok(server) => server,
        Err(e) => panic!("{e}"),
    }
}

/// A store opened with its concrete type, for the inherent methods beside the trait.
pub enum Opened {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Opened {
    pub fn store(&self) -> &dyn Store {
        match self {
            Opened::Sqlite(s) => s,
            Opened::Postgres(s) => s,
        }
    }

    pub fn schema_version(&self) -> StoreResult<i64> {
        match self {
            Opened::Sqlite(s) => s.schema_version(),
            Opened::Postgres(s) => s.schema_version(),
        }
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        match self {
            Opened::Sqlite(s) => s.meta(key),
            Opened::Postgres(s) => s.meta(key),
        }
    }

    pub fn set_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        match self {
            Opened::Sqlite(s) => s.set_meta(key, value),
            Opened::Postgres(s) => s.set_meta(key, value),
        }
    }

    pub fn reseal_all(&self, reseal: impl Fn(&str) -> Result<String, String>, kcv: &str) -> StoreResult<usize> {
        match self {
            Opened::Sqlite(s) => s.reseal_all(reseal, kcv),
            Opened::Postgres(s) => s.reseal_all(reseal, kcv),
        }
    }

    pub fn seal_legacy_gudid_keys(&self, seal: impl Fn(&[u8]) -> Result<String, String>) -> StoreResult<usize> {
        match self {
            Opened::Sqlite(s) => s.seal_legacy_gudid_keys(seal),
            Opened::Postgres(s) => s.seal_legacy_gudid_keys(seal),
        }
    }
}

enum Location {
    Sqlite { dir: TempDir },
    Postgres { url: String },
}

/// A fresh, empty store of one backend.
pub struct Subject {
    pub opened: Opened,
    location: Location,
}

impl Subject {
    pub fn sqlite() -> Subject {
        let dir = TempDir::new("rki-store-suite");
        let opened = Opened::Sqlite(SqliteStore::open(&dir.path().join("rki.sqlite")).must());
        Subject { opened, location: Location::Sqlite { dir } }
    }

    /// A PostgreSQL subject, or `None` (with a note) where PostgreSQL is not installed: the
    /// fast tier runs without it; the full tier (`RKI_TEST_FULL`, set by `scripts/test`) fails.
    pub fn postgres_or_skip(test: &str) -> Option<Subject> {
        crate::pg::installed_or_skip(test).then(Subject::postgres)
    }

    pub fn postgres() -> Subject {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let name = format!("suite_{}_{}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed));
        let url = pg_server().create_database(&name).unwrap_or_else(|e| panic!("{e}"));
        let opened = Opened::Postgres(PostgresStore::connect(&url, PG_POOL_SIZE).must());
        Subject { opened, location: Location::Postgres { url } }
    }

    pub fn store(&self) -> &dyn Store {
        self.opened.store()
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.location, Location::Postgres { .. })
    }

    /// The SQLite database file and its WAL, as raw bytes (`None` for PostgreSQL): what a copy of
    /// the data directory would hold.
    pub fn sqlite_files(&self) -> Option<Vec<u8>> {
        let Location::Sqlite { dir } = &self.location else { return None };
        let mut bytes = Vec::new();
        for name in ["rki.sqlite", "rki.sqlite-wal"] {
            bytes.extend(std::fs::read(dir.path().join(name)).unwrap_or_default());
        }
        Some(bytes)
    }

    /// Opens the same database again (running migrations again).
    pub fn reopen(&self) -> StoreResult<Opened> {
        match &self.location {
            Location::Sqlite { dir } => SqliteStore::open(&dir.path().join("rki.sqlite")).map(Opened::Sqlite),
            Location::Postgres { url } => PostgresStore::connect(url, PG_POOL_SIZE).map(Opened::Postgres),
        }
    }

    /// Runs one SQL statement behind the store's back, as an intruder with database access
    /// would: the append-only tables must refuse it.
    pub fn raw_execute(&self, sql: &str) -> Result<u64, String> {
        match &self.location {
            Location::Sqlite { dir } => {
                let conn = rusqlite::Connection::open(dir.path().join("rki.sqlite")).map_err(|e| e.to_string())?;
                conn.execute(sql, []).map(|n| n as u64).map_err(|e| e.to_string())
            }
            Location::Postgres { url } => {
                let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).map_err(|e| e.to_string())?;
                client.execute(sql, &[]).map_err(|e| match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                })
            }
        }
    }
    /// The rows of a query returning two text columns, read behind the store's back, as a
    /// broker's read-only role would (the `rki_broker_credentials` view).
    pub fn raw_text_pairs(&self, sql: &str) -> Vec<(String, String)> {
        match &self.location {
            Location::Sqlite { dir } => {
                let conn = rusqlite::Connection::open(dir.path().join("rki.sqlite")).expect("open");
                let mut statement = conn.prepare(sql).expect("prepare");
                let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query");
                rows.collect::<Result<_, _>>().expect("rows")
            }
            Location::Postgres { url } => {
                let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).expect("connect");
                client.query(sql, &[]).expect("query").iter().map(|r| (r.get(0), r.get(1))).collect()
            }
        }
    }
}

/// An organization with a key source and `devices` registered terminals (SN `{org}-0000`, …).
pub struct World {
    pub org: OrgRow,
    pub source: KeySourceRow,
    pub devices: Vec<DeviceRow>,
}

pub fn world(store: &dyn Store, org: &str, devices: usize) -> World {
    let org = store.create_org(org, T0, &audit("org.create")).must();
    let source = store
        .insert_key_source(
            &KeySourceRow {
                id: 0,
                org_id: org.id,
                name: "bdk-1".into(),
                algorithm: "tdes2".into(),
                kcv: "ABCDEF".into(),
                sealed: "sealed:bdk-1".into(),
                key_set_id: "FFFF987654".into(),
                created_at: T0,
            },
            &audit("key_source.authorize"),
        )
        .must();
    let rows: Vec<ImportRow> = (0..devices)
        .map(|i| ImportRow { line: i + 2, sn: format!("{}-{i:04}", org.name), model: Some("A920".into()) })
        .collect();
    assert_eq!(store.import_devices(org.id, &rows, T0, &audit("devices.upload")).must(), devices);
    let mut listed = store.list_devices(org.id, &DeviceFilter::default()).must();
    listed.sort_by_key(|d| d.id);
    World { org, source, devices: listed }
}

pub fn new_credentials(tag: &str) -> NewCredentials {
    NewCredentials {
        signing_key: format!("sealed:sign:{tag}"),
        kbpk_aes: format!("sealed:aes:{tag}"),
        kbpk_tdes: format!("sealed:tdes:{tag}"),
        password_hash: tag.as_bytes().to_vec(),
        counter: 1,
        x_pos_device_id: format!("xpos-{tag}"),
        broker_password_hash: format!("$7$hash-{tag}"),
    }
}

pub fn new_gudid(world: &World, device: usize, tag: u8) -> GudidRow {
    let d = &world.devices[device];
    GudidRow {
        id: 0,
        org_id: world.org.id,
        device_id: d.id,
        sn: d.sn.clone(),
        gudid_id: [&[tag][..], &(device as u32).to_be_bytes(), &[0xA5, 0x5A]].concat(),
        sealed_mac_key: format!("sealed:gudid:{tag}:{device}"),
        provisioned_by: "ops".into(),
        provisioned_at: T0,
        expires_at: T0 + 30 * DAY_MS,
        used_at: None,
        proven_at: None,
        bootstrap_hash: Some(format!("$7$101$salt{tag}$hash{device}")),
        revoked_at: None,
        revoked_by: None,
    }
}

/// Provisions a GUDID for the device and spends it: the device is initialised.
pub fn initialise(store: &dyn Store, world: &World, device: usize) -> DeviceCredentials {
    let gudid = store.insert_gudid(&new_gudid(world, device, 0xC0)).must();
    let tag = world.devices[device].sn.clone();
    store.spend_gudid(gudid.id, world.devices[device].id, &new_credentials(&tag), T0 + 1).must()
}

pub fn new_task(world: &World, devices: &[usize], created_at: Millis, expires_at: Millis) -> NewTask {
    NewTask {
        org_id: world.org.id,
        key_source_id: world.source.id,
        slot: 3,
        key_type: "IPEK".into(),
        created_at,
        expires_at,
        created_by: "ops".into(),
        request_id: None,
        executions: devices
            .iter()
            .map(|&i| NewExecution {
                device_id: world.devices[i].id,
                key_block: format!("B0096P0TE00N0000{i:04}"),
                key_id: vec![0xFF, 0xFF, 0x98, 0x76, 0x54, 0x00, 0x00, i as u8],
                kcv: format!("{:06X}", 0xA0_0000 + i),
                generation: 1,
            })
            .collect(),
    }
}

/// A task for `devices` (indexes into the world), deadline 30 days after `T0`.
pub fn task(store: &dyn Store, world: &World, devices: &[usize]) -> (TaskRow, Vec<ExecutionRow>) {
    store.create_task(&new_task(world, devices, T0, T0 + 30 * DAY_MS)).must()
}

pub fn ending(execution_id: i64, state: ExecutionState, at: Millis) -> Ending {
    let result = match state {
        ExecutionState::Succeeded => Some(0),
        ExecutionState::Failed => Some(-11208),
        _ => None,
    };
    Ending {
        execution_id,
        state,
        result,
        injection: "auto".into(),
        at,
        lock_device: state == ExecutionState::Succeeded,
        sends: None,
    }
}

/// What the committer writes for each successful ack: the device's counter, then the ending that
/// records the execution and locks the device.
pub fn ack_writes(executions: &[ExecutionRow], counter: u64, at: Millis) -> Vec<Write> {
    executions
        .iter()
        .flat_map(|e| {
            [
                Write::Counter { device_id: e.device_id, counter },
                Write::End(ending(e.id, ExecutionState::Succeeded, at)),
            ]
        })
        .collect()
}

pub fn report(device_id: i64, locked: bool, at: Millis) -> DeviceReport {
    DeviceReport {
        device_id,
        model: "A920".into(),
        rom_version: "PayDroid_7.1.2".into(),
        app_version: "2.4.0".into(),
        region: "EU".into(),
        debug_mode: false,
        debug_key_present: false,
        locked,
        slots_json: format!("[{{\"slot\":3,\"at\":{at}}}]"),
        at,
    }
}

pub fn all_records(store: &dyn Store, org_id: i64) -> Vec<RecordRow> {
    store.list_records(org_id, &RecordFilter::default()).must()
}
