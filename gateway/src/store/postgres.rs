//! PostgreSQL implementation of [`Store`], for several gateway nodes on one database.
//!
//! **Driver.** The synchronous `postgres` crate (rust-postgres over tokio-postgres): the trait is
//! synchronous and the engine already calls it from `spawn_blocking` threads, so an async driver
//! would only add a runtime hop. Each `postgres::Client` drives its own connection on a private
//! current-thread runtime, so a method must never be called from inside an async task: tokio
//! refuses to block there and panics, and the client's drop panics again while unwinding, which
//! aborts the process. The engine's `blocking` helper (`spawn_blocking`) is the way in.
//!
//! **Pool.** A fixed number of connections in a `Mutex<Vec<_>>` with a `Condvar` (`Pool`):
//! opened lazily, each with its own cache of prepared statements, dropped when found closed.
//! No pool crate: r2d2 and deadpool bring a dependency tree and a health-check protocol for what
//! is forty lines here.
//!
//! **Several nodes.** Every method is one transaction at READ COMMITTED. What two nodes may do
//! at once is made safe by the statements themselves, not by a lock in this process:
//! - an execution ends in `UPDATE … WHERE id = … AND state IN (open states) RETURNING …`: a
//!   second ending waits for the first's row lock, re-reads the row, finds it closed and is
//!   skipped, so it neither ends it again nor writes a second record (and `records` has
//!   `UNIQUE (execution_id)` behind it);
//! - the expiry sweep claims due executions with `FOR UPDATE SKIP LOCKED`, so two nodes
//!   sweeping at once expire each execution once;
//! - serials are allocated by `UPDATE … SET next_serial = next_serial + n RETURNING …`;
//! - a GUDID is spent by `UPDATE … WHERE used_at IS NULL`;
//! - migrations run under an advisory lock, one node at a time.
//!
//! A transaction that failed before its COMMIT without writing anything is run again, with
//! doubling backoff (`TRANSIENT_TRIES_MAX`): a deadlock or serialization failure (two nodes'
//! batches touching the same rows in another order), a session the server ended (restart,
//! failover), prepared statements gone stale (another node changed a column's type); the last
//! two on a fresh connection. A COMMIT whose outcome is unknown is reported, never run again.
//!
//! **Batches.** [`Store::apply_batch`] must give exactly the result of applying its writes one by
//! one, in order (SQLite does that). One statement per write would cost one round trip each, so
//! the writes are grouped into *rounds* (`plan_rounds`) and each round applies one set-based
//! statement per kind of write: a batch of a thousand acks is a handful of statements.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

use super::*;

/// Schema migrations, applied in order; `schema_migrations` holds one row per migration run,
/// numbered like SQLite's `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres_schema.sql"),
    // 2: Mosquitto password hashes for the external-broker mode.
    "ALTER TABLE devices ADD COLUMN broker_password_hash TEXT;",
    // 3: cluster-wide re-delivery: the last send (any node) and a node's claim on the next one.
    "ALTER TABLE executions ADD COLUMN last_sent_at BIGINT, ADD COLUMN retry_claimed_until BIGINT;",
    // 4: a device's credentials in a table of their own (as SQLite's schema 4): the device row,
    // rewritten on every ack and hello, no longer carries them into each new row version.
    "CREATE TABLE device_credentials (
         device_id            BIGINT PRIMARY KEY REFERENCES devices(id),
         signing_key          TEXT NOT NULL,
         kbpk_aes             TEXT,
         kbpk_tdes            TEXT,
         password_hash        BYTEA,
         broker_password_hash TEXT
     );
     INSERT INTO device_credentials (device_id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
         SELECT id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash FROM devices
         WHERE signing_key IS NOT NULL;
     ALTER TABLE devices DROP COLUMN signing_key, DROP COLUMN kbpk_aes, DROP COLUMN kbpk_tdes,
         DROP COLUMN password_hash, DROP COLUMN broker_password_hash;",
    // 5: the hash of each GUDID's bootstrap password (as SQLite's schema 5).
    "ALTER TABLE gudids ADD COLUMN bootstrap_hash TEXT;",
    // 6: key-encryption keys (as SQLite's schema 6), entered once per organization; BDKs then
    // arrive as TR-31 key blocks under them.
    "CREATE TABLE keks (
         id         BIGSERIAL PRIMARY KEY,
         org_id     BIGINT NOT NULL REFERENCES organizations(id),
         name       TEXT NOT NULL,
         algorithm  TEXT NOT NULL,
         kcv        TEXT NOT NULL,
         sealed     TEXT NOT NULL,
         created_at BIGINT NOT NULL,
         UNIQUE (org_id, name)
     );",
    // 7: GUDID custody (as SQLite's schema 7): each GUDID's MAC key sealed under the master key
    // (the clear `mac_key` column is emptied by the start-time re-seal and written empty from
    // now on); revocation; the unspent GUDIDs of a device found by index.
    "ALTER TABLE gudids ADD COLUMN sealed_mac_key TEXT, ADD COLUMN revoked_at BIGINT, ADD COLUMN revoked_by TEXT;
     CREATE INDEX gudids_device_unspent ON gudids(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;",
    // 8 (as SQLite's schema 8): tasks numbered per organization: the API shows the number, so
    // one organization cannot count another's tasks from their ids.
    "ALTER TABLE tasks ADD COLUMN number BIGINT;
     UPDATE tasks SET number = (SELECT COUNT(*) FROM tasks t2 WHERE t2.org_id = tasks.org_id AND t2.id <= tasks.id);
     CREATE UNIQUE INDEX tasks_org_number ON tasks (org_id, number);",
];

/// Advisory lock key held while migrating, so nodes starting together migrate one at a time.
const MIGRATION_LOCK_KEY: i64 = 0x726b_695f_6d69_6772; // "rki_migr"

/// More connections than this is a configuration mistake: PostgreSQL's default
/// `max_connections` is 100 for every node together.
pub const POOL_SIZE_MAX: usize = 64;
/// How long a caller waits for a free connection before the call fails.
const POOL_WAIT_MAX: Duration = Duration::from_secs(30);
/// Connect timeout when the URL sets none.
const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Attempts of a transaction that failed transiently (deadlock, serialization failure,
/// connection found closed before anything was committed), with doubling backoff.
const TRANSIENT_TRIES_MAX: u32 = 5;
const TRANSIENT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// Executions per INSERT statement of `create_task`: bounds one message to a few megabytes.
const EXECUTIONS_PER_STATEMENT: usize = 10_000;

pub struct PostgresStore {
    pool: Pool,
}

// ---------------------------------------------------------------- errors

/// A failure inside a transaction: final, or worth retrying the whole transaction.
enum Failure {
    Store(StoreError),
    /// Rolled back by the server (deadlock, serialization) or lost before commit: nothing was
    /// written, so running the transaction again is safe. `session_lost`: the connection is
    /// gone (or going) and must not go back to the pool.
    Transient {
        reason: String,
        session_lost: bool,
    },
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// The error with the server's message and SQLSTATE (`postgres::Error` displays a database
/// error as just "db error").
fn describe(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl From<::postgres::Error> for Failure {
    fn from(e: ::postgres::Error) -> Self {
        if e.is_closed() {
            return Failure::Transient { reason: describe(&e), session_lost: true };
        }
        match e.code() {
            Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE => {
                Failure::Transient { reason: describe(&e), session_lost: false }
            }
            // The server ended the session (restart, failover, pg_terminate_backend) or broke
            // the connection: nothing of the transaction was committed (a failed COMMIT is not
            // retried, see `PostgresStore::write`).
            // "cached plan must not change result type": another node migrated the schema under
            // this connection's prepared statements. A fresh connection prepares them again.
            Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED => {
                Failure::Transient { reason: describe(&e), session_lost: true }
            }
            Some(code)
                if code.code().starts_with("08")
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW =>
            {
                Failure::Transient { reason: describe(&e), session_lost: true }
            }
            // Class 23, integrity constraint violation: unique and foreign keys, and the
            // append-only triggers. The caller's fault, as SQLite's constraint errors are.
            Some(code) if code.code().starts_with("23") => Failure::Store(StoreError::Conflict(
                e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().into()),
            )),
            // Class 53, insufficient resources: 53100 is a full disk, the others an overloaded
            // server (out of memory, too many connections).
            Some(code) if *code == SqlState::DISK_FULL => Failure::Store(StoreError::Full(describe(&e))),
            Some(code) if code.code().starts_with("53") => Failure::Store(StoreError::Unavailable(describe(&e))),
            _ => Failure::Store(StoreError::Backend(describe(&e))),
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Store(e) => e,
            Failure::Transient { reason, .. } => StoreError::Unavailable(reason),
        }
    }
}

/// Replaces a conflict's message with the one the API shows (the same as SQLite's store).
fn conflict_as(message: String) -> impl FnOnce(Failure) -> Failure {
    move |f| match f {
        Failure::Store(StoreError::Conflict(_)) => Failure::Store(StoreError::Conflict(message)),
        other => other,
    }
}

fn not_found(what: String) -> Failure {
    Failure::Store(StoreError::NotFound(what))
}

fn corrupt(what: String) -> Failure {
    Failure::Store(StoreError::Backend(what))
}

// ---------------------------------------------------------------- pool

/// One connection and the statements prepared on it. Every SQL text is a `&'static str`, so the
/// cache is bounded by the statements in this file.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// A fixed-size pool: at most `size` connections, opened on demand, handed out one caller at a
/// time.
struct Pool {
    /// Where to connect; parsed once from the URL.
    config: ::postgres::Config,
    /// TLS to the server (`sslmode` other than `disable` in the URL): `super::pg_tls`.
    tls: Option<super::pg_tls::RustlsConnect>,
    size: usize,
    state: Mutex<PoolState>,
    /// Signalled when a connection is returned or a slot freed.
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections that exist (idle or handed out), so no more than `size` are opened.
    open: usize,
}

/// A connection on loan; goes back to the pool on drop (or is discarded if it closed).
struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    /// Set when the session was lost: the connection is dropped, not returned.
    lost: bool,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self) -> Result<Pooled<'_>, Failure> {
        let deadline = Instant::now() + POOL_WAIT_MAX;
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(Pooled { pool: self, conn: Some(conn), lost: false });
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                return match connect_with(&self.config, self.tls.as_ref()) {
                    Ok(client) => {
                        Ok(Pooled { pool: self, conn: Some(Conn { client, statements: HashMap::new() }), lost: false })
                    }
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(Failure::Store(StoreError::Unavailable(format!(
                            "connect to PostgreSQL: {}",
                            with_causes(&e)
                        ))))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::Store(StoreError::Unavailable(format!(
                    "no PostgreSQL connection free within {POOL_WAIT_MAX:?} (pool of {})",
                    self.size
                ))));
            }
            state = self.returned.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let mut state = self.pool.lock();
        if self.lost || conn.client.is_closed() {
            // The server went away (restart, failover): the idle connections opened before are
            // most likely dead too. Drop them all; they reopen on demand.
            state.open -= 1 + state.idle.len();
            state.idle.clear();
        } else {
            state.idle.push(conn);
        }
        drop(state);
        self.pool.returned.notify_all();
    }
}

impl Pooled<'_> {
    /// Marks the connection lost if `result` says so; passes `result` on.
    fn check<T>(&mut self, result: Result<T, Failure>) -> Result<T, Failure> {
        if let Err(Failure::Transient { session_lost: true, .. }) = &result {
            self.lost = true;
        }
        result
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("a pooled connection is present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a pooled connection is present until dropped")
    }
}

/// A connection or a transaction, with the connection's prepared statements: every query goes
/// through a statement prepared once per connection (one round trip per query, not two).
struct Session<'a, C: GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<&'static str, Statement>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Session<'_, C> {
    fn statement(&mut self, sql: &'static str) -> Result<Statement, Failure> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.query(&statement, params)?)
    }

    fn query_opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.query_opt(&statement, params)?)
    }

    fn query_one(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Row, Failure> {
        self.query_opt(sql, params)?.ok_or_else(|| not_found("no such row".into()))
    }

    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.execute(&statement, params)?)
    }
}

type Tx<'s, 't> = Session<'s, Transaction<'t>>;

/// Runs `attempt` until it succeeds, fails for good, or has failed transiently
/// [`TRANSIENT_TRIES_MAX`] times.
fn retrying<T>(mut attempt: impl FnMut() -> Result<T, Failure>) -> StoreResult<T> {
    let mut backoff = TRANSIENT_BACKOFF_FIRST;
    let mut tries = 1;
    loop {
        match attempt() {
            Err(Failure::Transient { reason, .. }) if tries < TRANSIENT_TRIES_MAX => {
                tracing::debug!(%reason, tries, "PostgreSQL transaction retried");
                std::thread::sleep(backoff);
                backoff *= 2;
                tries += 1;
            }
            other => return other.map_err(StoreError::from),
        }
    }
}

// ---------------------------------------------------------------- open and migrate

impl PostgresStore {
    /// The schema version this build migrates a database to.
    pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

    /// Connects to the database at `url` (`postgres://user:password@host:port/db` or the
    /// `key=value` form) with at most `pool_size` connections, and runs pending migrations.
    pub fn connect(url: &str, pool_size: usize) -> StoreResult<Self> {
        if !(1..=POOL_SIZE_MAX).contains(&pool_size) {
            return Err(StoreError::Invalid(format!("PostgreSQL pool size {pool_size} is not in 1..={POOL_SIZE_MAX}")));
        }
        // The URL may carry a password: errors name the problem, never the URL.
        let (mut config, tls) = parse_url(url)?;
        if config.get_application_name().is_none() {
            config.application_name("rki-gateway");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT_DEFAULT);
        }
        let store = Self {
            pool: Pool {
                config,
                tls,
                size: pool_size,
                state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }),
                returned: Condvar::new(),
            },
        };
        retrying(|| {
            let mut conn = store.pool.get()?;
            let result = migrate(&mut conn.client);
            conn.check(result)
        })?;
        Ok(store)
    }

    fn read<T>(&self, mut f: impl FnMut(&mut Session<'_, Client>) -> Result<T, Failure>) -> StoreResult<T> {
        retrying(|| {
            let mut pooled = self.pool.get()?;
            let Conn { client, statements } = &mut *pooled;
            let result = f(&mut Session { client, statements });
            pooled.check(result)
        })
    }

    /// One transaction; retried whole if it failed transiently, so `f` must only touch the
    /// database and its own locals.
    fn write<T>(&self, mut f: impl FnMut(&mut Session<'_, Transaction<'_>>) -> Result<T, Failure>) -> StoreResult<T> {
        retrying(|| {
            let mut pooled = self.pool.get()?;
            let result = transaction(&mut pooled, &mut f);
            pooled.check(result)
        })
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        self.read(|s| {
            Ok(s.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?.map(|r| r.try_get(0)).transpose()?)
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.write(|s| {
            s.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )?;
            Ok(())
        })
    }

    /// Re-seals every sealed key (BDKs and device secrets) with `reseal`, and records
    /// `master_kcv`, in one transaction: all or nothing. Returns how many keys were re-sealed.
    pub fn reseal_all(&self, reseal: impl Fn(&str) -> Result<String, String>, master_kcv: &str) -> StoreResult<usize> {
        self.write(|s| {
            let mut count = 0;
            // The columns of `store::SEALED_KEY_COLUMNS`, as the static statements the session's
            // statement cache takes.
            const SEALED_KEYS: [(&str, &str); SEALED_KEY_COLUMNS.len()] = [
                ("SELECT id, sealed FROM key_sources ORDER BY id FOR UPDATE", "UPDATE key_sources SET sealed = $2 WHERE id = $1"),
                ("SELECT id, sealed FROM keks ORDER BY id FOR UPDATE", "UPDATE keks SET sealed = $2 WHERE id = $1"),
                (
                    "SELECT id, sealed_mac_key FROM gudids WHERE sealed_mac_key <> '' ORDER BY id FOR UPDATE",
                    "UPDATE gudids SET sealed_mac_key = $2 WHERE id = $1",
                ),
            ];
            for (select, update) in SEALED_KEYS {
                for row in s.query(select, &[])? {
                    let (id, sealed): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
                    let new = reseal(&sealed).map_err(StoreError::Invalid)?;
                    s.execute(update, &[&id, &new])?;
                    count += 1;
                }
            }
            let devices = s.query(
                "SELECT device_id, signing_key, kbpk_aes, kbpk_tdes FROM device_credentials ORDER BY device_id FOR UPDATE",
                &[],
            )?;
            for row in devices {
                let id: i64 = row.try_get(0)?;
                let mut sealed = [String::new(), String::new(), String::new()];
                for (i, slot) in sealed.iter_mut().enumerate() {
                    *slot = reseal(&row.try_get::<_, String>(i + 1)?).map_err(StoreError::Invalid)?;
                }
                s.execute(
                    "UPDATE device_credentials SET signing_key = $2, kbpk_aes = $3, kbpk_tdes = $4 WHERE device_id = $1",
                    &[&id, &sealed[0], &sealed[1], &sealed[2]],
                )?;
                count += 3;
            }
            s.execute(
                "INSERT INTO meta (key, value) VALUES ('master_key_kcv', $1) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&master_kcv],
            )?;
            Ok(count)
        })
    }

    /// Seals the clear MAC key of every GUDID a pre-schema-7 gateway wrote with `seal`, and
    /// empties the clear column, in one transaction; returns how many. Run at every start once the
    /// master key is checked (a no-op when there is none). The old row versions stay in the
    /// table's files until PostgreSQL reuses their space; `pg_dump` copies never hold them.
    pub fn seal_legacy_gudid_keys(&self, seal: impl Fn(&[u8]) -> Result<String, String>) -> StoreResult<usize> {
        self.write(|s| {
            let rows = s.query(
                "SELECT id, mac_key FROM gudids
                 WHERE length(mac_key) > 0 AND (sealed_mac_key IS NULL OR sealed_mac_key = '')
                 ORDER BY id FOR UPDATE",
                &[],
            )?;
            for row in &rows {
                let id: i64 = row.try_get(0)?;
                let clear = zeroize::Zeroizing::new(row.try_get::<_, Vec<u8>>(1)?);
                let sealed = seal(&clear).map_err(StoreError::Invalid)?;
                s.execute("UPDATE gudids SET sealed_mac_key = $2, mac_key = '\\x' WHERE id = $1", &[&id, &sealed])?;
            }
            Ok(rows.len())
        })
    }

    /// The schema version after migrations: how many migrations ran.
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.read(|s| {
            Ok(s.query_one("SELECT COALESCE(max(version), 0)::bigint FROM schema_migrations", &[])?.try_get(0)?)
        })
    }

    /// Creates (or upgrades) the database at `url` to schema `version` and no further, without
    /// opening a store: the upgrade tests start from an older schema with it.
    #[doc(hidden)]
    pub fn migrate_to_version(url: &str, version: usize) -> StoreResult<()> {
        let (config, tls) = parse_url(url)?;
        let mut client = connect_with(&config, tls.as_ref())
            .map_err(|e| StoreError::Backend(format!("connect to PostgreSQL: {}", with_causes(&e))))?;
        migrate_to(&mut client, version).map_err(StoreError::from)
    }
}

/// The URL's connection settings and TLS connector (`sslmode`, `sslrootcert`: `super::pg_tls`).
fn parse_url(url: &str) -> StoreResult<(::postgres::Config, Option<super::pg_tls::RustlsConnect>)> {
    let (rest, settings) =
        super::pg_tls::split_url(url).map_err(|e| StoreError::Invalid(format!("PostgreSQL URL: {e}")))?;
    let mut config =
        ::postgres::Config::from_str(&rest).map_err(|e| StoreError::Invalid(format!("PostgreSQL URL: {e}")))?;
    config.ssl_mode(super::pg_tls::postgres_mode(&settings));
    let tls = super::pg_tls::connector(&settings).map_err(|e| StoreError::Invalid(format!("PostgreSQL TLS: {e}")))?;
    Ok((config, tls))
}

/// An error with its causes (`error performing TLS handshake: invalid peer certificate:
/// UnknownIssuer`): the client's own message names no cause.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

fn connect_with(
    config: &::postgres::Config,
    tls: Option<&super::pg_tls::RustlsConnect>,
) -> Result<Client, ::postgres::Error> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(NoTls),
    }
}

fn transaction<T>(
    conn: &mut Conn,
    f: &mut impl FnMut(&mut Session<'_, Transaction<'_>>) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let Conn { client, statements } = conn;
    let mut tx = client.transaction()?;
    let out = match f(&mut Session { client: &mut tx, statements }) {
        Ok(out) => out,
        Err(e) => {
            crash::finished(false);
            return Err(e);
        }
    };
    let committed = tx.commit();
    crash::finished(committed.is_ok());
    committed.map_err(|e| match Failure::from(e) {
        // The COMMIT may or may not have taken effect: not safe to run again. The session is
        // dropped all the same.
        Failure::Transient { reason, session_lost } if session_lost => {
            Failure::Store(StoreError::Unavailable(format!("commit outcome unknown: {reason}")))
        }
        other => other,
    })?;
    Ok(out)
}

fn migrate(client: &mut Client) -> Result<(), Failure> {
    migrate_to(client, MIGRATIONS.len())
}

/// Runs the migrations after the database's version, up to `version`.
fn migrate_to(client: &mut Client, version: usize) -> Result<(), Failure> {
    let known = MIGRATIONS.len() as i32;
    loop {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )?;
        let current: i32 = tx.query_one("SELECT COALESCE(max(version), 0) FROM schema_migrations", &[])?.try_get(0)?;
        if current > known {
            return Err(corrupt(format!(
                "database schema version {current} is newer than this gateway knows ({known}); upgrade the gateway"
            )));
        }
        if current as usize >= version.min(MIGRATIONS.len()) {
            tx.commit()?;
            return Ok(());
        }
        tx.batch_execute(MIGRATIONS[current as usize])?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&(current + 1)])?;
        tx.commit()?;
    }
}

// ---------------------------------------------------------------- rows

/// `generation > 0` is "initialised": every initialisation installs the credentials and counts
/// the generation up in one transaction, and nothing else sets either.
macro_rules! device_columns {
    () => {
        "id, org_id, sn, model, rom_version, app_version, region, debug_mode, debug_key_present, locked, last_seen,
         assigned_key_source, generation > 0, x_pos_device_id, created_at, unlock_pending, slots"
    };
}

fn device_row(r: &Row) -> Result<DeviceRow, Failure> {
    Ok(DeviceRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        sn: r.try_get(2)?,
        model: r.try_get(3)?,
        rom_version: r.try_get(4)?,
        app_version: r.try_get(5)?,
        region: r.try_get(6)?,
        debug_mode: r.try_get(7)?,
        debug_key_present: r.try_get(8)?,
        locked: r.try_get(9)?,
        last_seen: r.try_get(10)?,
        assigned_key_source: r.try_get(11)?,
        initialised: r.try_get(12)?,
        x_pos_device_id: r.try_get(13)?,
        created_at: r.try_get(14)?,
        unlock_pending: r.try_get(15)?,
        slots_json: r.try_get(16)?,
    })
}

/// An initialised device's credentials; `WHERE` clauses name the device `d`.
macro_rules! select_credentials {
    () => {
        "SELECT d.id, d.org_id, d.sn, c.signing_key, c.kbpk_aes, c.kbpk_tdes, c.password_hash, d.last_counter,
                d.generation, d.unlock_pending
         FROM devices d JOIN device_credentials c ON c.device_id = d.id"
    };
}

fn credentials_row(r: &Row) -> Result<DeviceCredentials, Failure> {
    Ok(DeviceCredentials {
        device_id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        sn: r.try_get(2)?,
        signing_key: r.try_get(3)?,
        kbpk_aes: r.try_get(4)?,
        kbpk_tdes: r.try_get(5)?,
        password_hash: r.try_get(6)?,
        last_counter: r.try_get::<_, i64>(7)? as u64,
        generation: r.try_get(8)?,
        unlock_pending: r.try_get(9)?,
    })
}

macro_rules! key_source_columns {
    () => {
        "id, org_id, name, algorithm, kcv, sealed, key_set_id, created_at"
    };
}

macro_rules! kek_columns {
    () => {
        "id, org_id, name, algorithm, kcv, sealed, created_at"
    };
}

fn kek_row(r: &Row) -> Result<KekRow, Failure> {
    Ok(KekRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        name: r.try_get(2)?,
        algorithm: r.try_get(3)?,
        kcv: r.try_get(4)?,
        sealed: r.try_get(5)?,
        created_at: r.try_get(6)?,
    })
}

fn key_source_row(r: &Row) -> Result<KeySourceRow, Failure> {
    Ok(KeySourceRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        name: r.try_get(2)?,
        algorithm: r.try_get(3)?,
        kcv: r.try_get(4)?,
        sealed: r.try_get(5)?,
        key_set_id: r.try_get(6)?,
        created_at: r.try_get(7)?,
    })
}

macro_rules! gudid_select {
    () => {
        "SELECT g.id, g.org_id, g.device_id, d.sn, g.gudid_id, COALESCE(g.sealed_mac_key, ''), g.provisioned_by,
                g.provisioned_at, g.expires_at, g.used_at, g.bootstrap_hash, g.revoked_at, g.revoked_by
         FROM gudids g JOIN devices d ON d.id = g.device_id"
    };
}

fn gudid_row(r: &Row) -> Result<GudidRow, Failure> {
    Ok(GudidRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        device_id: r.try_get(2)?,
        sn: r.try_get(3)?,
        gudid_id: r.try_get(4)?,
        sealed_mac_key: r.try_get(5)?,
        provisioned_by: r.try_get(6)?,
        provisioned_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        used_at: r.try_get(9)?,
        bootstrap_hash: r.try_get(10)?,
        revoked_at: r.try_get(11)?,
        revoked_by: r.try_get(12)?,
    })
}

/// A task with its execution counts by state, read in the same statement (one snapshot).
macro_rules! task_select {
    () => {
        "SELECT t.id, t.org_id, t.key_source_id, k.name, t.slot, t.key_type, t.created_at, t.expires_at,
                t.created_by, t.stopped_at, t.request_id, c.states, c.counts, t.number
         FROM tasks t JOIN key_sources k ON k.id = t.key_source_id
         LEFT JOIN LATERAL (
             SELECT array_agg(s.state) AS states, array_agg(s.n) AS counts
             FROM (SELECT e.state, count(*) AS n FROM executions e WHERE e.task_id = t.id GROUP BY e.state) s
         ) c ON TRUE"
    };
}

fn task_row(r: &Row) -> Result<TaskRow, Failure> {
    let mut counts = TaskCounts::default();
    let states: Option<Vec<String>> = r.try_get(11)?;
    let numbers: Option<Vec<i64>> = r.try_get(12)?;
    for (state, n) in states.unwrap_or_default().iter().zip(numbers.unwrap_or_default()) {
        if let Some(state) = ExecutionState::parse(state) {
            counts.add(state, n);
        }
    }
    Ok(TaskRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        key_source_id: r.try_get(2)?,
        key_source: r.try_get(3)?,
        slot: slot(r, 4)?,
        key_type: r.try_get(5)?,
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        created_by: r.try_get(8)?,
        stopped_at: r.try_get(9)?,
        request_id: r.try_get(10)?,
        number: r.try_get(13)?,
        counts,
    })
}

fn slot(r: &Row, i: usize) -> Result<u16, Failure> {
    let slot: i32 = r.try_get(i)?;
    u16::try_from(slot).map_err(|_| corrupt(format!("key slot {slot} out of range")))
}

macro_rules! execution_select {
    () => {
        "SELECT e.id, e.task_id, e.org_id, e.device_id, d.sn, e.state, t.slot, t.key_type, e.key_block, e.key_id,
                e.kcv, e.generation, e.created_at, e.deadline, e.delivered_at, e.delivery_count, e.ended_at,
                e.result, t.key_source_id
         FROM executions e JOIN devices d ON d.id = e.device_id JOIN tasks t ON t.id = e.task_id"
    };
}

fn execution_row(r: &Row) -> Result<ExecutionRow, Failure> {
    let state: String = r.try_get(5)?;
    Ok(ExecutionRow {
        id: r.try_get(0)?,
        task_id: r.try_get(1)?,
        org_id: r.try_get(2)?,
        device_id: r.try_get(3)?,
        sn: r.try_get(4)?,
        state: ExecutionState::parse(&state).ok_or_else(|| corrupt(format!("bad state {state}")))?,
        slot: slot(r, 6)?,
        key_type: r.try_get(7)?,
        key_block: r.try_get(8)?,
        key_id: r.try_get(9)?,
        kcv: r.try_get(10)?,
        generation: r.try_get(11)?,
        created_at: r.try_get(12)?,
        deadline: r.try_get(13)?,
        delivered_at: r.try_get(14)?,
        delivery_count: r.try_get(15)?,
        ended_at: r.try_get(16)?,
        result: r.try_get(17)?,
        key_source_id: r.try_get(18)?,
    })
}

fn record_row(r: &Row) -> Result<RecordRow, Failure> {
    Ok(RecordRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        execution_id: r.try_get(2)?,
        task_id: r.try_get(3)?,
        sn: r.try_get(4)?,
        key_source: r.try_get(5)?,
        key_type: r.try_get(6)?,
        injection: r.try_get(7)?,
        result: r.try_get(8)?,
        error_code: r.try_get(9)?,
        at: r.try_get(10)?,
        key_id: r.try_get(11)?,
        kcv: r.try_get(12)?,
        task_number: r.try_get(13)?,
    })
}

fn group_row(r: &Row) -> Result<GroupRow, Failure> {
    Ok(GroupRow {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        name: r.try_get(2)?,
        description: r.try_get(3)?,
        members: r.try_get(4)?,
    })
}

fn org_row(r: &Row) -> Result<OrgRow, Failure> {
    Ok(OrgRow { id: r.try_get(0)?, name: r.try_get(1)?, created_at: r.try_get(2)? })
}

fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T, Failure>) -> Result<Vec<T>, Failure> {
    rows.iter().map(f).collect()
}

/// [`TaskSink`] inside `create_task_with`'s transaction. A database failure is kept in
/// `failure` (the trait speaks `StoreError`), so the transaction can still tell a transient one.
struct PostgresTaskSink<'a, 's, 't> {
    s: &'a mut Tx<'s, 't>,
    task: &'a NewTask,
    task_id: i64,
    inserted: usize,
    failure: Option<Failure>,
}

impl PostgresTaskSink<'_, '_, '_> {
    fn keep<T>(&mut self, result: Result<T, Failure>) -> StoreResult<T> {
        result.map_err(|failure| {
            let error = match &failure {
                Failure::Store(StoreError::NotFound(m)) => StoreError::NotFound(m.clone()),
                Failure::Store(StoreError::Conflict(m)) => StoreError::Conflict(m.clone()),
                Failure::Store(StoreError::Invalid(m)) => StoreError::Invalid(m.clone()),
                Failure::Store(StoreError::Full(m)) => StoreError::Full(m.clone()),
                Failure::Store(StoreError::Unavailable(m)) | Failure::Transient { reason: m, .. } => {
                    StoreError::Unavailable(m.clone())
                }
                Failure::Store(StoreError::Backend(m)) => StoreError::Backend(m.clone()),
            };
            self.failure = Some(failure);
            error
        })
    }
}

impl TaskSink for PostgresTaskSink<'_, '_, '_> {
    fn derive_targets(&mut self, device_ids: &[i64], aes: bool) -> StoreResult<Vec<DeriveTarget>> {
        let sql = if aes {
            "SELECT d.id, d.sn, d.generation, c.kbpk_aes FROM devices d JOIN device_credentials c ON c.device_id = d.id
             WHERE d.id = ANY ($1)"
        } else {
            "SELECT d.id, d.sn, d.generation, c.kbpk_tdes FROM devices d JOIN device_credentials c ON c.device_id = d.id
             WHERE d.id = ANY ($1)"
        };
        let found = self.s.query(sql, &[&device_ids]);
        let found = self.keep(found)?;
        let targets = rows(found, |r| {
            Ok(DeriveTarget {
                device_id: r.try_get(0)?,
                sn: r.try_get(1)?,
                generation: r.try_get(2)?,
                sealed_kbpk: r.try_get(3)?,
            })
        });
        self.keep(targets)
    }

    fn insert(&mut self, executions: &[NewExecution]) -> StoreResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(executions.len());
        for chunk in executions.chunks(EXECUTIONS_PER_STATEMENT) {
            let devices: Vec<i64> = chunk.iter().map(|e| e.device_id).collect();
            let blocks: Vec<&str> = chunk.iter().map(|e| e.key_block.as_str()).collect();
            let key_ids: Vec<&[u8]> = chunk.iter().map(|e| e.key_id.as_slice()).collect();
            let kcvs: Vec<&str> = chunk.iter().map(|e| e.kcv.as_str()).collect();
            let generations: Vec<i64> = chunk.iter().map(|e| e.generation).collect();
            // RETURNING promises no order: each id comes back with its device (one execution per
            // device and task).
            let found = self.s.query(
                "INSERT INTO executions (task_id, org_id, device_id, state, key_block, key_id, kcv, generation,
                                         created_at, deadline)
                 SELECT $1, $2, i.device_id, $3, i.key_block, i.key_id, i.kcv, i.generation, $4, $5
                 FROM unnest($6::bigint[], $7::text[], $8::bytea[], $9::text[], $10::bigint[])
                      WITH ORDINALITY AS i(device_id, key_block, key_id, kcv, generation, ord)
                 ORDER BY i.ord
                 RETURNING id, device_id",
                &[
                    &self.task_id,
                    &self.task.org_id,
                    &ExecutionState::Queued.as_str(),
                    &self.task.created_at,
                    &self.task.expires_at,
                    &devices,
                    &blocks,
                    &key_ids,
                    &kcvs,
                    &generations,
                ],
            );
            let found = self.keep(found)?;
            let returned = self.keep(rows(found, |r| Ok((r.try_get::<_, i64>(1)?, r.try_get::<_, i64>(0)?))))?;
            let by_device: HashMap<i64, i64> = returned.into_iter().collect();
            for e in chunk {
                match by_device.get(&e.device_id) {
                    Some(id) => ids.push(*id),
                    None => {
                        return self.keep(Err(corrupt(format!("no execution id returned for device {}", e.device_id))))
                    }
                }
            }
        }
        self.inserted += executions.len();
        Ok(ids)
    }
}

/// SQLite reads a negative LIMIT as "no limit"; PostgreSQL refuses it. `None` binds NULL, which
/// PostgreSQL reads as no limit.
fn limit_or_all(limit: i64) -> Option<i64> {
    (limit >= 0).then_some(limit)
}

/// The states an execution may be in for `next` to be allowed, from the one transition table.
fn states_that_can_become(next: ExecutionState) -> Vec<&'static str> {
    ExecutionState::ALL.into_iter().filter(|s| s.can_become(next)).map(ExecutionState::as_str).collect()
}

// ---------------------------------------------------------------- ending executions

/// The record of every execution in the `ended` CTE (which returns the ended rows with their
/// `injection`, `at` and an `ord` to keep the batch's order), written in the same statement.
macro_rules! record_ended {
    () => {
        "recorded AS (
             INSERT INTO records (org_id, execution_id, task_id, device_id, sn, key_source, key_source_id, key_type,
                                  injection, result, error_code, at, key_id, kcv)
             SELECT x.org_id, x.id, x.task_id, x.device_id, d.sn, k.name, k.id, t.key_type, x.injection, x.state,
                    NULLIF(x.result, 0), x.at, upper(encode(x.key_id, 'hex')),
                    CASE WHEN x.state = 'succeeded' THEN x.kcv ELSE '' END
             FROM ended x JOIN devices d ON d.id = x.device_id JOIN tasks t ON t.id = x.task_id
                  JOIN key_sources k ON k.id = t.key_source_id
             ORDER BY x.ord
             RETURNING execution_id
         )"
    };
}

/// Ends the given open executions (one ending per execution), with their records and the locks
/// of the devices that succeeded. Returns the ended ones as indexes into `endings`.
const END_EXECUTIONS: &str = concat!(
    "WITH input AS (
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::text[], $6::bigint[], $7::bool[],
                              $8::bigint[], $9::bigint[], $10::bigint[])
             WITH ORDINALITY AS i(execution_id, state, from_states, result, injection, at, lock_device,
                                  sent_first, sent_last, sends, ord)
     ),
     ended AS (
         UPDATE executions e SET state = i.state, ended_at = i.at, result = i.result,
             delivered_at = COALESCE(e.delivered_at, i.sent_first), delivery_count = e.delivery_count + i.sends,
             last_sent_at = GREATEST(e.last_sent_at, i.sent_last)
         FROM input i
         WHERE e.id = i.execution_id AND e.state IN ('queued', 'delivered')
           AND e.state = ANY (string_to_array(i.from_states, ','))
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result, i.injection,
                   e.ended_at AS at, i.ord, i.lock_device
     ),
     ",
    record_ended!(),
    ",
     locked AS (
         UPDATE devices SET locked = TRUE WHERE NOT locked AND id IN (SELECT device_id FROM ended WHERE lock_device)
     )
     SELECT x.ord, (SELECT count(*) FROM recorded) FROM ended x ORDER BY x.ord"
);

fn end_executions(s: &mut Tx<'_, '_>, endings: &[&Ending]) -> Result<Vec<usize>, Failure> {
    if endings.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = endings.iter().map(|e| e.execution_id).collect();
    let states: Vec<&str> = endings.iter().map(|e| e.state.as_str()).collect();
    let from: Vec<String> = endings.iter().map(|e| states_that_can_become(e.state).join(",")).collect();
    let results: Vec<Option<i32>> = endings.iter().map(|e| e.result).collect();
    let injections: Vec<&str> = endings.iter().map(|e| e.injection.as_str()).collect();
    let ats: Vec<i64> = endings.iter().map(|e| e.at).collect();
    let locks: Vec<bool> = endings.iter().map(|e| e.lock_device).collect();
    let sent_first: Vec<Option<i64>> = endings.iter().map(|e| e.sends.map(|s| s.first_at)).collect();
    let sent_last: Vec<Option<i64>> = endings.iter().map(|e| e.sends.map(|s| s.last_at)).collect();
    let sends: Vec<i64> = endings.iter().map(|e| e.sends.map_or(0, |s| i64::from(s.count))).collect();
    let ended = s.query(
        END_EXECUTIONS,
        &[&ids, &states, &from, &results, &injections, &ats, &locks, &sent_first, &sent_last, &sends],
    )?;
    let mut out = Vec::with_capacity(ended.len());
    for row in &ended {
        let ord: i64 = row.try_get(0)?;
        let recorded: i64 = row.try_get(1)?;
        // The pair of the assertion: one record per ended execution, in the same statement.
        if recorded != ended.len() as i64 {
            return Err(corrupt(format!("{} executions ended but {recorded} records written", ended.len())));
        }
        out.push(ord as usize - 1);
    }
    Ok(out)
}

/// Ends `ended`'s open executions (a CTE of `UPDATE executions … RETURNING` the record columns)
/// with records; returns the ended ids in order.
macro_rules! end_and_record {
    ($ended:literal) => {
        concat!("WITH ", $ended, ", ", record_ended!(), " SELECT x.id, x.org_id FROM ended x ORDER BY x.id")
    };
}

const STOP_TASK: &str = end_and_record!(
    "ended AS (
         UPDATE executions e SET state = $3, ended_at = $2, result = NULL
         WHERE e.task_id = $1 AND e.state IN ('queued', 'delivered') AND e.state = ANY ($4)
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result,
                   'auto'::text AS injection, e.ended_at AS at, e.id AS ord
     )"
);

/// Claims the due executions with `SKIP LOCKED`: a row another node is expiring (or ending) right
/// now is left to it.
const EXPIRE_DUE: &str = end_and_record!(
    "due AS (
         SELECT id FROM executions
         WHERE state IN ('queued', 'delivered') AND deadline <= $1 AND state = ANY ($3)
         ORDER BY id
         FOR UPDATE SKIP LOCKED
     ),
     ended AS (
         UPDATE executions e SET state = $2, ended_at = $1, result = NULL
         FROM due WHERE e.id = due.id
         RETURNING e.id, e.org_id, e.task_id, e.device_id, e.key_id, e.kcv, e.state, e.result,
                   'auto'::text AS injection, e.ended_at AS at, e.id AS ord
     )"
);

/// Claims the executions due for a re-delivery (see [`Store::claim_redeliveries`]): the rows are
/// locked with `SKIP LOCKED` and marked claimed in the same statement, so a row another node is
/// claiming is left to it and a row it claimed is not due any more. `$1` now, `$2` first, `$3`
/// initial, `$4` max, `$5` limit.
const CLAIM_REDELIVERIES: &str = concat!(
    "WITH due AS (
         SELECT id FROM executions
         WHERE state IN ('queued', 'delivered') AND deadline > $1
           AND COALESCE(retry_claimed_until, 0) <= $1
           AND CASE WHEN last_sent_at IS NULL THEN created_at + $2 <= $1
                    ELSE last_sent_at + LEAST($3 * power(2, LEAST(GREATEST(delivery_count - 1, 0), 16))::bigint, $4) <= $1
               END
         ORDER BY id
         LIMIT $5
         FOR UPDATE SKIP LOCKED
     ),
     claimed AS (
         UPDATE executions e SET retry_claimed_until = $1 + $3 FROM due WHERE e.id = due.id RETURNING e.id
     ) ",
    execution_select!(),
    " WHERE e.id IN (SELECT id FROM claimed) ORDER BY e.id"
);

// ---------------------------------------------------------------- batches

/// The kinds of [`Write`], in the order a round applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Report,
    Seen,
    Counter,
    Delivered,
    End,
    Initialise,
}

const KINDS: usize = 6;

/// A row a write touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Device(i64),
    Execution(i64),
}

/// Whether writes of kinds `a` and `b` on the same row must stay in their order: one writes a
/// column the other writes or reads. Two writes of one kind on one row are merged by the kind's
/// own rule instead (see [`Round`]), so no kind conflicts with itself.
fn order_matters(a: Kind, b: Kind) -> bool {
    use Kind::*;
    matches!(
        (a.min(b), a.max(b)),
        // last_seen
        (Report, Seen)
        // locked (a success locks the device; a report says whether it is locked)
        | (Report, End)
        // unlock_pending, which the initialisation returns with the new credentials
        | (Report, Initialise)
        // last_counter
        | (Counter, Initialise)
        // state, delivered_at, delivery_count
        | (Delivered, End)
    )
}

/// Writes that one set-based statement per kind applies. Within a round, writes of one kind on
/// one row are merged exactly as applying them in order would: the last report and the last
/// `Seen` win, counters take the maximum, `Delivered` keeps the first time and counts them all,
/// the first ending wins (a later one finds the execution closed), initialisations run in order.
#[derive(Default)]
struct Round<'w> {
    reports: BTreeMap<i64, &'w DeviceReport>,
    seen: BTreeMap<i64, Millis>,
    counters: BTreeMap<i64, i64>,
    delivered: BTreeMap<i64, (Millis, i64)>,
    /// (index in the batch, ending), first per execution, in batch order.
    ends: Vec<(usize, &'w Ending)>,
    ending: HashSet<i64>,
    /// (index in the batch, GUDID row, device, credentials, time), in batch order.
    initialise: Vec<(usize, i64, i64, &'w NewCredentials, Millis)>,
}

/// Splits a batch into rounds such that applying the rounds in order, and within a round the kinds
/// in [`Kind`] order, gives what applying the writes one by one gives. A write goes in the
/// earliest round that keeps it after every earlier write it does not commute with
/// ([`order_matters`]) on a row they share: the same round if that write's kind is applied
/// earlier in a round, the next one otherwise. `device_of` maps executions to their devices,
/// needed only when a batch holds both reports and device-locking endings.
fn plan_rounds<'w>(writes: &'w [Write], device_of: &HashMap<i64, i64>) -> Vec<Round<'w>> {
    const ALL: [Kind; KINDS] = [Kind::Report, Kind::Seen, Kind::Counter, Kind::Delivered, Kind::End, Kind::Initialise];
    let mut latest: HashMap<Target, [Option<usize>; KINDS]> = HashMap::new();
    let mut rounds: Vec<Round<'w>> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        let (kind, targets): (Kind, Vec<Target>) = match write {
            Write::Report(r) => (Kind::Report, vec![Target::Device(r.device_id)]),
            Write::Seen { device_id, .. } => (Kind::Seen, vec![Target::Device(*device_id)]),
            Write::Counter { device_id, .. } => (Kind::Counter, vec![Target::Device(*device_id)]),
            Write::Delivered { execution_id, .. } => (Kind::Delivered, vec![Target::Execution(*execution_id)]),
            Write::End(e) => {
                let mut targets = vec![Target::Execution(e.execution_id)];
                if let (true, Some(device)) = (e.lock_device, device_of.get(&e.execution_id)) {
                    targets.push(Target::Device(*device));
                }
                (Kind::End, targets)
            }
            Write::Initialise { device_id, .. } => (Kind::Initialise, vec![Target::Device(*device_id)]),
        };
        let mut round = 0;
        for target in &targets {
            let Some(seen) = latest.get(target) else { continue };
            for (other, at) in ALL.iter().zip(seen) {
                if let (Some(at), true) = (at, order_matters(*other, kind)) {
                    round = round.max(if *other < kind { *at } else { at + 1 });
                }
            }
        }
        for target in targets {
            let slot = &mut latest.entry(target).or_default()[kind as usize];
            *slot = Some(slot.map_or(round, |r| r.max(round)));
        }
        if rounds.len() <= round {
            rounds.resize_with(round + 1, Round::default);
        }
        let r = &mut rounds[round];
        match write {
            Write::Report(report) => {
                r.reports.insert(report.device_id, report);
            }
            Write::Seen { device_id, at } => {
                r.seen.insert(*device_id, *at);
            }
            Write::Counter { device_id, counter } => {
                let counter = *counter as i64;
                r.counters.entry(*device_id).and_modify(|c| *c = (*c).max(counter)).or_insert(counter);
            }
            Write::Delivered { execution_id, at } => {
                r.delivered.entry(*execution_id).and_modify(|(_, n)| *n += 1).or_insert((*at, 1));
            }
            Write::End(ending) => {
                if r.ending.insert(ending.execution_id) {
                    r.ends.push((index, ending));
                }
            }
            Write::Initialise { gudid_row, device_id, creds, at } => {
                r.initialise.push((index, *gudid_row, *device_id, creds, *at));
            }
        }
    }
    rounds
}

const APPLY_REPORTS: &str =
    "UPDATE devices d SET model = i.model, rom_version = i.rom_version, app_version = i.app_version,
        region = i.region, debug_mode = i.debug_mode, debug_key_present = i.debug_key_present, locked = i.locked,
        slots = i.slots, last_seen = i.at, unlock_pending = CASE WHEN i.locked THEN d.unlock_pending ELSE FALSE END
     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::bool[], $8::bool[],
                 $9::text[], $10::bigint[])
          AS i(device_id, model, rom_version, app_version, region, debug_mode, debug_key_present, locked, slots, at)
     WHERE d.id = i.device_id";

const APPLY_SEEN: &str = "UPDATE devices d SET last_seen = i.at
     FROM unnest($1::bigint[], $2::bigint[]) AS i(device_id, at) WHERE d.id = i.device_id";

const APPLY_COUNTERS: &str = "UPDATE devices d SET last_counter = GREATEST(d.last_counter, i.counter)
     FROM unnest($1::bigint[], $2::bigint[]) AS i(device_id, counter)
     WHERE d.id = i.device_id AND d.last_counter < i.counter";

const APPLY_DELIVERED: &str =
    "UPDATE executions e SET state = 'delivered', delivered_at = COALESCE(e.delivered_at, i.at),
        delivery_count = e.delivery_count + i.n, last_sent_at = GREATEST(e.last_sent_at, i.at)
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS i(execution_id, at, n)
     WHERE e.id = i.execution_id AND e.state IN ('queued', 'delivered')";

type Initialised = (usize, i64, Option<DeviceCredentials>);

fn apply_round(
    s: &mut Tx<'_, '_>,
    round: &Round<'_>,
    ended: &mut Vec<(usize, i64, ExecutionState)>,
    initialised: &mut Vec<Initialised>,
) -> Result<(), Failure> {
    if !round.reports.is_empty() {
        let r: Vec<&DeviceReport> = round.reports.values().copied().collect();
        let ids: Vec<i64> = r.iter().map(|r| r.device_id).collect();
        let models: Vec<&str> = r.iter().map(|r| r.model.as_str()).collect();
        let roms: Vec<&str> = r.iter().map(|r| r.rom_version.as_str()).collect();
        let apps: Vec<&str> = r.iter().map(|r| r.app_version.as_str()).collect();
        let regions: Vec<&str> = r.iter().map(|r| r.region.as_str()).collect();
        let debug: Vec<bool> = r.iter().map(|r| r.debug_mode).collect();
        let debug_key: Vec<bool> = r.iter().map(|r| r.debug_key_present).collect();
        let locked: Vec<bool> = r.iter().map(|r| r.locked).collect();
        let slots: Vec<&str> = r.iter().map(|r| r.slots_json.as_str()).collect();
        let ats: Vec<i64> = r.iter().map(|r| r.at).collect();
        s.execute(APPLY_REPORTS, &[&ids, &models, &roms, &apps, &regions, &debug, &debug_key, &locked, &slots, &ats])?;
    }
    if !round.seen.is_empty() {
        let (ids, ats): (Vec<i64>, Vec<i64>) = round.seen.iter().map(|(k, v)| (*k, *v)).unzip();
        s.execute(APPLY_SEEN, &[&ids, &ats])?;
    }
    if !round.counters.is_empty() {
        let (ids, counters): (Vec<i64>, Vec<i64>) = round.counters.iter().map(|(k, v)| (*k, *v)).unzip();
        s.execute(APPLY_COUNTERS, &[&ids, &counters])?;
    }
    if !round.delivered.is_empty() {
        let ids: Vec<i64> = round.delivered.keys().copied().collect();
        let ats: Vec<i64> = round.delivered.values().map(|(at, _)| *at).collect();
        let counts: Vec<i64> = round.delivered.values().map(|(_, n)| *n).collect();
        s.execute(APPLY_DELIVERED, &[&ids, &ats, &counts])?;
    }
    if !round.ends.is_empty() {
        let endings: Vec<&Ending> = round.ends.iter().map(|(_, e)| *e).collect();
        for i in end_executions(s, &endings)? {
            let (index, ending) = round.ends[i];
            ended.push((index, ending.execution_id, ending.state));
        }
    }
    for (index, gudid_row, device_id, creds, at) in &round.initialise {
        initialised.push((*index, *gudid_row, spend_gudid_in(s, *gudid_row, *device_id, creds, *at)?));
    }
    Ok(())
}

/// Appends an audit entry inside the caller's transaction.
fn audit_in(s: &mut Tx<'_, '_>, e: &AuditEntry) -> Result<(), Failure> {
    crash::audited(&e.action);
    let details = e.details.to_string();
    s.execute(
        "INSERT INTO audit (at, org_id, actor, token_id, action, object, details) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&e.at, &e.org_id, &e.actor, &e.token_id, &e.action, &e.object, &details],
    )?;
    Ok(())
}

/// Spends the GUDID if unused and unrevoked and installs the credentials; `None` if it was
/// already spent or revoked. A concurrent spend (or revocation) waits for the first's row lock,
/// then finds `used_at` (or `revoked_at`) set.
fn spend_gudid_in(
    s: &mut Tx<'_, '_>,
    gudid_row: i64,
    device_id: i64,
    creds: &NewCredentials,
    at: Millis,
) -> Result<Option<DeviceCredentials>, Failure> {
    let spent = s.execute(
        "UPDATE gudids SET used_at = $2 WHERE id = $1 AND used_at IS NULL AND revoked_at IS NULL",
        &[&gudid_row, &at],
    )?;
    if spent != 1 {
        return Ok(None);
    }
    s.execute(
        "UPDATE devices SET last_counter = $2, x_pos_device_id = $3, generation = generation + 1 WHERE id = $1",
        &[&device_id, &(creds.counter as i64), &creds.x_pos_device_id],
    )?;
    s.execute(
        "INSERT INTO device_credentials (device_id, signing_key, kbpk_aes, kbpk_tdes, password_hash, broker_password_hash)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (device_id) DO UPDATE SET signing_key = EXCLUDED.signing_key, kbpk_aes = EXCLUDED.kbpk_aes,
             kbpk_tdes = EXCLUDED.kbpk_tdes, password_hash = EXCLUDED.password_hash,
             broker_password_hash = EXCLUDED.broker_password_hash",
        &[
            &device_id,
            &creds.signing_key,
            &creds.kbpk_aes,
            &creds.kbpk_tdes,
            &creds.password_hash,
            &creds.broker_password_hash,
        ],
    )?;
    let row = s.query_one(concat!(select_credentials!(), " WHERE d.id = $1"), &[&device_id])?;
    credentials_row(&row).map(Some)
}

// ---------------------------------------------------------------- the store

impl Store for PostgresStore {
    fn create_org(&self, name: &str, at: Millis, audit: &Audit) -> StoreResult<OrgRow> {
        self.write(|s| {
            let row = s
                .query_one("INSERT INTO organizations (name, created_at) VALUES ($1, $2) RETURNING id", &[&name, &at])
                .map_err(conflict_as(format!("organization {name:?} exists")))?;
            let id = row.try_get(0)?;
            audit_in(s, &audit.entry(None, Some(id), &[]))?;
            Ok(OrgRow { id, name: name.to_string(), created_at: at })
        })
    }

    fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|s| {
            s.query_opt("SELECT id, name, created_at FROM organizations WHERE name = $1", &[&name])?
                .map(|r| org_row(&r))
                .transpose()
        })
    }

    fn org(&self, id: i64) -> StoreResult<OrgRow> {
        self.read(|s| org_row(&s.query_one("SELECT id, name, created_at FROM organizations WHERE id = $1", &[&id])?))
    }

    fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.read(|s| rows(s.query("SELECT id, name, created_at FROM organizations ORDER BY id", &[])?, org_row))
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
        self.write(|s| {
            let row = s.query_one(
                "INSERT INTO tokens (org_id, role, label, token_hash, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&org_id, &role.as_str(), &label, &hash, &at],
            )?;
            let id: i64 = row.try_get(0)?;
            audit_in(s, &audit.entry(None, org_id, &[("token_id", id.into())]))?;
            Ok(TokenRow { id, org_id, role, label: label.to_string() })
        })
    }

    fn token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<TokenRow>> {
        self.read(|s| {
            let Some(r) = s.query_opt("SELECT id, org_id, role, label FROM tokens WHERE token_hash = $1", &[&hash])?
            else {
                return Ok(None);
            };
            let role: String = r.try_get(2)?;
            Ok(Some(TokenRow {
                id: r.try_get(0)?,
                org_id: r.try_get(1)?,
                role: Role::parse(&role).unwrap_or(Role::Admin),
                label: r.try_get(3)?,
            }))
        })
    }

    fn has_key_owner(&self) -> StoreResult<bool> {
        self.read(|s| {
            Ok(s.query_one("SELECT EXISTS (SELECT 1 FROM tokens WHERE role = 'key_owner')", &[])?.try_get(0)?)
        })
    }

    fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        self.write(|s| audit_in(s, e))
    }

    fn list_audit(&self, org_id: Option<i64>, limit: i64, before: Option<i64>) -> StoreResult<Vec<AuditEntry>> {
        self.read(|s| {
            let found = s.query(
                "SELECT id, at, org_id, actor, token_id, action, object, details FROM audit
                 WHERE ($1::bigint IS NULL OR org_id = $1) AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $2",
                &[&org_id, &limit_or_all(limit), &before],
            )?;
            rows(found, |r| {
                let details: String = r.try_get(7)?;
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    org_id: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    token_id: r.try_get(4)?,
                    action: r.try_get(5)?,
                    object: r.try_get(6)?,
                    details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                })
            })
        })
    }

    fn insert_key_source(&self, row: &KeySourceRow, audit: &Audit) -> StoreResult<KeySourceRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO key_sources (org_id, name, algorithm, kcv, sealed, key_set_id, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[&row.org_id, &row.name, &row.algorithm, &row.kcv, &row.sealed, &row.key_set_id, &row.created_at],
                )
                .map_err(conflict_as(format!("key source {:?} exists", row.name)))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(KeySourceRow { id, ..row.clone() })
        })
    }

    fn list_key_sources(&self, org_id: i64) -> StoreResult<Vec<KeySourceRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 ORDER BY id"),
                &[&org_id],
            )?;
            rows(found, key_source_row)
        })
    }

    fn key_source(&self, org_id: i64, id: i64) -> StoreResult<KeySourceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 AND id = $2"),
                &[&org_id, &id],
            )?
            .map(|r| key_source_row(&r))
            .unwrap_or_else(|| Err(not_found(format!("key source {id}"))))
        })
    }

    fn key_source_by_name(&self, org_id: i64, name: &str) -> StoreResult<KeySourceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 AND name = $2"),
                &[&org_id, &name],
            )?
            .map(|r| key_source_row(&r))
            .unwrap_or_else(|| Err(not_found(format!("key source {name:?}"))))
        })
    }

    fn allocate_serials(&self, key_source_id: i64, count: i64) -> StoreResult<i64> {
        // One statement: the row lock makes concurrent allocations on any node disjoint.
        self.write(|s| {
            Ok(s.query_one(
                "UPDATE key_sources SET next_serial = next_serial + $2 WHERE id = $1 RETURNING next_serial - $2",
                &[&key_source_id, &count],
            )?
            .try_get(0)?)
        })
    }

    fn insert_kek(&self, row: &KekRow, audit: &Audit) -> StoreResult<KekRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO keks (org_id, name, algorithm, kcv, sealed, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    &[&row.org_id, &row.name, &row.algorithm, &row.kcv, &row.sealed, &row.created_at],
                )
                .map_err(conflict_as(format!("KEK {:?} exists", row.name)))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(KekRow { id, ..row.clone() })
        })
    }

    fn list_keks(&self, org_id: Option<i64>) -> StoreResult<Vec<KekRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", kek_columns!(), " FROM keks WHERE $1::bigint IS NULL OR org_id = $1 ORDER BY id"),
                &[&org_id],
            )?;
            rows(found, kek_row)
        })
    }

    fn kek_by_name(&self, org_id: i64, name: &str) -> StoreResult<KekRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", kek_columns!(), " FROM keks WHERE org_id = $1 AND name = $2"),
                &[&org_id, &name],
            )?
            .map(|r| kek_row(&r))
            .unwrap_or_else(|| Err(not_found(format!("KEK {name:?}"))))
        })
    }

    fn import_devices(&self, org_id: i64, rows: &[ImportRow], at: Millis, audit: &Audit) -> StoreResult<usize> {
        let sns: Vec<&str> = rows.iter().map(|r| r.sn.as_str()).collect();
        let models: Vec<Option<&str>> = rows.iter().map(|r| r.model.as_deref()).collect();
        self.write(|s| {
            // Insert first, then look for SNs owned by another organization: ON CONFLICT waits
            // for a concurrent import of the same SN to finish, so the check after it sees every
            // owner, and a conflict rolls the whole import back.
            let added = s.execute(
                "INSERT INTO devices (org_id, sn, model, created_at)
                 SELECT $1, i.sn, i.model, $4 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS i(sn, model, ord)
                 ORDER BY i.ord
                 ON CONFLICT (sn) DO NOTHING",
                &[&org_id, &sns, &models, &at],
            )?;
            let foreign: HashSet<String> = s
                .query("SELECT sn FROM devices WHERE sn = ANY ($1) AND org_id <> $2", &[&sns, &org_id])?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !foreign.is_empty() {
                let conflicts: Vec<String> = rows
                    .iter()
                    .filter(|row| foreign.contains(&row.sn))
                    .map(|row| format!("line {}: SN {} is registered to another organization", row.line, row.sn))
                    .collect();
                return Err(StoreError::Conflict(conflicts.join("; ")).into());
            }
            audit_in(s, &audit.entry(None, None, &[("imported", added.into())]))?;
            Ok(added as usize)
        })
    }

    fn list_devices(&self, org_id: i64, f: &DeviceFilter) -> StoreResult<Vec<DeviceRow>> {
        // ILIKE: SQLite's LIKE ignores ASCII case. COLLATE "C": SQLite orders by bytes.
        let pattern = f.sn_contains.as_ref().map(|s| format!("%{}%", s.replace('%', "").replace('_', "\\_")));
        let limit = (f.limit > 0).then_some(f.limit);
        let offset = f.offset.max(0);
        self.read(|s| {
            let found = s.query(
                concat!(
                    "SELECT ",
                    device_columns!(),
                    " FROM devices WHERE org_id = $1
                      AND ($2::text IS NULL OR sn ILIKE $2 ESCAPE '\\')
                      AND ($3::bigint IS NULL OR id IN (SELECT device_id FROM group_members WHERE group_id = $3))
                      AND ($6::text IS NULL OR sn COLLATE \"C\" > $6)
                      ORDER BY sn COLLATE \"C\" LIMIT $4 OFFSET $5"
                ),
                &[&org_id, &pattern, &f.group, &limit, &offset, &f.after_sn],
            )?;
            rows(found, device_row)
        })
    }

    fn count_devices(&self, org_id: i64) -> StoreResult<i64> {
        self.read(|s| Ok(s.query_one("SELECT count(*) FROM devices WHERE org_id = $1", &[&org_id])?.try_get(0)?))
    }

    fn device(&self, org_id: i64, sn: &str) -> StoreResult<DeviceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", device_columns!(), " FROM devices WHERE org_id = $1 AND sn = $2"),
                &[&org_id, &sn],
            )?
            .map(|r| device_row(&r))
            .unwrap_or_else(|| Err(not_found(format!("device {sn}"))))
        })
    }

    fn device_by_id(&self, id: i64) -> StoreResult<DeviceRow> {
        self.read(|s| {
            s.query_opt(concat!("SELECT ", device_columns!(), " FROM devices WHERE id = $1"), &[&id])?
                .map(|r| device_row(&r))
                .unwrap_or_else(|| Err(not_found(format!("device #{id}"))))
        })
    }

    fn devices_by_ids(&self, ids: &[i64]) -> StoreResult<Vec<DeviceRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", device_columns!(), " FROM devices WHERE id = ANY ($1) ORDER BY id"),
                &[&ids],
            )?;
            rows(found, device_row)
        })
    }

    fn device_org_by_sn(&self, sn: &str) -> StoreResult<Option<(i64, i64)>> {
        self.read(|s| {
            s.query_opt("SELECT id, org_id FROM devices WHERE sn = $1", &[&sn])?
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
        })
    }

    fn sn_owners(&self, sns: &[String]) -> StoreResult<Vec<(String, i64)>> {
        self.read(|s| {
            let found = s.query("SELECT sn, org_id FROM devices WHERE sn = ANY ($1)", &[&sns])?;
            rows(found, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn credentials(&self, sn: &str) -> StoreResult<Option<DeviceCredentials>> {
        self.read(|s| {
            s.query_opt(concat!(select_credentials!(), " WHERE d.sn = $1"), &[&sn])?
                .map(|r| credentials_row(&r))
                .transpose()
        })
    }

    fn credentials_for(&self, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
        self.read(|s| {
            let found = s.query(concat!(select_credentials!(), " WHERE d.id = ANY ($1) ORDER BY d.id"), &[&ids])?;
            rows(found, credentials_row)
        })
    }

    fn all_password_hashes(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT d.sn, c.password_hash FROM devices d JOIN device_credentials c ON c.device_id = d.id
                 WHERE c.password_hash IS NOT NULL",
                &[],
            )?;
            rows(found, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn broker_devices(&self) -> StoreResult<Vec<(String, Option<String>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT d.sn, c.broker_password_hash FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id
                 ORDER BY d.sn COLLATE \"C\"",
                &[],
            )?;
            rows(found, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn assign(&self, org_id: i64, ids: &[i64], key_source_id: Option<i64>, audit: &Audit) -> StoreResult<usize> {
        self.write(|s| {
            // Counted per id given, repeats included, as SQLite's one UPDATE per id counts.
            let row = s.query_one(
                "WITH updated AS (
                     UPDATE devices SET assigned_key_source = $3 WHERE org_id = $1 AND id = ANY ($2) RETURNING id
                 )
                 SELECT count(*) FROM unnest($2::bigint[]) AS i(id) JOIN updated u ON u.id = i.id",
                &[&org_id, &ids, &key_source_id],
            )?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(row.try_get::<_, i64>(0)? as usize)
        })
    }

    fn set_unlock_pending(&self, device_id: i64, pending: bool, audit: Option<&Audit>) -> StoreResult<()> {
        self.write(|s| {
            s.execute("UPDATE devices SET unlock_pending = $2 WHERE id = $1", &[&device_id, &pending])?;
            if let Some(audit) = audit {
                audit_in(s, &audit.entry(None, None, &[]))?;
            }
            Ok(())
        })
    }

    fn create_group(&self, org_id: i64, name: &str, description: &str, audit: &Audit) -> StoreResult<GroupRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO groups (org_id, name, description) VALUES ($1, $2, $3) RETURNING id",
                    &[&org_id, &name, &description],
                )
                .map_err(conflict_as(format!("group {name:?} exists")))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(GroupRow { id, org_id, name: name.into(), description: description.into(), members: 0 })
        })
    }

    fn list_groups(&self, org_id: i64) -> StoreResult<Vec<GroupRow>> {
        self.read(|s| {
            let found = s.query(
                "SELECT g.id, g.org_id, g.name, g.description, (SELECT count(*) FROM group_members m WHERE m.group_id = g.id)
                 FROM groups g WHERE g.org_id = $1 ORDER BY g.name COLLATE \"C\"",
                &[&org_id],
            )?;
            rows(found, group_row)
        })
    }

    fn group_by_name(&self, org_id: i64, name: &str) -> StoreResult<GroupRow> {
        self.read(|s| {
            s.query_opt(
                "SELECT g.id, g.org_id, g.name, g.description, (SELECT count(*) FROM group_members m WHERE m.group_id = g.id)
                 FROM groups g WHERE g.org_id = $1 AND g.name = $2",
                &[&org_id, &name],
            )?
            .map(|r| group_row(&r))
            .unwrap_or_else(|| Err(not_found(format!("group {name:?}"))))
        })
    }

    fn add_group_members(&self, group_id: i64, ids: &[i64], audit: &Audit) -> StoreResult<usize> {
        self.write(|s| {
            let added = s.execute(
                "INSERT INTO group_members (group_id, device_id)
                 SELECT $1, i.id FROM unnest($2::bigint[]) WITH ORDINALITY AS i(id, ord) ORDER BY i.ord
                 ON CONFLICT DO NOTHING",
                &[&group_id, &ids],
            )?;
            audit_in(s, &audit.entry(None, None, &[("added", added.into())]))?;
            Ok(added as usize)
        })
    }

    fn group_member_ids(&self, group_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found =
                s.query("SELECT device_id FROM group_members WHERE group_id = $1 ORDER BY device_id", &[&group_id])?;
            rows(found, |r| Ok(r.try_get(0)?))
        })
    }

    fn device_ids_by_sn(&self, org_id: i64, sns: &[String]) -> StoreResult<Vec<(String, Option<i64>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT i.sn, d.id FROM unnest($2::text[]) WITH ORDINALITY AS i(sn, ord)
                 LEFT JOIN devices d ON d.org_id = $1 AND d.sn = i.sn
                 ORDER BY i.ord",
                &[&org_id, &sns],
            )?;
            rows(found, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn insert_gudid(&self, row: &GudidRow) -> StoreResult<GudidRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by, provisioned_at,
                                         expires_at, used_at, bootstrap_hash, revoked_at, revoked_by)
                     VALUES ($1, $2, $3, '\\x', $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
                    &[
                        &row.org_id,
                        &row.device_id,
                        &row.gudid_id,
                        &row.sealed_mac_key,
                        &row.provisioned_by,
                        &row.provisioned_at,
                        &row.expires_at,
                        &row.used_at,
                        &row.bootstrap_hash,
                        &row.revoked_at,
                        &row.revoked_by,
                    ],
                )?
                .try_get(0)?;
            Ok(GudidRow { id, ..row.clone() })
        })
    }

    fn provision_gudids(
        &self,
        org_id: i64,
        gudids: &[NewGudid],
        at: Millis,
        actor: &Actor,
    ) -> StoreResult<Vec<ProvisionedGudid>> {
        let sns: Vec<&str> = gudids.iter().map(|g| g.sn.as_str()).collect();
        self.write(|s| {
            // The devices' rows locked (not against the foreign keys that point at them): two
            // provisionings for one SN at once run one after the other, so the second revokes
            // the first's GUDID and one stays live.
            let found = s.query(
                "SELECT id, sn FROM devices WHERE org_id = $1 AND sn = ANY($2) ORDER BY id FOR NO KEY UPDATE",
                &[&org_id, &sns],
            )?;
            let mut devices = HashMap::with_capacity(found.len());
            for row in &found {
                devices.insert(row.try_get::<_, String>(1)?, row.try_get::<_, i64>(0)?);
            }
            let unknown: Vec<String> =
                gudids.iter().filter(|g| !devices.contains_key(&g.sn)).map(|g| g.sn.clone()).collect();
            if !unknown.is_empty() {
                return Err(unknown_sns_error(&unknown).into());
            }
            let mut out = Vec::with_capacity(gudids.len());
            for g in gudids {
                let device_id = devices[&g.sn];
                let id: i64 = s
                    .query_one(
                        "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by,
                                             provisioned_at, expires_at, bootstrap_hash)
                         VALUES ($1, $2, $3, '\\x', $4, $5, $6, $7, $8) RETURNING id",
                        &[
                            &org_id,
                            &device_id,
                            &g.gudid_id,
                            &g.sealed_mac_key,
                            &actor.label,
                            &at,
                            &g.expires_at,
                            &g.bootstrap_hash,
                        ],
                    )?
                    .try_get(0)?;
                let revoked: Vec<i64> = rows(
                    s.query(
                        "UPDATE gudids SET revoked_at = $2, revoked_by = $3
                         WHERE device_id = $1 AND id <> $4 AND used_at IS NULL AND revoked_at IS NULL
                           AND expires_at > $2
                         RETURNING id",
                        &[&device_id, &at, &actor.label, &id],
                    )?,
                    |r| Ok(r.try_get(0)?),
                )?;
                for old in &revoked {
                    let details = serde_json::json!({"gudid": old, "reason": "replaced", "replaced_by": id});
                    audit_in(s, &gudid_audit(org_id, actor, at, "gudid.revoke", &g.sn, details))?;
                }
                let details = serde_json::json!({"gudid": id, "expires_at": g.expires_at, "revoked": revoked});
                audit_in(s, &gudid_audit(org_id, actor, at, "gudid.provision", &g.sn, details))?;
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
        self.write(|s| {
            let row = s
                .query_opt(
                    concat!(gudid_select!(), " WHERE g.id = $1 AND g.org_id = $2 FOR UPDATE OF g"),
                    &[&id, &org_id],
                )?
                .map(|r| gudid_row(&r))
                .transpose()?
                .ok_or_else(|| Failure::from(StoreError::NotFound(format!("no GUDID {id}"))))?;
            if !row.is_live(at) {
                return Err(StoreError::Conflict(format!(
                    "GUDID {id} is {}: only a live GUDID can be revoked",
                    row.status(at)
                ))
                .into());
            }
            s.execute("UPDATE gudids SET revoked_at = $2, revoked_by = $3 WHERE id = $1", &[&id, &at, &actor.label])?;
            let details = serde_json::json!({"gudid": id, "reason": "revoked"});
            audit_in(s, &gudid_audit(org_id, actor, at, "gudid.revoke", &row.sn, details))?;
            Ok(GudidRow { revoked_at: Some(at), revoked_by: Some(actor.label.clone()), ..row })
        })
    }

    fn live_bootstrap_hashes(
        &self,
        sn: Option<&str>,
        now: Millis,
        spent_after: Option<Millis>,
    ) -> StoreResult<Vec<(String, String)>> {
        let spent_after = spent_after.unwrap_or(Millis::MAX);
        // One SN (every bootstrap CONNECT): index searches, not a plan that must also serve "all".
        let sql = match sn {
            Some(_) => {
                "SELECT d.sn, g.bootstrap_hash FROM devices d
                 JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
                 WHERE d.sn = $1::text AND g.expires_at > $2
                   AND (g.used_at IS NULL OR g.used_at > $3)
                   AND g.revoked_at IS NULL
                   AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            }
            None => {
                "SELECT d.sn, g.bootstrap_hash FROM gudids g JOIN devices d ON d.id = g.device_id
                 WHERE $1::text IS NULL AND g.expires_at > $2
                   AND (g.used_at IS NULL OR g.used_at > $3)
                   AND g.revoked_at IS NULL
                   AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            }
        };
        self.read(|s| {
            let found = s.query(sql, &[&sn, &now, &spent_after])?;
            rows(found, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn gudid_by_id(&self, gudid_id: &[u8]) -> StoreResult<Option<GudidRow>> {
        self.read(|s| {
            s.query_opt(concat!(gudid_select!(), " WHERE g.gudid_id = $1"), &[&gudid_id])?
                .map(|r| gudid_row(&r))
                .transpose()
        })
    }

    fn list_gudids(&self, org_id: i64, filter: &GudidFilter) -> StoreResult<Vec<GudidRow>> {
        let limit = (filter.limit > 0).then_some(filter.limit);
        self.read(|s| {
            let found = s.query(
                concat!(
                    gudid_select!(),
                    " WHERE g.org_id = $1 AND ($2::text IS NULL OR d.sn = $2)
                       AND ($3::bigint IS NULL OR (g.used_at IS NULL AND g.revoked_at IS NULL AND g.expires_at > $3))
                     ORDER BY g.id DESC LIMIT $4"
                ),
                &[&org_id, &filter.sn, &filter.live_at, &limit],
            )?;
            rows(found, gudid_row)
        })
    }

    fn spend_gudid(
        &self,
        gudid_row: i64,
        device_id: i64,
        creds: &NewCredentials,
        at: Millis,
    ) -> StoreResult<DeviceCredentials> {
        self.write(|s| {
            spend_gudid_in(s, gudid_row, device_id, creds, at)?
                .ok_or_else(|| StoreError::Conflict("GUDID already used".into()).into())
        })
    }

    fn create_task_with(
        &self,
        task: &NewTask,
        audit: &Audit,
        fill: &mut dyn FnMut(&mut dyn TaskSink) -> StoreResult<()>,
    ) -> StoreResult<TaskRow> {
        let (task_id, inserted) = self.write(|s| {
            // The organization's row, locked, orders the nodes numbering its tasks at once.
            s.execute("SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE", &[&task.org_id])?;
            let task_id: i64 = s
                .query_one(
                    "INSERT INTO tasks (org_id, key_source_id, slot, key_type, created_at, expires_at, created_by, request_id, number)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                             (SELECT COALESCE(MAX(number), 0) + 1 FROM tasks WHERE org_id = $1)) RETURNING id",
                    &[
                        &task.org_id,
                        &task.key_source_id,
                        &i32::from(task.slot),
                        &task.key_type,
                        &task.created_at,
                        &task.expires_at,
                        &task.created_by,
                        &task.request_id,
                    ],
                )?
                .try_get(0)?;
            let mut sink = PostgresTaskSink { s, task, task_id, inserted: 0, failure: None };
            // A failure inside the sink is kept whole, so a transient one retries the transaction.
            let filled = sink.insert(&task.executions).map(|_| ()).and_then(|()| fill(&mut sink));
            let PostgresTaskSink { s, inserted, failure, .. } = sink;
            match (filled, failure) {
                (Ok(()), _) => {
                    let number: i64 = s.query_one("SELECT number FROM tasks WHERE id = $1", &[&task_id])?.try_get(0)?;
                    let facts = [("executions", serde_json::Value::from(inserted))];
                    audit_in(s, &audit.entry(Some(format!("task:{number}")), None, &facts))?;
                    Ok((task_id, inserted))
                }
                (Err(_), Some(failure)) => Err(failure),
                (Err(e), None) => Err(Failure::Store(e)),
            }
        })?;
        committed_task(self.task(task.org_id, task_id)?, inserted)
    }

    fn task_by_request_id(&self, org_id: i64, request_id: i64) -> StoreResult<Option<TaskRow>> {
        self.read(|s| {
            s.query_opt(concat!(task_select!(), " WHERE t.org_id = $1 AND t.request_id = $2"), &[&org_id, &request_id])?
                .map(|r| task_row(&r))
                .transpose()
        })
    }

    fn list_tasks(
        &self,
        org_id: i64,
        unfinished: Option<bool>,
        limit: i64,
        before: Option<i64>,
    ) -> StoreResult<Vec<TaskRow>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    task_select!(),
                    " WHERE t.org_id = $1 AND ($2::boolean IS NULL OR
                        EXISTS (SELECT 1 FROM executions e WHERE e.task_id = t.id AND e.state IN ('queued', 'delivered')) = $2)
                      AND ($4::bigint IS NULL OR t.number < $4)
                      ORDER BY t.number DESC LIMIT $3"
                ),
                &[&org_id, &unfinished, &limit_or_all(limit), &before],
            )?;
            rows(found, task_row)
        })
    }

    fn task_id_by_number(&self, org_id: i64, number: i64) -> StoreResult<i64> {
        self.read(|s| {
            s.query_opt("SELECT id FROM tasks WHERE org_id = $1 AND number = $2", &[&org_id, &number])?
                .map(|r| r.try_get(0).map_err(Failure::from))
                .unwrap_or_else(|| Err(not_found(format!("task {number}"))))
        })
    }

    fn task(&self, org_id: i64, id: i64) -> StoreResult<TaskRow> {
        self.read(|s| {
            s.query_opt(concat!(task_select!(), " WHERE t.org_id = $1 AND t.id = $2"), &[&org_id, &id])?
                .map(|r| task_row(&r))
                .unwrap_or_else(|| Err(not_found(format!("task {id}"))))
        })
    }

    fn task_executions_page(&self, task_id: i64, offset: i64, limit: Option<i64>) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            // PostgreSQL: LIMIT NULL is no limit.
            let found = s.query(
                concat!(execution_select!(), " WHERE e.task_id = $1 ORDER BY e.id LIMIT $2 OFFSET $3"),
                &[&task_id, &limit, &offset.max(0)],
            )?;
            rows(found, execution_row)
        })
    }

    fn open_executions(&self) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            let found =
                s.query(concat!(execution_select!(), " WHERE e.state IN ('queued', 'delivered') ORDER BY e.id"), &[])?;
            rows(found, execution_row)
        })
    }

    fn open_executions_for_device(&self, device_id: i64) -> StoreResult<Vec<ExecutionRow>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    execution_select!(),
                    " WHERE e.device_id = $1 AND e.state IN ('queued', 'delivered') ORDER BY e.id"
                ),
                &[&device_id],
            )?;
            rows(found, execution_row)
        })
    }

    fn still_open(&self, ids: &[i64]) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found = s.query(
                "SELECT id FROM executions WHERE state IN ('queued', 'delivered') AND id = ANY ($1) ORDER BY id",
                &[&ids],
            )?;
            rows(found, |r| Ok(r.try_get(0)?))
        })
    }

    fn claim_redeliveries(
        &self,
        now: Millis,
        first_ms: i64,
        initial_ms: i64,
        max_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<ExecutionRow>> {
        self.write(|s| {
            let found = s.query(CLAIM_REDELIVERIES, &[&now, &first_ms, &initial_ms, &max_ms, &limit])?;
            rows(found, execution_row)
        })
    }

    fn open_execution_device_ids(&self, org_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found = s.query(
                "SELECT DISTINCT device_id FROM executions WHERE org_id = $1 AND state IN ('queued', 'delivered')",
                &[&org_id],
            )?;
            rows(found, |r| Ok(r.try_get(0)?))
        })
    }

    fn execution(&self, id: i64) -> StoreResult<ExecutionRow> {
        self.read(|s| {
            s.query_opt(concat!(execution_select!(), " WHERE e.id = $1"), &[&id])?
                .map(|r| execution_row(&r))
                .unwrap_or_else(|| Err(not_found(format!("execution {id}"))))
        })
    }

    fn rewrap_execution(&self, id: i64, key_block: &str, generation: i64) -> StoreResult<()> {
        self.write(|s| {
            s.execute(
                "UPDATE executions SET key_block = $2, generation = $3 WHERE id = $1 AND state IN ('queued', 'delivered')",
                &[&id, &key_block, &generation],
            )?;
            Ok(())
        })
    }

    fn stop_task(&self, org_id: i64, task_id: i64, at: Millis, audit: &Audit) -> StoreResult<Vec<i64>> {
        let terminated = ExecutionState::Terminated;
        let from = states_that_can_become(terminated);
        self.write(|s| {
            // The task row's lock orders two stops of one task, on any node.
            if s.query_opt("SELECT id FROM tasks WHERE org_id = $1 AND id = $2 FOR UPDATE", &[&org_id, &task_id])?
                .is_none()
            {
                return Err(not_found(format!("task {task_id}")));
            }
            let ended = s.query(STOP_TASK, &[&task_id, &at, &terminated.as_str(), &from])?;
            let ids = rows(ended, |r| Ok(r.try_get(0)?))?;
            s.execute("UPDATE tasks SET stopped_at = COALESCE(stopped_at, $2) WHERE id = $1", &[&task_id, &at])?;
            audit_in(s, &audit.entry(None, None, &[("terminated", ids.len().into())]))?;
            Ok(ids)
        })
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<(i64, i64)>> {
        let expired = ExecutionState::Expired;
        let from = states_that_can_become(expired);
        self.write(|s| {
            let ended = s.query(EXPIRE_DUE, &[&now, &expired.as_str(), &from])?;
            rows(ended, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
        })
    }

    fn apply_batch(&self, writes: &[Write]) -> StoreResult<BatchOutcome> {
        // An ending to an open state would leave the execution open with a record, and a second
        // ending would then break `UNIQUE (execution_id)`. The engine never writes one; the
        // rounds' "first ending wins" relies on it. (SQLite's store accepts it.)
        for w in writes {
            if let Write::End(e) = w {
                if e.state.is_open() {
                    return Err(StoreError::Invalid(format!(
                        "execution {}: an ending must be a final state, not {}",
                        e.execution_id, e.state
                    )));
                }
            }
        }
        let lock_endings: Vec<i64> = writes
            .iter()
            .filter_map(|w| match w {
                Write::End(e) if e.lock_device => Some(e.execution_id),
                _ => None,
            })
            .collect();
        let has_reports = writes.iter().any(|w| matches!(w, Write::Report(_)));
        self.write(|s| {
            // A device-locking ending and a report on the same device must keep their order;
            // the ending names only its execution, so look the devices up (executions never
            // change device). Not needed when there is nothing to order them against.
            let mut device_of = HashMap::new();
            if has_reports && !lock_endings.is_empty() {
                for r in s.query("SELECT id, device_id FROM executions WHERE id = ANY ($1)", &[&lock_endings])? {
                    device_of.insert(r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?);
                }
            }
            let mut ended = Vec::new();
            let mut initialised = Vec::new();
            for round in plan_rounds(writes, &device_of) {
                apply_round(s, &round, &mut ended, &mut initialised)?;
            }
            ended.sort_by_key(|(index, _, _)| *index);
            initialised.sort_by_key(|(index, _, _)| *index);
            Ok(BatchOutcome {
                ended: ended.into_iter().map(|(_, id, state)| (id, state)).collect(),
                initialised: initialised.into_iter().map(|(_, gudid, creds)| (gudid, creds)).collect(),
            })
        })
    }

    fn list_records(&self, org_id: i64, f: &RecordFilter) -> StoreResult<Vec<RecordRow>> {
        let limit = (f.limit > 0).then_some(f.limit);
        let offset = f.offset.max(0);
        self.read(|s| {
            let found = s.query(
                "SELECT id, org_id, execution_id, task_id, sn, key_source, key_type, injection, result, error_code, at,
                        key_id, kcv, (SELECT number FROM tasks WHERE tasks.id = records.task_id)
                 FROM records WHERE org_id = $1 AND ($2::text IS NULL OR sn = $2) AND ($3::bigint IS NULL OR task_id = $3)
                 AND ($6::bigint IS NULL OR id < $6)
                 ORDER BY id DESC LIMIT $4 OFFSET $5",
                &[&org_id, &f.sn, &f.task_id, &limit, &offset, &f.before_id],
            )?;
            rows(found, record_row)
        })
    }

    fn billing(&self, org_id: i64) -> StoreResult<Vec<BillingRow>> {
        self.read(|s| {
            let found = s.query(
                "SELECT key_source, to_char(to_timestamp(at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM') AS month, count(*)
                 FROM records WHERE org_id = $1 AND result = 'succeeded'
                 GROUP BY key_source, month ORDER BY month, key_source COLLATE \"C\"",
                &[&org_id],
            )?;
            rows(found, |r| Ok(BillingRow { key_source: r.try_get(0)?, month: r.try_get(1)?, keys: r.try_get(2)? }))
        })
    }

    fn count_records_for_execution(&self, execution_id: i64) -> StoreResult<i64> {
        self.read(|s| {
            Ok(s.query_one("SELECT count(*) FROM records WHERE execution_id = $1", &[&execution_id])?.try_get(0)?)
        })
    }

    fn execution_state_counts(&self) -> StoreResult<Vec<(i64, ExecutionState, i64)>> {
        self.read(|s| {
            let found = s.query("SELECT org_id, state, count(*) FROM executions GROUP BY org_id, state", &[])?;
            let mut out = Vec::with_capacity(found.len());
            for r in &found {
                let state: String = r.try_get(1)?;
                if let Some(state) = ExecutionState::parse(&state) {
                    out.push((r.try_get(0)?, state, r.try_get(2)?));
                }
            }
            Ok(out)
        })
    }

    fn expiring_within(&self, now: Millis, within_ms: i64) -> StoreResult<i64> {
        self.read(|s| {
            Ok(s.query_one(
                "SELECT count(*) FROM executions WHERE state IN ('queued', 'delivered') AND deadline <= $1",
                &[&(now + within_ms)],
            )?
            .try_get(0)?)
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn mark(&self, key: &str) -> StoreResult<Option<i64>> {
        Ok(parse_mark(self.meta(key)?))
    }

    fn raise_mark(&self, key: &str, value: i64) -> StoreResult<i64> {
        // One statement: nodes raising the mark at once keep the highest (a row lock orders them).
        let text = value.to_string();
        let raised: String = self.write(|s| {
            Ok(s.query_one(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
                 SET value = GREATEST(meta.value::bigint, EXCLUDED.value::bigint)::text RETURNING value",
                &[&key, &text],
            )?
            .try_get(0)?)
        })?;
        parse_mark(Some(raised)).ok_or_else(|| StoreError::Backend(format!("meta {key}: not a number")))
    }
}
