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
//! **Batches.** [`Delivery::apply_batch`] must give exactly the result of applying its writes one by
//! one, in order (SQLite does that). One statement per write would cost one round trip each, so
//! the writes are grouped into *rounds* (`plan_rounds`) and each round applies one set-based
//! statement per kind of write: a batch of a thousand acks is a handful of statements.
//!
//! **Layout.** This file holds the errors, the pool, the sessions, opening and migrating; `batch`
//! the statements that end executions and the rounds of a batch; each role of [`Store`] is
//! implemented in a file of its own: `registry` (with the audit log), `key_sources`, `gudids`,
//! `tasks` and `delivery`; `listen` tells every node when a task is created (`NOTIFY`/`LISTEN`).
//! Rows are read by the shared mappers of `store::rows`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

use super::migrations;
use super::rows::*;
use super::*;

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
pub(crate) enum Failure {
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

pub(crate) fn not_found(what: String) -> Failure {
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
pub(crate) struct Session<'a, C: GenericClient> {
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

    pub(crate) fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.query(&statement, params)?)
    }

    pub(crate) fn query_opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.query_opt(&statement, params)?)
    }

    pub(crate) fn query_one(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Row, Failure> {
        self.query_opt(sql, params)?.ok_or_else(|| not_found("no such row".into()))
    }

    pub(crate) fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64, Failure> {
        let statement = self.statement(sql)?;
        Ok(self.client.execute(&statement, params)?)
    }
}

pub(crate) type Tx<'s, 't> = Session<'s, Transaction<'t>>;

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
    pub const SCHEMA_VERSION: usize = migrations::POSTGRES.len();

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

    pub(crate) fn read<T>(&self, mut f: impl FnMut(&mut Session<'_, Client>) -> Result<T, Failure>) -> StoreResult<T> {
        retrying(|| {
            let mut pooled = self.pool.get()?;
            let Conn { client, statements } = &mut *pooled;
            let result = f(&mut Session { client, statements });
            pooled.check(result)
        })
    }

    /// One transaction; retried whole if it failed transiently, so `f` must only touch the
    /// database and its own locals.
    pub(crate) fn write<T>(
        &self,
        mut f: impl FnMut(&mut Session<'_, Transaction<'_>>) -> Result<T, Failure>,
    ) -> StoreResult<T> {
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
                    "SELECT id, sealed_mac_key FROM backends ORDER BY id FOR UPDATE",
                    "UPDATE backends SET sealed_mac_key = $2 WHERE id = $1",
                ),
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
/// Also how the Mosquitto plugin (`mosquitto-auth/`) reads its URL, so both take the same URLs.
pub fn parse_url(url: &str) -> StoreResult<(::postgres::Config, Option<super::pg_tls::RustlsConnect>)> {
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
pub fn with_causes(e: &dyn std::error::Error) -> String {
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

/// A connection with the URL's TLS connector, or without TLS.
pub fn connect_with(
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
    migrate_to(client, migrations::POSTGRES.len())
}

/// Runs the migrations after the database's version, up to `version`.
fn migrate_to(client: &mut Client, version: usize) -> Result<(), Failure> {
    migrations::run(&mut Ledger(client), migrations::POSTGRES, version)
}

/// PostgreSQL's schema version is the highest in `schema_migrations` (one row per migration run,
/// numbered like SQLite's `PRAGMA user_version`). Each step holds the migration lock, so nodes
/// starting together migrate one at a time.
struct Ledger<'c>(&'c mut Client);

impl migrations::Ledger for Ledger<'_> {
    type Error = Failure;

    fn step(&mut self, next: &migrations::Next<'_>) -> Result<bool, Failure> {
        let mut tx = self.0.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )?;
        let current: i32 = tx.query_one("SELECT COALESCE(max(version), 0) FROM schema_migrations", &[])?.try_get(0)?;
        let Some((version, migration)) = next(i64::from(current))? else {
            tx.commit()?;
            return Ok(false);
        };
        let version = i32::try_from(version).map_err(|_| corrupt(format!("schema version {version}")))?;
        tx.batch_execute(migration.sql)?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version])?;
        tx.commit()?;
        Ok(true)
    }
}

// ---------------------------------------------------------------- rows

macro_rules! gudid_select {
    () => {
        concat!("SELECT ", gudid_columns!(), " FROM gudids g JOIN devices d ON d.id = g.device_id")
    };
}

/// A task with its execution counts by state, read in the same statement (one snapshot).
macro_rules! task_select {
    () => {
        concat!(
            "SELECT ",
            task_columns!(),
            ", c.states, c.counts
         FROM tasks t JOIN key_sources k ON k.id = t.key_source_id
         LEFT JOIN LATERAL (
             SELECT array_agg(s.state) AS states, array_agg(s.n) AS counts
             FROM (SELECT e.state, count(*) AS n FROM executions e WHERE e.task_id = t.id GROUP BY e.state) s
         ) c ON TRUE"
        )
    };
}

/// A task of [`task_select!`] with its counts.
fn task_with_counts(r: &Row) -> StoreResult<TaskRow> {
    let mut task = task_row(r)?;
    // Arrays: PostgreSQL's alone, so read by its own driver.
    let states: Option<Vec<String>> = r.try_get(12).map_err(|e| StoreError::Backend(format!("task counts: {e}")))?;
    let numbers: Option<Vec<i64>> = r.try_get(13).map_err(|e| StoreError::Backend(format!("task counts: {e}")))?;
    for (state, n) in states.unwrap_or_default().iter().zip(numbers.unwrap_or_default()) {
        count_state(&mut task.counts, state, n)?;
    }
    Ok(task)
}

macro_rules! execution_select {
    () => {
        concat!("SELECT ", execution_columns!(), " FROM ", execution_from!())
    };
}

/// The rows, each read by a shared row mapper ([`super::rows`]).
pub(crate) fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> StoreResult<T>) -> Result<Vec<T>, Failure> {
    Ok(rows.iter().map(f).collect::<StoreResult<Vec<T>>>()?)
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

/// Appends an audit entry inside the caller's transaction.
pub(crate) fn audit_in(s: &mut Tx<'_, '_>, e: &AuditEntry) -> Result<(), Failure> {
    crash::audited(&e.action);
    let details = e.details.to_string();
    s.execute(
        "INSERT INTO audit (at, org_id, actor, token_id, action, object, details) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&e.at, &e.org_id, &e.actor, &e.token_id, &e.action, &e.object, &details],
    )?;
    Ok(())
}

/// Spends the GUDID if unused (or spent and awaiting proof, `GudidRow::awaits_proof`, by a
/// CreateKey newer than the one answered: a replay is not answered anew) and unrevoked, and
/// installs the credentials; `None` if it was spent for good or revoked. A concurrent spend (or
/// revocation) waits for the first's row locks, then checks the rows again: a revocation, a proof
/// or a CreateKey no newer than the one answered refuses it.
fn spend_gudid_in(
    s: &mut Tx<'_, '_>,
    gudid_row: i64,
    device_id: i64,
    creds: &NewCredentials,
    at: Millis,
) -> Result<Option<DeviceCredentials>, Failure> {
    // The device's row first (every spend locks it before the GUDID's, so two cannot deadlock):
    // a concurrent spend's counter is then committed before the next statement's snapshot.
    s.execute("SELECT 1 FROM devices WHERE id = $1 FOR UPDATE", &[&device_id])?;
    let spent = s.execute(
        "UPDATE gudids SET used_at = COALESCE(used_at, $2)
         WHERE id = $1 AND revoked_at IS NULL
           AND (used_at IS NULL OR (proven_at IS NULL AND used_at > $3 AND expires_at > $2
                                    AND $4 > (SELECT last_counter FROM devices WHERE id = gudids.device_id)))",
        &[&gudid_row, &at, &(at - GUDID_PROOF_WINDOW_MS), &(creds.counter as i64)],
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
    Ok(Some(credentials_row(&row)?))
}

// ---------------------------------------------------------------- the store, by role

// Declared after the SQL macros above (`execution_select!`, …), which they use.
mod batch;
mod delivery;
mod gudids;
mod key_sources;
mod listen;
mod registry;
mod tasks;

use batch::{apply_round, plan_rounds, CLAIM_REDELIVERIES, EXPIRE_DUE, STOP_TASK};
