//! SQLite implementation of [`Store`]: WAL mode, `synchronous = FULL`, one writer connection and a
//! few reader connections. Chosen over redb because the schema is relational (tasks, executions,
//! records, groups), SQL carries over to the PostgreSQL store unchanged in spirit, and SQLite's
//! crash safety is the most tested there is.
//!
//! **Layout.** This file opens the database (connections, checkpointer, migrations) and holds
//! what several roles share (ending an execution, auditing, spending a GUDID); each role of
//! [`Store`] is implemented in a file of its own: `registry` (with the audit log), `key_sources`,
//! `gudids`, `tasks` and `delivery`. Rows are read by the shared mappers of `store::rows`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::migrations;
use super::rows::*;
use super::*;

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
        let conn = open_connection(path, READER_CACHE_KIB)?;
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

pub(crate) fn backend(e: rusqlite::Error) -> StoreError {
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
        // A shared row mapper's error, carried through rusqlite by `mapped`.
        rusqlite::Error::FromSqlConversionFailure(_, _, e) if e.is::<StoreError>() => {
            match e.downcast::<StoreError>() {
                Ok(store) => *store,
                Err(other) => StoreError::Backend(other.to_string()),
            }
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// Page cache of the writer, in KiB: the B-tree pages a large task's inserts touch.
const WRITER_CACHE_KIB: u32 = 65536;
/// Page cache of each reader and of the checkpointer, in KiB. A reader reads a row here and a row
/// there (a GUDID, a device's credentials, a page of records): its misses are served by the
/// kernel's page cache, which every connection shares, while a connection's own cache is private
/// memory that grew to the whole database in every reader (4 × 35 MB at 19,000 terminals).
const READER_CACHE_KIB: u32 = 2048;

/// Prepared statements each connection keeps (rusqlite's default is 16). The writer's batch runs
/// up to 14 distinct ones, and task creation, the sweeps and the channel more beside them; a
/// reader serves the message path and the admin API alike. A statement evicted is parsed again.
const STATEMENT_CACHE: usize = 64;

/// `query_row` through the connection's statement cache. rusqlite's `Connection::query_row`
/// parses and plans its SQL at every call: for a read made at every CreateKey or CONNECT (a
/// GUDID, a device by SN), that was 4 % of the gateway's CPU in a 19,000-terminal connect phase.
pub(super) fn cached_row<T, P, F>(c: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
{
    c.prepare_cached(sql)?.query_row(params, f)
}

fn open_connection(path: &Path, cache_kib: u32) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 10000;
         PRAGMA cache_size = -{cache_kib};"
    ))
    .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// The schema version this build migrates a store to.
    pub const SCHEMA_VERSION: usize = migrations::SQLITE.len();

    /// Opens (creating if needed) the database at `path` and runs pending migrations.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut writer = open_connection(path, WRITER_CACHE_KIB)?;
        migrate(&mut writer)?;
        writer.execute_batch("PRAGMA wal_autocheckpoint = 0;").map_err(backend)?;
        let readers = (0..READERS)
            .map(|_| open_connection(path, READER_CACHE_KIB).map(Mutex::new))
            .collect::<StoreResult<Vec<_>>>()?;
        let checkpointer = Checkpointer::start(path)?;
        Ok(Self { writer: Mutex::new(writer), readers, next_reader: AtomicUsize::new(0), _checkpointer: checkpointer })
    }

    pub(crate) fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
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

    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
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
        let mut conn = open_connection(path, READER_CACHE_KIB)?;
        migrate_to(&mut conn, version)
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    migrate_to(conn, migrations::SQLITE.len())
}

/// Runs the migrations after the database's version, up to `version`.
fn migrate_to(conn: &mut Connection, version: usize) -> StoreResult<()> {
    migrations::run(&mut Ledger(conn), migrations::SQLITE, version)
}

/// SQLite's schema version is `PRAGMA user_version`, set in the migration's own transaction.
struct Ledger<'c>(&'c mut Connection);

impl migrations::Ledger for Ledger<'_> {
    type Error = StoreError;

    fn step(&mut self, next: &migrations::Next<'_>) -> StoreResult<bool> {
        let tx = self.0.transaction().map_err(backend)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
        let Some((version, migration)) = next(current)? else { return Ok(false) };
        tx.execute_batch(migration.sql).map_err(backend)?;
        tx.execute_batch(&format!("PRAGMA user_version = {version}")).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(true)
    }
}

const DEVICE_COLUMNS: &str = device_columns!();
const SELECT_CREDENTIALS: &str = select_credentials!();
const KEY_SOURCE_COLUMNS: &str = key_source_columns!();
const KEK_COLUMNS: &str = kek_columns!();
const GUDID_COLUMNS: &str = gudid_columns!();
const TASK_COLUMNS: &str = task_columns!();
const EXECUTION_COLUMNS: &str = execution_columns!();
const EXECUTION_FROM: &str = execution_from!();
const RECORD_COLUMNS: &str = record_columns!();

/// A shared row mapper ([`super::rows`]) as rusqlite's row callback: its error travels boxed,
/// and [`backend`] unboxes it.
fn mapped<'s, T>(r: &Row<'s>, map: impl FnOnce(&Row<'s>) -> StoreResult<T>) -> rusqlite::Result<T> {
    map(r).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Null, Box::new(e)))
}

/// `NotFound(what)` when there is no row; any other failure as it is (a row that cannot be read
/// is corruption, not absence).
fn or_not_found(what: String) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| match e {
        rusqlite::Error::QueryReturnedNoRows => StoreError::NotFound(what),
        other => backend(other),
    }
}

/// The credentials of those of `ids` that are initialised, on any connection.
fn credentials_in(c: &Connection, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let sql = format!("{SELECT_CREDENTIALS} WHERE d.id IN ({})", in_list(chunk.len()));
        let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(chunk.iter()), |r| mapped(r, credentials_row))
            .map_err(backend)?;
        for row in rows {
            out.push(row.map_err(backend)?);
        }
    }
    Ok(out)
}

/// Ends each of `ids` still open in `state` without an ack (expired, terminated), writes its
/// record and the channel's events, in the caller's transaction; the ids it ended.
pub(super) fn end_without_ack(
    tx: &Transaction<'_>,
    ids: &[i64],
    state: ExecutionState,
    at: Millis,
) -> StoreResult<Vec<i64>> {
    let mut ended = Vec::with_capacity(ids.len());
    let mut ender = Ender::new(tx)?;
    for id in ids {
        let ending = Ending {
            execution_id: *id,
            state,
            result: None,
            injection: "auto".into(),
            at,
            lock_device: false,
            sends: None,
        };
        if ender.end(&ending)? {
            ended.push(*id);
        }
    }
    drop(ender);
    crate::store::sqlite_channel::on_executions_ended(tx, &ended)?;
    Ok(ended)
}

/// Ends open executions and writes their records, in the caller's transaction: its statements
/// are prepared once for the transaction, not looked up in rusqlite's statement cache at each
/// ending (each lookup hashes the SQL text: a tenth of the committer's time in a push).
///
/// Each statement changes one row and is neither `INSERT … SELECT` nor `… RETURNING` (which SQLite
/// runs as a trigger): a statement that may write several rows and abort on a constraint first
/// copies every page it touches into a statement journal, and those copies (4 KiB `memmove`s
/// under `subjournalPageIfRequired`) were the largest single cost of recording an ack.
pub(super) struct Ender<'t> {
    end: rusqlite::CachedStatement<'t>,
    read: rusqlite::CachedStatement<'t>,
    record: rusqlite::CachedStatement<'t>,
    lock: rusqlite::CachedStatement<'t>,
}

impl<'t> Ender<'t> {
    pub(super) fn new(tx: &'t Transaction<'_>) -> StoreResult<Self> {
        Ok(Self {
            end: tx
                .prepare_cached(
                    "UPDATE executions SET state = ?2, ended_at = ?3, result = ?4, delivered_at = COALESCE(delivered_at, ?5),
                            delivery_count = delivery_count + ?6
                     WHERE id = ?1 AND state IN ('queued','delivered')",
                )
                .map_err(backend)?,
            // What the record copies, read by primary keys.
            read: tx
                .prepare_cached(
                    "SELECT e.org_id, e.task_id, e.device_id, d.sn, k.name, k.id, t.key_type, upper(hex(e.key_id)), e.kcv
                     FROM executions e JOIN devices d ON d.id = e.device_id JOIN tasks t ON t.id = e.task_id
                          JOIN key_sources k ON k.id = t.key_source_id
                     WHERE e.id = ?1",
                )
                .map_err(backend)?,
            record: tx
                .prepare_cached(
                    "INSERT INTO records (org_id, execution_id, task_id, device_id, sn, key_source, key_source_id, key_type,
                                          injection, result, error_code, at, key_id, kcv)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(backend)?,
            lock: tx.prepare_cached("UPDATE devices SET locked = 1 WHERE id = ?1").map_err(backend)?,
        })
    }

    /// Ends one open execution and writes its record. Returns false (and writes nothing) if the
    /// execution is no longer open or the transition is not allowed.
    pub(super) fn end(&mut self, ending: &Ending) -> StoreResult<bool> {
        // In the transition table, every state an execution can end in is reached from exactly
        // the open states, and `Queued` from none: so the state test below is `can_become`.
        if !ExecutionState::Queued.can_become(ending.state) {
            return Ok(false);
        }
        let sends = ending.sends;
        let ended = self
            .end
            .execute(params![
                ending.execution_id,
                ending.state.as_str(),
                ending.at,
                ending.result,
                sends.map(|s| s.first_at),
                sends.map_or(0, |s| s.count)
            ])
            .map_err(backend)?;
        if ended != 1 {
            return Ok(false);
        }
        let copied: RecordCopy = self
            .read
            .query_row([ending.execution_id], |r| {
                Ok(RecordCopy {
                    org_id: r.get(0)?,
                    task_id: r.get(1)?,
                    device_id: r.get(2)?,
                    sn: r.get(3)?,
                    key_source: r.get(4)?,
                    key_source_id: r.get(5)?,
                    key_type: r.get(6)?,
                    key_id: r.get(7)?,
                    kcv: r.get(8)?,
                })
            })
            .map_err(backend)?;
        let kcv = if ending.state == ExecutionState::Succeeded { copied.kcv.as_str() } else { "" };
        self.record
            .execute(params![
                copied.org_id,
                ending.execution_id,
                copied.task_id,
                copied.device_id,
                copied.sn,
                copied.key_source,
                copied.key_source_id,
                copied.key_type,
                ending.injection,
                ending.state.as_str(),
                ending.result.filter(|code| *code != 0),
                ending.at,
                copied.key_id,
                kcv
            ])
            .map_err(backend)?;
        if ending.lock_device {
            self.lock.execute([copied.device_id]).map_err(backend)?;
        }
        Ok(true)
    }
}

/// What a record copies from its execution, its device, its task and its key source.
struct RecordCopy {
    org_id: i64,
    task_id: i64,
    device_id: i64,
    sn: String,
    key_source: String,
    key_source_id: i64,
    key_type: String,
    key_id: String,
    kcv: String,
}

/// Appends an audit entry inside the caller's transaction.
pub(crate) fn audit_in(tx: &Transaction<'_>, e: &AuditEntry) -> StoreResult<()> {
    crash::audited(&e.action);
    tx.prepare_cached(
        "INSERT INTO audit (at, org_id, actor, token_id, action, object, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(backend)?
    .execute(params![e.at, e.org_id, e.actor, e.token_id, e.action, e.object, e.details.to_string()])
    .map_err(backend)?;
    Ok(())
}

/// Spends the GUDID if unused (or spent and awaiting proof, `GudidRow::awaits_proof`, by a
/// CreateKey newer than the one answered: a replay is not answered anew) and unrevoked, and
/// installs the credentials; `None` if it was spent for good or revoked.
fn spend_gudid_in(
    tx: &Transaction<'_>,
    gudid_row_id: i64,
    device_id: i64,
    creds: &NewCredentials,
    at: Millis,
) -> StoreResult<Option<DeviceCredentials>> {
    let spent = tx
        .prepare_cached(
            "UPDATE gudids SET used_at = COALESCE(used_at, ?2)
                 WHERE id = ?1 AND revoked_at IS NULL
                   AND (used_at IS NULL OR (proven_at IS NULL AND used_at > ?3 AND expires_at > ?2
                                            AND ?4 > (SELECT last_counter FROM devices WHERE id = gudids.device_id)))",
        )
        .map_err(backend)?
        .execute(params![gudid_row_id, at, at - GUDID_PROOF_WINDOW_MS, creds.counter as i64])
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
        .query_row([device_id], |r| mapped(r, credentials_row))
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

mod delivery;
mod gudids;
mod key_sources;
mod registry;
pub(crate) mod tasks;

#[cfg(test)]
mod tests {
    /// The audit entry of an action in these tests.
    fn audit(action: &'static str) -> crate::store::Audit {
        crate::store::Audit::new(&crate::store::Actor::named("test"), None, action, "", serde_json::json!({}), 0)
    }
    use super::tasks::EXECUTIONS_PER_INSERT;
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
                    algorithm: "tdes2".into(),
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
