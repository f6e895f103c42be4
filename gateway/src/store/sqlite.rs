//! SQLite implementation of [`Store`]: WAL mode, `synchronous = FULL`, one writer connection and a
//! few reader connections. Chosen over redb because the schema is relational (tasks, executions,
//! records, groups), SQL carries over to the PostgreSQL store unchanged in spirit, and SQLite's
//! crash safety is the most tested there is.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::*;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    // 2: Mosquitto password hashes for the external-broker mode.
    "ALTER TABLE devices ADD COLUMN broker_password_hash TEXT;",
    // 3: the columns of PostgreSQL's cluster-wide re-delivery claims, unused by a single node; they
    // keep the two schemas' versions in step.
    "ALTER TABLE executions ADD COLUMN last_sent_at INTEGER; ALTER TABLE executions ADD COLUMN retry_claimed_until INTEGER;",
    // 4: a device's credentials in a table of their own. They are written once per
    // initialisation, while the device row is rewritten on every ack (counter, lock) and hello:
    // without them a row holds ~90 bytes instead of ~570 (37 rows to a page instead of 5), so the
    // acks of a push dirty a seventh of the device pages.
    include_str!("migration_4_credentials.sql"),
    // 5: the hash of each GUDID's bootstrap password, which the MQTT endpoint checks at CONNECT.
    "ALTER TABLE gudids ADD COLUMN bootstrap_hash TEXT;",
    // 6: key-encryption keys, entered once per organization at a key ceremony; BDKs then arrive
    // as TR-31 key blocks under them.
    "CREATE TABLE keks (
         id         INTEGER PRIMARY KEY,
         org_id     INTEGER NOT NULL REFERENCES organizations(id),
         name       TEXT NOT NULL,
         algorithm  TEXT NOT NULL,
         kcv        TEXT NOT NULL,
         sealed     TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         UNIQUE (org_id, name)
     );",
    // 7: GUDID custody. The MAC key of each GUDID sealed under the master key (the clear
    // `mac_key` column is emptied by the start-time re-seal, `seal_legacy_gudid_keys`, and
    // written empty from now on); revocation; at most one live GUDID per device, found by index.
    "ALTER TABLE gudids ADD COLUMN sealed_mac_key TEXT;
     ALTER TABLE gudids ADD COLUMN revoked_at INTEGER;
     ALTER TABLE gudids ADD COLUMN revoked_by TEXT;
     CREATE INDEX gudids_device_unspent ON gudids(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;",
    // 8: tasks numbered per organization: the API shows the number, so one organization cannot
    // count another's tasks from their ids.
    "ALTER TABLE tasks ADD COLUMN number INTEGER;
     UPDATE tasks SET number = (SELECT COUNT(*) FROM tasks t2 WHERE t2.org_id = tasks.org_id AND t2.id <= tasks.id);
     CREATE UNIQUE INDEX tasks_org_number ON tasks (org_id, number);",
];

/// Reader connections: the admin API and the metrics sampler read while the writer commits.
const READERS: usize = 3;
/// Rows per multi-row statement when a long list of ids is bound.
const IDS_PER_STATEMENT: usize = 500;
/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// A WAL larger than this after a checkpoint is truncated once it has been fully copied.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

pub struct SqliteStore {
    /// The only connection that writes; SQLite allows one writer at a time anyway.
    writer: Mutex<Connection>,
    /// WAL readers never block the writer nor each other.
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// Copies the WAL into the database file off the commit path; stopped on drop.
    _checkpointer: Checkpointer,
}

/// WAL checkpoints on a thread of their own. SQLite's automatic checkpoint runs inside the
/// `COMMIT` that crosses 1,000 WAL pages, so one writer's commit in a thousand paid for copying
/// every page written since (0.7 s of a million-device task's 1.2 s commit). The writer
/// connection has `wal_autocheckpoint = 0`; this thread runs a `PASSIVE` checkpoint every
/// [`CHECKPOINT_INTERVAL`] (it never blocks the writer or the readers). Durability does not
/// depend on it: a commit is durable once its WAL frames are synced (`synchronous = FULL`).
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> StoreResult<Self> {
        let conn = open_connection(path)?;
        conn.execute_batch(&format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES};")).map_err(backend)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let (flag, wake) = &*stopping;
                let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
                while !*stopped {
                    stopped = wake.wait_timeout(stopped, CHECKPOINT_INTERVAL).unwrap_or_else(|e| e.into_inner()).0;
                    // (busy, WAL frames, frames copied); a failure is retried at the next tick.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
                        tracing::warn!(error = %e, "SQLite WAL checkpoint failed; retrying");
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("checkpoint thread: {e}")))?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::QueryReturnedNoRows => StoreError::NotFound("no such row".into()),
        rusqlite::Error::SqliteFailure(code, ref msg) if code.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Conflict(msg.clone().unwrap_or_else(|| "constraint violated".into()))
        }
        rusqlite::Error::SqliteFailure(code, _) if code.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::Full(e.to_string())
        }
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::ReadOnly
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn open_connection(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 10000;
         PRAGMA cache_size = -65536;",
    )
    .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// The schema version this build migrates a store to.
    pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

    /// Opens (creating if needed) the database at `path` and runs pending migrations.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut writer = open_connection(path)?;
        migrate(&mut writer)?;
        writer.execute_batch("PRAGMA wal_autocheckpoint = 0;").map_err(backend)?;
        let readers = (0..READERS).map(|_| open_connection(path).map(Mutex::new)).collect::<StoreResult<Vec<_>>>()?;
        let checkpointer = Checkpointer::start(path)?;
        Ok(Self { writer: Mutex::new(writer), readers, next_reader: AtomicUsize::new(0), _checkpointer: checkpointer })
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = self.writer.lock().map_err(|_| StoreError::Backend("writer lock poisoned".into()))?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(backend)?;
        let out = f(&tx);
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                crash::finished(false);
                return Err(e);
            }
        };
        let committed = tx.commit().map_err(backend);
        crash::finished(committed.is_ok());
        committed?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i].lock().map_err(|_| StoreError::Backend("reader lock poisoned".into()))?;
        f(&conn)
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        self.read(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(backend)
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    /// Re-seals every sealed key (BDKs and device secrets) with `reseal`, and records
    /// `master_kcv`, in one transaction: all or nothing. Returns how many keys were re-sealed.
    pub fn reseal_all(&self, reseal: impl Fn(&str) -> Result<String, String>, master_kcv: &str) -> StoreResult<usize> {
        self.write(|tx| {
            let mut count = 0;
            for (table, column) in SEALED_KEY_COLUMNS {
                let keys: Vec<(i64, String)> = {
                    let mut stmt = tx
                        .prepare(&format!(
                            "SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL AND {column} <> ''"
                        ))
                        .map_err(backend)?;
                    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
                    rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
                };
                for (id, sealed) in keys {
                    let new = reseal(&sealed).map_err(StoreError::Invalid)?;
                    tx.execute(&format!("UPDATE {table} SET {column} = ?2 WHERE id = ?1"), params![id, new])
                        .map_err(backend)?;
                    count += 1;
                }
            }
            let devices: Vec<(i64, String, String, String)> = {
                let mut stmt = tx
                    .prepare("SELECT device_id, signing_key, kbpk_aes, kbpk_tdes FROM device_credentials")
                    .map_err(backend)?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            for (id, signing, aes, tdes) in devices {
                let (signing, aes, tdes) = (
                    reseal(&signing).map_err(StoreError::Invalid)?,
                    reseal(&aes).map_err(StoreError::Invalid)?,
                    reseal(&tdes).map_err(StoreError::Invalid)?,
                );
                tx.execute(
                    "UPDATE device_credentials SET signing_key = ?2, kbpk_aes = ?3, kbpk_tdes = ?4 WHERE device_id = ?1",
                    params![id, signing, aes, tdes],
                )
                .map_err(backend)?;
                count += 3;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('master_key_kcv', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
                [master_kcv],
            )
            .map_err(backend)?;
            Ok(count)
        })
    }

    /// Seals the clear MAC key of every GUDID a pre-schema-7 gateway wrote with `seal`, and
    /// empties the clear column, in one transaction; returns how many. Run at every start once the
    /// master key is checked (a no-op when there is none). `secure_delete` overwrites the freed
    /// bytes of the clear keys, and a checkpoint moves the rewritten pages out of the WAL, so the
    /// database file and later backups no longer hold them.
    pub fn seal_legacy_gudid_keys(&self, seal: impl Fn(&[u8]) -> Result<String, String>) -> StoreResult<usize> {
        let mut conn = self.writer.lock().map_err(|_| StoreError::Backend("writer lock poisoned".into()))?;
        let pending: i64 = conn
            .query_row(
                "SELECT count(*) FROM gudids WHERE length(mac_key) > 0 AND (sealed_mac_key IS NULL OR sealed_mac_key = '')",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if pending == 0 {
            return Ok(0);
        }
        conn.execute_batch("PRAGMA secure_delete = ON;").map_err(backend)?;
        let sealed = (|| -> StoreResult<usize> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(backend)?;
            let rows: Vec<(i64, zeroize::Zeroizing<Vec<u8>>)> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT id, mac_key FROM gudids
                         WHERE length(mac_key) > 0 AND (sealed_mac_key IS NULL OR sealed_mac_key = '')",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, zeroize::Zeroizing::new(r.get::<_, Vec<u8>>(1)?))))
                    .map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            for (id, clear) in &rows {
                let sealed = seal(clear).map_err(StoreError::Invalid)?;
                tx.execute("UPDATE gudids SET sealed_mac_key = ?2, mac_key = X'' WHERE id = ?1", params![id, sealed])
                    .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(rows.len())
        })();
        let _ = conn.execute_batch("PRAGMA secure_delete = OFF;");
        let sealed = sealed?;
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
        Ok(sealed)
    }

    /// The schema version after migrations.
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend))
    }

    /// Creates (or upgrades) the database at `path` to schema `version` and no further, without
    /// opening a store: the upgrade tests start from an older schema with it.
    #[doc(hidden)]
    /// SQLite's own check of the database: `PRAGMA quick_check` (page structure, record
    /// formats, constraints), or with `full` `PRAGMA integrity_check` (also every index against
    /// its table). Returns the first findings; empty when the database is sound.
    pub fn check_integrity(&self, full: bool) -> StoreResult<Vec<String>> {
        let conn = self.writer.lock().map_err(|_| StoreError::Backend("writer lock poisoned".into()))?;
        let pragma = if full { "PRAGMA integrity_check(20)" } else { "PRAGMA quick_check(20)" };
        let mut statement = conn.prepare(pragma).map_err(backend)?;
        let rows = statement.query_map([], |r| r.get::<_, String>(0)).map_err(backend)?;
        let findings = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
        Ok(findings.into_iter().filter(|f| f != "ok").collect())
    }

    /// Writes a consistent copy of the database at `path` into `out` (which must not exist):
    /// `VACUUM INTO` over a read-only connection, a snapshot taken in one read transaction,
    /// safe beside a running gateway (whose locks keep the WAL in place). Returns the copy's
    /// size in bytes.
    pub fn backup(path: &Path, out: &Path) -> StoreResult<u64> {
        use rusqlite::OpenFlags;
        if !path.exists() {
            return Err(StoreError::NotFound(format!("no store at {}", path.display())));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(backend)?;
        conn.execute_batch("PRAGMA busy_timeout = 10000;").map_err(backend)?;
        let target = out.to_str().ok_or_else(|| StoreError::Invalid("the backup path is not UTF-8".into()))?;
        conn.execute("VACUUM INTO ?1", [target]).map_err(backend)?;
        drop(conn);
        let copy = Connection::open_with_flags(out, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
        let findings: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(backend)?;
        if findings != "ok" {
            return Err(StoreError::Backend(format!("the copy failed its check: {findings}")));
        }
        drop(copy);
        std::fs::File::open(out).and_then(|f| f.sync_all()).map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
    }

    pub fn migrate_to_version(path: &Path, version: usize) -> StoreResult<()> {
        let mut conn = open_connection(path)?;
        migrate_to(&mut conn, version)
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Runs the migrations after the database's version, up to `version`.
fn migrate_to(conn: &mut Connection, version: usize) -> StoreResult<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::Backend(format!(
            "database schema version {current} is newer than this gateway knows ({known}); upgrade the gateway"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(version).skip(current as usize) {
        let tx = conn.transaction().map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
}

/// `generation > 0` is "initialised": every initialisation installs the credentials and counts
/// the generation up in one transaction, and nothing else sets either (a column of the device row,
/// so a listing of a million devices reads no second table).
const DEVICE_COLUMNS: &str = "id, org_id, sn, model, rom_version, app_version, region, debug_mode, debug_key_present, locked, last_seen, assigned_key_source, generation > 0, x_pos_device_id, created_at, unlock_pending, slots";

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        sn: r.get(2)?,
        model: r.get(3)?,
        rom_version: r.get(4)?,
        app_version: r.get(5)?,
        region: r.get(6)?,
        debug_mode: r.get(7)?,
        debug_key_present: r.get(8)?,
        locked: r.get(9)?,
        last_seen: r.get(10)?,
        assigned_key_source: r.get(11)?,
        initialised: r.get(12)?,
        x_pos_device_id: r.get(13)?,
        created_at: r.get(14)?,
        unlock_pending: r.get(15)?,
        slots_json: r.get(16)?,
    })
}

/// An initialised device's credentials; `WHERE` clauses name the device `d`.
const SELECT_CREDENTIALS: &str = "SELECT d.id, d.org_id, d.sn, c.signing_key, c.kbpk_aes, c.kbpk_tdes, c.password_hash, d.last_counter, d.generation, d.unlock_pending
     FROM devices d JOIN device_credentials c ON c.device_id = d.id";

fn credentials_row(r: &Row<'_>) -> rusqlite::Result<DeviceCredentials> {
    Ok(DeviceCredentials {
        device_id: r.get(0)?,
        org_id: r.get(1)?,
        sn: r.get(2)?,
        signing_key: r.get(3)?,
        kbpk_aes: r.get(4)?,
        kbpk_tdes: r.get(5)?,
        password_hash: r.get(6)?,
        last_counter: r.get::<_, i64>(7)? as u64,
        generation: r.get(8)?,
        unlock_pending: r.get(9)?,
    })
}

const KEY_SOURCE_COLUMNS: &str = "id, org_id, name, algorithm, kcv, sealed, key_set_id, created_at";

fn key_source_row(r: &Row<'_>) -> rusqlite::Result<KeySourceRow> {
    Ok(KeySourceRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        algorithm: r.get(3)?,
        kcv: r.get(4)?,
        sealed: r.get(5)?,
        key_set_id: r.get(6)?,
        created_at: r.get(7)?,
    })
}

const KEK_COLUMNS: &str = "id, org_id, name, algorithm, kcv, sealed, created_at";

fn kek_row(r: &Row<'_>) -> rusqlite::Result<KekRow> {
    Ok(KekRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        algorithm: r.get(3)?,
        kcv: r.get(4)?,
        sealed: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const GUDID_COLUMNS: &str = "g.id, g.org_id, g.device_id, d.sn, g.gudid_id, COALESCE(g.sealed_mac_key, ''), g.provisioned_by, g.provisioned_at, g.expires_at, g.used_at, g.bootstrap_hash, g.revoked_at, g.revoked_by";

fn gudid_row(r: &Row<'_>) -> rusqlite::Result<GudidRow> {
    Ok(GudidRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        device_id: r.get(2)?,
        sn: r.get(3)?,
        gudid_id: r.get(4)?,
        sealed_mac_key: r.get(5)?,
        provisioned_by: r.get(6)?,
        provisioned_at: r.get(7)?,
        expires_at: r.get(8)?,
        used_at: r.get(9)?,
        bootstrap_hash: r.get(10)?,
        revoked_at: r.get(11)?,
        revoked_by: r.get(12)?,
    })
}

const TASK_COLUMNS: &str = "t.id, t.org_id, t.key_source_id, k.name, t.slot, t.key_type, t.created_at, t.expires_at, t.created_by, t.stopped_at, t.request_id, t.number";

fn task_row(r: &Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        key_source_id: r.get(2)?,
        key_source: r.get(3)?,
        slot: r.get(4)?,
        key_type: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        created_by: r.get(8)?,
        stopped_at: r.get(9)?,
        request_id: r.get(10)?,
        number: r.get(11)?,
        counts: TaskCounts::default(),
    })
}

const EXECUTION_COLUMNS: &str = "e.id, e.task_id, e.org_id, e.device_id, d.sn, e.state, t.slot, t.key_type, e.key_block, e.key_id, e.kcv, e.generation, e.created_at, e.deadline, e.delivered_at, e.delivery_count, e.ended_at, e.result, t.key_source_id";
const EXECUTION_FROM: &str = "executions e JOIN devices d ON d.id = e.device_id JOIN tasks t ON t.id = e.task_id";

fn execution_row(r: &Row<'_>) -> rusqlite::Result<ExecutionRow> {
    let state: String = r.get(5)?;
    Ok(ExecutionRow {
        id: r.get(0)?,
        task_id: r.get(1)?,
        org_id: r.get(2)?,
        device_id: r.get(3)?,
        sn: r.get(4)?,
        state: ExecutionState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("bad state {state}").into(),
            )
        })?,
        slot: r.get(6)?,
        key_type: r.get(7)?,
        key_block: r.get(8)?,
        key_id: r.get(9)?,
        kcv: r.get(10)?,
        generation: r.get(11)?,
        created_at: r.get(12)?,
        deadline: r.get(13)?,
        delivered_at: r.get(14)?,
        delivery_count: r.get(15)?,
        ended_at: r.get(16)?,
        result: r.get(17)?,
        key_source_id: r.get(18)?,
    })
}

const RECORD_COLUMNS: &str =
    "id, org_id, execution_id, task_id, sn, key_source, key_type, injection, result, error_code, at, key_id, kcv,
     (SELECT number FROM tasks WHERE tasks.id = records.task_id)";

fn record_row(r: &Row<'_>) -> rusqlite::Result<RecordRow> {
    Ok(RecordRow {
        id: r.get(0)?,
        org_id: r.get(1)?,
        execution_id: r.get(2)?,
        task_id: r.get(3)?,
        sn: r.get(4)?,
        key_source: r.get(5)?,
        key_type: r.get(6)?,
        injection: r.get(7)?,
        result: r.get(8)?,
        error_code: r.get(9)?,
        at: r.get(10)?,
        key_id: r.get(11)?,
        kcv: r.get(12)?,
        task_number: r.get(13)?,
    })
}

/// The credentials of those of `ids` that are initialised, on any connection.
fn credentials_in(c: &Connection, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let sql = format!("{SELECT_CREDENTIALS} WHERE d.id IN ({})", in_list(chunk.len()));
        let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(chunk.iter()), credentials_row).map_err(backend)?;
        for row in rows {
            out.push(row.map_err(backend)?);
        }
    }
    Ok(out)
}

/// [`TaskSink`] inside `create_task_with`'s transaction on the writer connection.
struct SqliteTaskSink<'a> {
    tx: &'a Transaction<'a>,
    task: &'a NewTask,
    task_id: i64,
    inserted: usize,
}

/// Executions per INSERT statement of a task: fewer statements to step, one `RETURNING` each.
const EXECUTIONS_PER_INSERT: usize = 64;

/// `INSERT … VALUES` of `rows` executions: `?1`–`?4` the task's columns, then five per row.
fn insert_executions_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO executions (task_id, org_id, state, created_at, deadline, device_id, key_block, key_id, kcv, generation) VALUES ",
    );
    for r in 0..rows {
        let p = 5 + r * 5;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("(?1, ?2, 'queued', ?3, ?4, ?{}, ?{}, ?{}, ?{}, ?{})", p, p + 1, p + 2, p + 3, p + 4));
    }
    sql.push_str(" RETURNING id, device_id");
    sql
}

impl TaskSink for SqliteTaskSink<'_> {
    fn derive_targets(&mut self, device_ids: &[i64], aes: bool) -> StoreResult<Vec<DeriveTarget>> {
        let kbpk = if aes { "kbpk_aes" } else { "kbpk_tdes" };
        let mut out = Vec::with_capacity(device_ids.len());
        for chunk in device_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT d.id, d.sn, d.generation, c.{kbpk} FROM devices d JOIN device_credentials c ON c.device_id = d.id
                 WHERE d.id IN ({})",
                in_list(chunk.len())
            );
            let mut stmt = self.tx.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(chunk.iter()), |r| {
                    Ok(DeriveTarget {
                        device_id: r.get(0)?,
                        sn: r.get(1)?,
                        generation: r.get(2)?,
                        sealed_kbpk: r.get(3)?,
                    })
                })
                .map_err(backend)?;
            for row in rows {
                out.push(row.map_err(backend)?);
            }
        }
        Ok(out)
    }

    fn insert(&mut self, executions: &[NewExecution]) -> StoreResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(executions.len());
        let mut by_device: HashMap<i64, i64> = HashMap::with_capacity(EXECUTIONS_PER_INSERT);
        for rows in executions.chunks(EXECUTIONS_PER_INSERT) {
            let mut insert = self.tx.prepare_cached(&insert_executions_sql(rows.len())).map_err(backend)?;
            let task = [
                &self.task_id as &dyn rusqlite::ToSql,
                &self.task.org_id,
                &self.task.created_at,
                &self.task.expires_at,
            ];
            let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(4 + rows.len() * 5);
            params.extend_from_slice(&task);
            for e in rows {
                params.extend_from_slice(&[
                    &e.device_id as &dyn rusqlite::ToSql,
                    &e.key_block,
                    &e.key_id,
                    &e.kcv,
                    &e.generation,
                ]);
            }
            // RETURNING promises no order: each id comes back with its device (one execution per
            // device and task).
            by_device.clear();
            let returned = insert
                .query_map(params.as_slice(), |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(0)?)))
                .map_err(backend)?;
            for row in returned {
                let (device, id) = row.map_err(backend)?;
                by_device.insert(device, id);
            }
            for e in rows {
                let id = by_device.get(&e.device_id).ok_or_else(|| {
                    StoreError::Backend(format!("no execution id returned for device {}", e.device_id))
                })?;
                ids.push(*id);
            }
        }
        self.inserted += executions.len();
        Ok(ids)
    }
}

fn task_counts(conn: &Connection, task_id: i64) -> StoreResult<TaskCounts> {
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM executions WHERE task_id = ?1 GROUP BY state")
        .map_err(backend)?;
    let mut counts = TaskCounts::default();
    let rows = stmt.query_map([task_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(backend)?;
    for row in rows {
        let (state, n) = row.map_err(backend)?;
        if let Some(state) = ExecutionState::parse(&state) {
            counts.add(state, n);
        }
    }
    Ok(counts)
}

/// Ends one open execution and writes its record, in the caller's transaction. Returns false
/// (and writes nothing) if the execution is no longer open or the transition is not allowed.
fn end_execution(tx: &Transaction<'_>, ending: &Ending) -> StoreResult<bool> {
    // In the transition table, every state an execution can end in is reached from exactly the
    // open states, and `Queued` from none: so the state test below is `can_become`.
    if !ExecutionState::Queued.can_become(ending.state) {
        return Ok(false);
    }
    let sends = ending.sends;
    let device_id: Option<i64> = tx
        .prepare_cached(
            "UPDATE executions SET state = ?2, ended_at = ?3, result = ?4, delivered_at = COALESCE(delivered_at, ?5),
                    delivery_count = delivery_count + ?6
             WHERE id = ?1 AND state IN ('queued','delivered')
             RETURNING device_id",
        )
        .map_err(backend)?
        .query_row(
            params![
                ending.execution_id,
                ending.state.as_str(),
                ending.at,
                ending.result,
                sends.map(|s| s.first_at),
                sends.map_or(0, |s| s.count)
            ],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?;
    let Some(device_id) = device_id else { return Ok(false) };
    tx.prepare_cached(
        "INSERT INTO records (org_id, execution_id, task_id, device_id, sn, key_source, key_source_id, key_type, injection, result, error_code, at, key_id, kcv)
         SELECT e.org_id, e.id, e.task_id, e.device_id, d.sn, k.name, k.id, t.key_type, ?2, ?3, ?4, ?5, upper(hex(e.key_id)),
                CASE WHEN ?3 = 'succeeded' THEN e.kcv ELSE '' END
         FROM executions e JOIN devices d ON d.id = e.device_id JOIN tasks t ON t.id = e.task_id JOIN key_sources k ON k.id = t.key_source_id
         WHERE e.id = ?1",
    )
    .map_err(backend)?
    .execute(params![
        ending.execution_id,
        ending.injection,
        ending.state.as_str(),
        ending.result.filter(|code| *code != 0),
        ending.at
    ])
    .map_err(backend)?;
    if ending.lock_device {
        tx.prepare_cached("UPDATE devices SET locked = 1 WHERE id = ?1")
            .map_err(backend)?
            .execute([device_id])
            .map_err(backend)?;
    }
    Ok(true)
}

/// Appends an audit entry inside the caller's transaction.
fn audit_in(tx: &Transaction<'_>, e: &AuditEntry) -> StoreResult<()> {
    crash::audited(&e.action);
    tx.prepare_cached(
        "INSERT INTO audit (at, org_id, actor, token_id, action, object, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(backend)?
    .execute(params![e.at, e.org_id, e.actor, e.token_id, e.action, e.object, e.details.to_string()])
    .map_err(backend)?;
    Ok(())
}

/// Spends the GUDID if unused and unrevoked and installs the credentials; `None` if it was
/// already spent or revoked.
fn spend_gudid_in(
    tx: &Transaction<'_>,
    gudid_row_id: i64,
    device_id: i64,
    creds: &NewCredentials,
    at: Millis,
) -> StoreResult<Option<DeviceCredentials>> {
    let spent = tx
        .prepare_cached("UPDATE gudids SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL AND revoked_at IS NULL")
        .map_err(backend)?
        .execute(params![gudid_row_id, at])
        .map_err(backend)?;
    if spent != 1 {
        return Ok(None);
    }
    tx.prepare_cached(
        "UPDATE devices SET last_counter = ?2, x_pos_device_id = ?3, generation = generation + 1 WHERE id = ?1",
    )
    .map_err(backend)?
    .execute(params![device_id, creds.counter as i64, creds.x_pos_device_id])
    .map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO device_credentials (device_id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (device_id) DO UPDATE SET signing_key = ?2, kbpk_aes = ?3, kbpk_tdes = ?4, password_hash = ?5,
                                               broker_password_hash = ?6",
    )
    .map_err(backend)?
    .execute(params![
        device_id,
        creds.signing_key,
        creds.kbpk_aes,
        creds.kbpk_tdes,
        creds.password_hash,
        creds.broker_password_hash
    ])
    .map_err(backend)?;
    tx.prepare_cached(&format!("{SELECT_CREDENTIALS} WHERE d.id = ?1"))
        .map_err(backend)?
        .query_row([device_id], credentials_row)
        .map(Some)
        .map_err(backend)
}

fn in_list(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

impl Store for SqliteStore {
    fn create_org(&self, name: &str, at: Millis, audit: &Audit) -> StoreResult<OrgRow> {
        self.write(|tx| {
            tx.execute("INSERT INTO organizations (name, created_at) VALUES (?1, ?2)", params![name, at]).map_err(
                |e| match backend(e) {
                    StoreError::Conflict(_) => StoreError::Conflict(format!("organization {name:?} exists")),
                    other => other,
                },
            )?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, Some(id), &[]))?;
            Ok(OrgRow { id, name: name.to_string(), created_at: at })
        })
    }

    fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|c| {
            c.query_row("SELECT id, name, created_at FROM organizations WHERE name = ?1", [name], |r| {
                Ok(OrgRow { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? })
            })
            .optional()
            .map_err(backend)
        })
    }

    fn org(&self, id: i64) -> StoreResult<OrgRow> {
        self.read(|c| {
            c.query_row("SELECT id, name, created_at FROM organizations WHERE id = ?1", [id], |r| {
                Ok(OrgRow { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? })
            })
            .map_err(backend)
        })
    }

    fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id, name, created_at FROM organizations ORDER BY id").map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok(OrgRow { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? }))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn insert_token(
        &self,
        org_id: Option<i64>,
        role: Role,
        label: &str,
        hash: &[u8],
        at: Millis,
        audit: &Audit,
    ) -> StoreResult<TokenRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (org_id, role, label, token_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![org_id, role.as_str(), label, hash, at],
            )
            .map_err(backend)?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, org_id, &[("token_id", id.into())]))?;
            Ok(TokenRow { id, org_id, role, label: label.to_string() })
        })
    }

    fn token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<TokenRow>> {
        self.read(|c| {
            c.query_row("SELECT id, org_id, role, label FROM tokens WHERE token_hash = ?1", [hash], |r| {
                let role: String = r.get(2)?;
                Ok(TokenRow {
                    id: r.get(0)?,
                    org_id: r.get(1)?,
                    role: Role::parse(&role).unwrap_or(Role::Admin),
                    label: r.get(3)?,
                })
            })
            .optional()
            .map_err(backend)
        })
    }

    fn has_key_owner(&self) -> StoreResult<bool> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM tokens WHERE role = 'key_owner'", [], |r| r.get::<_, i64>(0))
                .map(|n| n > 0)
                .map_err(backend)
        })
    }

    fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        self.write(|tx| audit_in(tx, e))
    }

    fn list_audit(&self, org_id: Option<i64>, limit: i64, before: Option<i64>) -> StoreResult<Vec<AuditEntry>> {
        self.read(|c| {
            let sql = "SELECT id, at, org_id, actor, token_id, action, object, details FROM audit
                       WHERE (?1 IS NULL OR org_id = ?1) AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?2";
            let mut stmt = c.prepare(sql).map_err(backend)?;
            let rows = stmt
                .query_map(params![org_id, limit, before], |r| {
                    let details: String = r.get(7)?;
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        org_id: r.get(2)?,
                        actor: r.get(3)?,
                        token_id: r.get(4)?,
                        action: r.get(5)?,
                        object: r.get(6)?,
                        details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn insert_key_source(&self, row: &KeySourceRow, audit: &Audit) -> StoreResult<KeySourceRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO key_sources (org_id, name, algorithm, kcv, sealed, key_set_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.org_id, row.name, row.algorithm, row.kcv, row.sealed, row.key_set_id, row.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("key source {:?} exists", row.name)),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(KeySourceRow { id, ..row.clone() })
        })
    }

    fn list_key_sources(&self, org_id: i64) -> StoreResult<Vec<KeySourceRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 ORDER BY id"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], key_source_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn key_source(&self, org_id: i64, id: i64) -> StoreResult<KeySourceRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 AND id = ?2"),
                params![org_id, id],
                key_source_row,
            )
            .map_err(|_| StoreError::NotFound(format!("key source {id}")))
        })
    }

    fn key_source_by_name(&self, org_id: i64, name: &str) -> StoreResult<KeySourceRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 AND name = ?2"),
                params![org_id, name],
                key_source_row,
            )
            .map_err(|_| StoreError::NotFound(format!("key source {name:?}")))
        })
    }

    fn allocate_serials(&self, key_source_id: i64, count: i64) -> StoreResult<i64> {
        self.write(|tx| {
            let first: i64 = tx
                .query_row("SELECT next_serial FROM key_sources WHERE id = ?1", [key_source_id], |r| r.get(0))
                .map_err(backend)?;
            tx.execute(
                "UPDATE key_sources SET next_serial = next_serial + ?2 WHERE id = ?1",
                params![key_source_id, count],
            )
            .map_err(backend)?;
            Ok(first)
        })
    }

    fn insert_kek(&self, row: &KekRow, audit: &Audit) -> StoreResult<KekRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO keks (org_id, name, algorithm, kcv, sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.org_id, row.name, row.algorithm, row.kcv, row.sealed, row.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("KEK {:?} exists", row.name)),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(KekRow { id, ..row.clone() })
        })
    }

    fn list_keks(&self, org_id: Option<i64>) -> StoreResult<Vec<KekRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {KEK_COLUMNS} FROM keks WHERE ?1 IS NULL OR org_id = ?1 ORDER BY id"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], kek_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn kek_by_name(&self, org_id: i64, name: &str) -> StoreResult<KekRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEK_COLUMNS} FROM keks WHERE org_id = ?1 AND name = ?2"),
                params![org_id, name],
                kek_row,
            )
            .map_err(|_| StoreError::NotFound(format!("KEK {name:?}")))
        })
    }

    fn import_devices(&self, org_id: i64, rows: &[ImportRow], at: Millis, audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut conflicts = Vec::new();
            {
                let mut owner = tx.prepare_cached("SELECT org_id FROM devices WHERE sn = ?1").map_err(backend)?;
                for row in rows {
                    let existing: Option<i64> = owner.query_row([&row.sn], |r| r.get(0)).optional().map_err(backend)?;
                    if let Some(existing) = existing {
                        if existing != org_id {
                            conflicts.push(format!("line {}: SN {} is registered to another organization", row.line, row.sn));
                        }
                    }
                }
            }
            if !conflicts.is_empty() {
                return Err(StoreError::Conflict(conflicts.join("; ")));
            }
            let mut insert = tx
                .prepare_cached("INSERT INTO devices (org_id, sn, model, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(sn) DO NOTHING")
                .map_err(backend)?;
            let mut added = 0;
            for row in rows {
                added += insert.execute(params![org_id, row.sn, row.model, at]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[("imported", added.into())]))?;
            Ok(added)
        })
    }

    fn list_devices(&self, org_id: i64, f: &DeviceFilter) -> StoreResult<Vec<DeviceRow>> {
        self.read(|c| {
            let pattern = f.sn_contains.as_ref().map(|s| format!("%{}%", s.replace('%', "").replace('_', "\\_")));
            let sql = format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE org_id = ?1
                 AND (?2 IS NULL OR sn LIKE ?2 ESCAPE '\\')
                 AND (?3 IS NULL OR id IN (SELECT device_id FROM group_members WHERE group_id = ?3))
                 AND (?6 IS NULL OR sn > ?6)
                 ORDER BY sn LIMIT ?4 OFFSET ?5"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let limit = if f.limit <= 0 { i64::MAX } else { f.limit };
            let rows = stmt
                .query_map(params![org_id, pattern, f.group, limit, f.offset, f.after_sn], device_row)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn count_devices(&self, org_id: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM devices WHERE org_id = ?1", [org_id], |r| r.get(0)).map_err(backend)
        })
    }

    fn device(&self, org_id: i64, sn: &str) -> StoreResult<DeviceRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE org_id = ?1 AND sn = ?2"),
                params![org_id, sn],
                device_row,
            )
            .map_err(|_| StoreError::NotFound(format!("device {sn}")))
        })
    }

    fn device_by_id(&self, id: i64) -> StoreResult<DeviceRow> {
        self.read(|c| {
            c.query_row(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"), [id], device_row)
                .map_err(|_| StoreError::NotFound(format!("device #{id}")))
        })
    }

    fn devices_by_ids(&self, ids: &[i64]) -> StoreResult<Vec<DeviceRow>> {
        self.read(|c| {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id IN ({})", in_list(chunk.len()));
                let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(chunk.iter()), device_row).map_err(backend)?;
                for row in rows {
                    out.push(row.map_err(backend)?);
                }
            }
            Ok(out)
        })
    }

    fn device_org_by_sn(&self, sn: &str) -> StoreResult<Option<(i64, i64)>> {
        self.read(|c| {
            c.query_row("SELECT id, org_id FROM devices WHERE sn = ?1", [sn], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(backend)
        })
    }

    fn sn_owners(&self, sns: &[String]) -> StoreResult<Vec<(String, i64)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT org_id FROM devices WHERE sn = ?1").map_err(backend)?;
            let mut out = Vec::new();
            for sn in sns {
                let org: Option<i64> = stmt.query_row([sn], |r| r.get(0)).optional().map_err(backend)?;
                if let Some(org) = org {
                    out.push((sn.clone(), org));
                }
            }
            Ok(out)
        })
    }

    fn credentials(&self, sn: &str) -> StoreResult<Option<DeviceCredentials>> {
        self.read(|c| {
            c.query_row(&format!("{SELECT_CREDENTIALS} WHERE d.sn = ?1"), [sn], credentials_row)
                .optional()
                .map_err(backend)
        })
    }

    fn credentials_for(&self, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
        self.read(|c| credentials_in(c, ids))
    }

    fn all_password_hashes(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT d.sn, c.password_hash FROM devices d JOIN device_credentials c ON c.device_id = d.id
                     WHERE c.password_hash IS NOT NULL",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn broker_devices(&self) -> StoreResult<Vec<(String, Option<String>)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT d.sn, c.broker_password_hash FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id
                     ORDER BY d.sn",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn assign(&self, org_id: i64, ids: &[i64], key_source_id: Option<i64>, audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut stmt = tx
                .prepare_cached("UPDATE devices SET assigned_key_source = ?3 WHERE org_id = ?1 AND id = ?2")
                .map_err(backend)?;
            let mut n = 0;
            for id in ids {
                n += stmt.execute(params![org_id, id, key_source_id]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(n)
        })
    }

    fn set_unlock_pending(&self, device_id: i64, pending: bool, audit: Option<&Audit>) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("UPDATE devices SET unlock_pending = ?2 WHERE id = ?1", params![device_id, pending])
                .map_err(backend)?;
            if let Some(audit) = audit {
                audit_in(tx, &audit.entry(None, None, &[]))?;
            }
            Ok(())
        })
    }

    fn create_group(&self, org_id: i64, name: &str, description: &str, audit: &Audit) -> StoreResult<GroupRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO groups (org_id, name, description) VALUES (?1, ?2, ?3)",
                params![org_id, name, description],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("group {name:?} exists")),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(GroupRow { id, org_id, name: name.into(), description: description.into(), members: 0 })
        })
    }

    fn list_groups(&self, org_id: i64) -> StoreResult<Vec<GroupRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT g.id, g.org_id, g.name, g.description, (SELECT COUNT(*) FROM group_members m WHERE m.group_id = g.id)
                     FROM groups g WHERE g.org_id = ?1 ORDER BY g.name",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([org_id], |r| {
                    Ok(GroupRow { id: r.get(0)?, org_id: r.get(1)?, name: r.get(2)?, description: r.get(3)?, members: r.get(4)? })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn group_by_name(&self, org_id: i64, name: &str) -> StoreResult<GroupRow> {
        self.read(|c| {
            c.query_row(
                "SELECT g.id, g.org_id, g.name, g.description, (SELECT COUNT(*) FROM group_members m WHERE m.group_id = g.id)
                 FROM groups g WHERE g.org_id = ?1 AND g.name = ?2",
                params![org_id, name],
                |r| Ok(GroupRow { id: r.get(0)?, org_id: r.get(1)?, name: r.get(2)?, description: r.get(3)?, members: r.get(4)? }),
            )
            .map_err(|_| StoreError::NotFound(format!("group {name:?}")))
        })
    }

    fn add_group_members(&self, group_id: i64, ids: &[i64], audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO group_members (group_id, device_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )
                .map_err(backend)?;
            let mut n = 0;
            for id in ids {
                n += stmt.execute(params![group_id, id]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[("added", n.into())]))?;
            Ok(n)
        })
    }

    fn group_member_ids(&self, group_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT device_id FROM group_members WHERE group_id = ?1 ORDER BY device_id")
                .map_err(backend)?;
            let rows = stmt.query_map([group_id], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn device_ids_by_sn(&self, org_id: i64, sns: &[String]) -> StoreResult<Vec<(String, Option<i64>)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM devices WHERE org_id = ?1 AND sn = ?2").map_err(backend)?;
            sns.iter()
                .map(|sn| {
                    let id: Option<i64> =
                        stmt.query_row(params![org_id, sn], |r| r.get(0)).optional().map_err(backend)?;
                    Ok((sn.clone(), id))
                })
                .collect()
        })
    }

    fn insert_gudid(&self, row: &GudidRow) -> StoreResult<GudidRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by, provisioned_at,
                                     expires_at, used_at, bootstrap_hash, revoked_at, revoked_by)
                 VALUES (?1, ?2, ?3, X'', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    row.org_id,
                    row.device_id,
                    row.gudid_id,
                    row.sealed_mac_key,
                    row.provisioned_by,
                    row.provisioned_at,
                    row.expires_at,
                    row.used_at,
                    row.bootstrap_hash,
                    row.revoked_at,
                    row.revoked_by
                ],
            )
            .map_err(backend)?;
            Ok(GudidRow { id: tx.last_insert_rowid(), ..row.clone() })
        })
    }

    fn provision_gudids(
        &self,
        org_id: i64,
        gudids: &[NewGudid],
        at: Millis,
        actor: &Actor,
    ) -> StoreResult<Vec<ProvisionedGudid>> {
        self.write(|tx| {
            let mut devices = Vec::with_capacity(gudids.len());
            let mut unknown = Vec::new();
            {
                let mut find =
                    tx.prepare_cached("SELECT id FROM devices WHERE org_id = ?1 AND sn = ?2").map_err(backend)?;
                for g in gudids {
                    match find.query_row(params![org_id, g.sn], |r| r.get::<_, i64>(0)).optional().map_err(backend)? {
                        Some(id) => devices.push(id),
                        None => unknown.push(g.sn.clone()),
                    }
                }
            }
            if !unknown.is_empty() {
                return Err(unknown_sns_error(&unknown));
            }
            let mut out = Vec::with_capacity(gudids.len());
            for (g, device_id) in gudids.iter().zip(devices) {
                tx.prepare_cached(
                    "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by,
                                         provisioned_at, expires_at, bootstrap_hash)
                     VALUES (?1, ?2, ?3, X'', ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(backend)?
                .execute(params![
                    org_id,
                    device_id,
                    g.gudid_id,
                    g.sealed_mac_key,
                    actor.label,
                    at,
                    g.expires_at,
                    g.bootstrap_hash
                ])
                .map_err(backend)?;
                let id = tx.last_insert_rowid();
                let revoked: Vec<i64> = {
                    let mut stmt = tx
                        .prepare_cached(
                            "UPDATE gudids SET revoked_at = ?2, revoked_by = ?3
                             WHERE device_id = ?1 AND id <> ?4 AND used_at IS NULL AND revoked_at IS NULL
                               AND expires_at > ?2
                             RETURNING id",
                        )
                        .map_err(backend)?;
                    let rows =
                        stmt.query_map(params![device_id, at, actor.label, id], |r| r.get(0)).map_err(backend)?;
                    rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
                };
                for old in &revoked {
                    let details = serde_json::json!({"gudid": old, "reason": "replaced", "replaced_by": id});
                    audit_in(tx, &gudid_audit(org_id, actor, at, "gudid.revoke", &g.sn, details))?;
                }
                let details = serde_json::json!({"gudid": id, "expires_at": g.expires_at, "revoked": revoked});
                audit_in(tx, &gudid_audit(org_id, actor, at, "gudid.provision", &g.sn, details))?;
                let row = GudidRow {
                    id,
                    org_id,
                    device_id,
                    sn: g.sn.clone(),
                    gudid_id: g.gudid_id.clone(),
                    sealed_mac_key: g.sealed_mac_key.clone(),
                    bootstrap_hash: Some(g.bootstrap_hash.clone()),
                    provisioned_by: actor.label.clone(),
                    provisioned_at: at,
                    expires_at: g.expires_at,
                    used_at: None,
                    revoked_at: None,
                    revoked_by: None,
                };
                out.push(ProvisionedGudid { row, revoked });
            }
            Ok(out)
        })
    }

    fn revoke_gudid(&self, org_id: i64, id: i64, at: Millis, actor: &Actor) -> StoreResult<GudidRow> {
        self.write(|tx| {
            let row = tx
                .query_row(
                    &format!(
                        "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id
                         WHERE g.id = ?1 AND g.org_id = ?2"
                    ),
                    params![id, org_id],
                    gudid_row,
                )
                .optional()
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("no GUDID {id}")))?;
            if !row.is_live(at) {
                return Err(StoreError::Conflict(format!(
                    "GUDID {id} is {}: only a live GUDID can be revoked",
                    row.status(at)
                )));
            }
            let changed = tx
                .execute(
                    "UPDATE gudids SET revoked_at = ?2, revoked_by = ?3
                     WHERE id = ?1 AND used_at IS NULL AND revoked_at IS NULL",
                    params![id, at, actor.label],
                )
                .map_err(backend)?;
            if changed != 1 {
                return Err(StoreError::Conflict(format!("GUDID {id} was spent or revoked meanwhile")));
            }
            let details = serde_json::json!({"gudid": id, "reason": "revoked"});
            audit_in(tx, &gudid_audit(org_id, actor, at, "gudid.revoke", &row.sn, details))?;
            Ok(GudidRow { revoked_at: Some(at), revoked_by: Some(actor.label.clone()), ..row })
        })
    }

    fn live_bootstrap_hashes(
        &self,
        sn: Option<&str>,
        now: Millis,
        spent_after: Option<Millis>,
    ) -> StoreResult<Vec<(String, String)>> {
        // One SN (every bootstrap CONNECT) is two index searches: the device by its SN, its GUDIDs
        // by (org, device). `(?1 IS NULL OR d.sn = ?1)` in one statement made SQLite scan every
        // GUDID for every CONNECT, a connect phase quadratic in the fleet.
        let sql = match sn {
            Some(_) => {
                "SELECT d.sn, g.bootstrap_hash FROM devices d
                 JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
                 WHERE d.sn = ?1"
            }
            None => {
                "SELECT d.sn, g.bootstrap_hash FROM gudids g JOIN devices d ON d.id = g.device_id
                 WHERE ?1 IS NULL"
            }
        };
        self.read(|c| {
            // Live: not expired, unspent (or spent after `spent_after`), not revoked.
            let sql = format!(
                "{sql} AND g.expires_at > ?2 AND (g.used_at IS NULL OR g.used_at > ?3)
                   AND g.revoked_at IS NULL AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let spent_after = spent_after.unwrap_or(Millis::MAX);
            let rows =
                stmt.query_map(params![sn, now, spent_after], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn gudid_by_id(&self, gudid_id: &[u8]) -> StoreResult<Option<GudidRow>> {
        self.read(|c| {
            c.query_row(
                &format!(
                    "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id WHERE g.gudid_id = ?1"
                ),
                [gudid_id],
                gudid_row,
            )
            .optional()
            .map_err(backend)
        })
    }

    fn list_gudids(&self, org_id: i64, filter: &GudidFilter) -> StoreResult<Vec<GudidRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id
                     WHERE g.org_id = ?1 AND (?2 IS NULL OR d.sn = ?2)
                       AND (?3 IS NULL OR (g.used_at IS NULL AND g.revoked_at IS NULL AND g.expires_at > ?3))
                     ORDER BY g.id DESC LIMIT ?4"
                ))
                .map_err(backend)?;
            let limit = if filter.limit > 0 { filter.limit } else { -1 };
            let rows = stmt.query_map(params![org_id, filter.sn, filter.live_at, limit], gudid_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn spend_gudid(
        &self,
        gudid_row_id: i64,
        device_id: i64,
        creds: &NewCredentials,
        at: Millis,
    ) -> StoreResult<DeviceCredentials> {
        self.write(|tx| {
            spend_gudid_in(tx, gudid_row_id, device_id, creds, at)?
                .ok_or_else(|| StoreError::Conflict("GUDID already used".into()))
        })
    }

    fn create_task_with(
        &self,
        task: &NewTask,
        audit: &Audit,
        fill: &mut dyn FnMut(&mut dyn TaskSink) -> StoreResult<()>,
    ) -> StoreResult<TaskRow> {
        let (task_id, inserted) = self.write(|tx| {
            tx.execute(
                "INSERT INTO tasks (org_id, key_source_id, slot, key_type, created_at, expires_at, created_by, request_id, number)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, (SELECT COALESCE(MAX(number), 0) + 1 FROM tasks WHERE org_id = ?1))",
                params![
                    task.org_id,
                    task.key_source_id,
                    task.slot,
                    task.key_type,
                    task.created_at,
                    task.expires_at,
                    task.created_by,
                    task.request_id
                ],
            )
            .map_err(backend)?;
            let mut sink = SqliteTaskSink { tx, task, task_id: tx.last_insert_rowid(), inserted: 0 };
            sink.insert(&task.executions)?;
            fill(&mut sink)?;
            let (task_id, inserted) = (sink.task_id, sink.inserted);
            let number: i64 =
                tx.query_row("SELECT number FROM tasks WHERE id = ?1", [task_id], |r| r.get(0)).map_err(backend)?;
            audit_in(tx, &audit.entry(Some(format!("task:{number}")), None, &[("executions", inserted.into())]))?;
            Ok((task_id, inserted))
        })?;
        committed_task(self.task(task.org_id, task_id)?, inserted)
    }

    fn task_by_request_id(&self, org_id: i64, request_id: i64) -> StoreResult<Option<TaskRow>> {
        let id: Option<i64> = self.read(|c| {
            c.query_row(
                "SELECT id FROM tasks WHERE org_id = ?1 AND request_id = ?2",
                params![org_id, request_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })?;
        id.map(|id| self.task(org_id, id)).transpose()
    }

    fn list_tasks(
        &self,
        org_id: i64,
        unfinished: Option<bool>,
        limit: i64,
        before: Option<i64>,
    ) -> StoreResult<Vec<TaskRow>> {
        self.read(|c| {
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM tasks t JOIN key_sources k ON k.id = t.key_source_id
                 WHERE t.org_id = ?1 AND (?2 IS NULL OR
                    (EXISTS (SELECT 1 FROM executions e WHERE e.task_id = t.id AND e.state IN ('queued','delivered'))) = ?2)
                   AND (?4 IS NULL OR t.number < ?4)
                 ORDER BY t.number DESC LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt.query_map(params![org_id, unfinished, limit, before], task_row).map_err(backend)?;
            let mut tasks = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
            for t in &mut tasks {
                t.counts = task_counts(c, t.id)?;
            }
            Ok(tasks)
        })
    }

    fn task_id_by_number(&self, org_id: i64, number: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT id FROM tasks WHERE org_id = ?1 AND number = ?2", params![org_id, number], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("task {number}")))
        })
    }

    fn task(&self, org_id: i64, id: i64) -> StoreResult<TaskRow> {
        self.read(|c| {
            let mut t = c
                .query_row(
                    &format!("SELECT {TASK_COLUMNS} FROM tasks t JOIN key_sources k ON k.id = t.key_source_id WHERE t.org_id = ?1 AND t.id = ?2"),
                    params![org_id, id],
                    task_row,
                )
                .map_err(|_| StoreError::NotFound(format!("task {id}")))?;
            t.counts = task_counts(c, id)?;
            Ok(t)
        })
    }

    fn task_executions_page(&self, task_id: i64, offset: i64, limit: Option<i64>) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.task_id = ?1 ORDER BY e.id LIMIT ?2 OFFSET ?3"
                ))
                .map_err(backend)?;
            // SQLite: a negative LIMIT is no limit.
            let rows = stmt.query_map(params![task_id, limit.unwrap_or(-1), offset.max(0)], execution_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn open_executions(&self) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.state IN ('queued','delivered') ORDER BY e.id"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([], execution_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn open_executions_for_device(&self, device_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.device_id = ?1 AND e.state IN ('queued','delivered') ORDER BY e.id"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([device_id], execution_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn still_open(&self, ids: &[i64]) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut out = Vec::new();
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let sql = format!(
                    "SELECT id FROM executions WHERE state IN ('queued','delivered') AND id IN ({})",
                    in_list(chunk.len())
                );
                let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(chunk.iter()), |r| r.get(0)).map_err(backend)?;
                for row in rows {
                    out.push(row.map_err(backend)?);
                }
            }
            Ok(out)
        })
    }

    fn open_execution_device_ids(&self, org_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT device_id FROM executions WHERE org_id = ?1 AND state IN ('queued','delivered')",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn execution(&self, id: i64) -> StoreResult<ExecutionRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {EXECUTION_COLUMNS} FROM {EXECUTION_FROM} WHERE e.id = ?1"),
                [id],
                execution_row,
            )
            .map_err(|_| StoreError::NotFound(format!("execution {id}")))
        })
    }

    fn rewrap_execution(&self, id: i64, key_block: &str, generation: i64) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE executions SET key_block = ?2, generation = ?3 WHERE id = ?1 AND state IN ('queued','delivered')",
                params![id, key_block, generation],
            )
            .map_err(backend)?;
            Ok(())
        })
    }

    fn stop_task(&self, org_id: i64, task_id: i64, at: Millis, audit: &Audit) -> StoreResult<Vec<i64>> {
        self.write(|tx| {
            let owned: Option<i64> = tx
                .query_row("SELECT id FROM tasks WHERE org_id = ?1 AND id = ?2", params![org_id, task_id], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            if owned.is_none() {
                return Err(StoreError::NotFound(format!("task {task_id}")));
            }
            let ids: Vec<i64> = {
                let mut stmt = tx
                    .prepare("SELECT id FROM executions WHERE task_id = ?1 AND state IN ('queued','delivered')")
                    .map_err(backend)?;
                let rows = stmt.query_map([task_id], |r| r.get(0)).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            for id in &ids {
                end_execution(
                    tx,
                    &Ending {
                        execution_id: *id,
                        state: ExecutionState::Terminated,
                        result: None,
                        injection: "auto".into(),
                        at,
                        lock_device: false,
                        sends: None,
                    },
                )?;
            }
            tx.execute("UPDATE tasks SET stopped_at = COALESCE(stopped_at, ?2) WHERE id = ?1", params![task_id, at])
                .map_err(backend)?;
            audit_in(tx, &audit.entry(None, None, &[("terminated", ids.len().into())]))?;
            Ok(ids)
        })
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<(i64, i64)>> {
        self.write(|tx| {
            let due: Vec<(i64, i64)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, org_id FROM executions WHERE state IN ('queued','delivered') AND deadline <= ?1",
                    )
                    .map_err(backend)?;
                let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            for (id, _) in &due {
                end_execution(
                    tx,
                    &Ending {
                        execution_id: *id,
                        state: ExecutionState::Expired,
                        result: None,
                        injection: "auto".into(),
                        at: now,
                        lock_device: false,
                        sends: None,
                    },
                )?;
            }
            Ok(due)
        })
    }

    fn apply_batch(&self, writes: &[Write]) -> StoreResult<BatchOutcome> {
        self.write(|tx| {
            let mut outcome = BatchOutcome::default();
            for w in writes {
                match w {
                    Write::Report(r) => {
                        tx.prepare_cached(
                            "UPDATE devices SET model = ?2, rom_version = ?3, app_version = ?4, region = ?5, debug_mode = ?6,
                                    debug_key_present = ?7, locked = ?8, slots = ?9, last_seen = ?10,
                                    unlock_pending = CASE WHEN ?8 THEN unlock_pending ELSE 0 END WHERE id = ?1",
                        )
                        .map_err(backend)?
                        .execute(params![
                            r.device_id,
                            r.model,
                            r.rom_version,
                            r.app_version,
                            r.region,
                            r.debug_mode,
                            r.debug_key_present,
                            r.locked,
                            r.slots_json,
                            r.at
                        ])
                        .map_err(backend)?;
                    }
                    Write::Counter { device_id, counter } => {
                        tx.prepare_cached("UPDATE devices SET last_counter = MAX(last_counter, ?2) WHERE id = ?1")
                            .map_err(backend)?
                            .execute(params![device_id, *counter as i64])
                            .map_err(backend)?;
                    }
                    Write::Seen { device_id, at } => {
                        tx.prepare_cached("UPDATE devices SET last_seen = ?2 WHERE id = ?1")
                            .map_err(backend)?
                            .execute(params![device_id, at])
                            .map_err(backend)?;
                    }
                    Write::Delivered { execution_id, at } => {
                        tx.prepare_cached(
                            "UPDATE executions SET state = 'delivered', delivered_at = COALESCE(delivered_at, ?2),
                                    delivery_count = delivery_count + 1
                             WHERE id = ?1 AND state IN ('queued','delivered')",
                        )
                        .map_err(backend)?
                        .execute(params![execution_id, at])
                        .map_err(backend)?;
                    }
                    Write::End(ending) => {
                        if end_execution(tx, ending)? {
                            outcome.ended.push((ending.execution_id, ending.state));
                        }
                    }
                    Write::Initialise { gudid_row, device_id, creds, at } => {
                        let installed = spend_gudid_in(tx, *gudid_row, *device_id, creds, *at)?;
                        outcome.initialised.push((*gudid_row, installed));
                    }
                }
            }
            Ok(outcome)
        })
    }

    fn list_records(&self, org_id: i64, f: &RecordFilter) -> StoreResult<Vec<RecordRow>> {
        self.read(|c| {
            let sql = format!(
                "SELECT {RECORD_COLUMNS} FROM records WHERE org_id = ?1 AND (?2 IS NULL OR sn = ?2) AND (?3 IS NULL OR task_id = ?3)
                 AND (?6 IS NULL OR id < ?6)
                 ORDER BY id DESC LIMIT ?4 OFFSET ?5"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let limit = if f.limit <= 0 { i64::MAX } else { f.limit };
            let rows = stmt.query_map(params![org_id, f.sn, f.task_id, limit, f.offset, f.before_id], record_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn billing(&self, org_id: i64) -> StoreResult<Vec<BillingRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT key_source, strftime('%Y-%m', at / 1000, 'unixepoch') AS month, COUNT(*) FROM records
                     WHERE org_id = ?1 AND result = 'succeeded' GROUP BY key_source, month ORDER BY month, key_source",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([org_id], |r| Ok(BillingRow { key_source: r.get(0)?, month: r.get(1)?, keys: r.get(2)? }))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn count_records_for_execution(&self, execution_id: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM records WHERE execution_id = ?1", [execution_id], |r| r.get(0))
                .map_err(backend)
        })
    }

    fn execution_state_counts(&self) -> StoreResult<Vec<(i64, ExecutionState, i64)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT org_id, state, COUNT(*) FROM executions GROUP BY org_id, state")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (org, state, n) = row.map_err(backend)?;
                if let Some(state) = ExecutionState::parse(&state) {
                    out.push((org, state, n));
                }
            }
            Ok(out)
        })
    }

    fn expiring_within(&self, now: Millis, within_ms: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM executions WHERE state IN ('queued','delivered') AND deadline <= ?1",
                [now + within_ms],
                |r| r.get(0),
            )
            .map_err(backend)
        })
    }

    fn mark(&self, key: &str) -> StoreResult<Option<i64>> {
        Ok(parse_mark(self.meta(key)?))
    }

    fn raise_mark(&self, key: &str, value: i64) -> StoreResult<i64> {
        self.write(|tx| {
            let current: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            let current = parse_mark(current);
            let raised = current.map_or(value, |c| c.max(value));
            if current != Some(raised) {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                    params![key, raised.to_string()],
                )
                .map_err(backend)?;
            }
            Ok(raised)
        })
    }
}

#[cfg(test)]
mod tests {
    /// The audit entry of an action in these tests.
    fn audit(action: &'static str) -> crate::store::Audit {
        crate::store::Audit::new(&crate::store::Actor::named("test"), None, action, "", serde_json::json!({}), 0)
    }
    use super::*;

    fn store() -> (SqliteStore, std::path::PathBuf) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rki-sqlite-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        (SqliteStore::open(&dir.join("rki.sqlite")).expect("open"), dir)
    }

    fn execution(device_id: i64, i: usize) -> NewExecution {
        NewExecution {
            device_id,
            key_block: format!("B0096P0TE00N0000{i:04}"),
            key_id: vec![0xFF, 0xFF, 0x98, 0x76, 0x54, 0, 0, i as u8],
            kcv: format!("{:06X}", 0xA0_0000 + i),
            generation: 1,
        }
    }

    #[test]
    fn the_endings_state_test_is_the_transition_table() {
        // `end_execution` tests `state IN ('queued','delivered')` once `Queued.can_become(next)`:
        // that is `can_become` only while every open state allows the same next states and no
        // other state allows any.
        for next in ExecutionState::ALL {
            for from in ExecutionState::ALL {
                let by_the_sql = from.is_open() && ExecutionState::Queued.can_become(next);
                assert_eq!(from.can_become(next), by_the_sql, "{from} → {next}");
            }
        }
    }

    #[test]
    fn a_streamed_task_is_all_or_nothing_and_returns_each_execution_id() {
        let (st, dir) = store();
        let org = st.create_org("acme", 1, &audit("org.create")).expect("org");
        let source = st
            .insert_key_source(
                &KeySourceRow {
                    id: 0,
                    org_id: org.id,
                    name: "bdk".into(),
                    algorithm: "tdes".into(),
                    kcv: "ABCDEF".into(),
                    sealed: "sealed:bdk".into(),
                    key_set_id: "FFFF987654".into(),
                    created_at: 1,
                },
                &audit("key_source.authorize"),
            )
            .expect("key source");
        // More than one INSERT statement's worth, and a remainder.
        let n = EXECUTIONS_PER_INSERT * 2 + 5;
        let rows: Vec<ImportRow> =
            (0..n).map(|i| ImportRow { line: i + 2, sn: format!("SN{i:04}"), model: None }).collect();
        st.import_devices(org.id, &rows, 1, &audit("devices.upload")).expect("import");
        let mut devices = st.list_devices(org.id, &DeviceFilter::default()).expect("devices");
        devices.sort_by_key(|d| d.id);
        let task = NewTask {
            org_id: org.id,
            key_source_id: source.id,
            slot: 1,
            key_type: "ipek".into(),
            created_at: 10,
            expires_at: 20,
            created_by: "ops".into(),
            request_id: None,
            executions: Vec::new(),
        };
        // A failure after some executions were inserted leaves no task and no execution.
        let failed = st.create_task_with(&task, &audit("task.create"), &mut |sink| {
            sink.insert(&[execution(devices[0].id, 0)])?;
            Err(StoreError::Backend("derivation failed".into()))
        });
        assert!(failed.is_err());
        assert!(st.list_tasks(org.id, None, 10, None).expect("tasks").is_empty());
        assert!(st.open_executions().expect("open").is_empty());
        // Uninitialised devices have nothing to derive for.
        let ids: Vec<i64> = devices.iter().map(|d| d.id).collect();
        let mut returned = Vec::new();
        let row = st
            .create_task_with(&task, &audit("task.create"), &mut |sink| {
                returned.clear();
                assert!(sink.derive_targets(&ids, true)?.is_empty());
                let (first, rest) = devices.split_at(3);
                for part in [first, rest] {
                    let executions: Vec<NewExecution> = part.iter().map(|d| execution(d.id, d.id as usize)).collect();
                    returned.extend(sink.insert(&executions)?.into_iter().zip(part.iter().map(|d| d.id)));
                }
                Ok(())
            })
            .expect("task");
        assert_eq!(row.counts.total as usize, n);
        assert_eq!(row.counts.queued as usize, n);
        let stored = st.task_executions(row.id).expect("executions");
        assert_eq!(stored.len(), n);
        for (id, device_id) in returned {
            let e = stored.iter().find(|e| e.id == id).expect("returned id stored");
            assert_eq!(e.device_id, device_id);
            assert_eq!(e.key_block, format!("B0096P0TE00N0000{:04}", device_id));
            assert_eq!((e.created_at, e.deadline), (10, 20));
        }
        drop(st);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_wal_is_copied_into_the_database_file_by_the_background_checkpointer() {
        let (st, dir) = store();
        let db = dir.join("rki.sqlite");
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let before = size(&db);
        // ~4 MiB in a few commits: far past SQLite's 1,000-page automatic checkpoint, which the
        // writer does not run (`wal_autocheckpoint = 0`), so only the checkpointer grows the file.
        let value = "x".repeat(512 * 1024);
        for i in 0..8 {
            st.set_meta(&format!("filler-{i}"), &value).expect("write");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size(&db) < before + 4 * 1024 * 1024 {
            assert!(std::time::Instant::now() < deadline, "the WAL was not checkpointed within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Everything written is still read back, from the database file and what is left of the WAL.
        assert_eq!(st.meta("filler-7").expect("read").as_deref(), Some(value.as_str()));
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
