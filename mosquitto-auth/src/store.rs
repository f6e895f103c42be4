//! The store link: one PostgreSQL connection owned by the plugin, with one prepared statement on
//! the `rki_broker_credentials` view (migrations 11 and 12), driven by a worker thread of its own.
//!
//! Why a worker: Mosquitto calls the plugin on its only thread, so whatever the plugin waits for,
//! every client waits for. A refused connection answers at once, but a database host that
//! vanished, or a server that accepts and never answers, would hold a synchronous call for as
//! long as TCP lets it. So the broker thread never connects: it hands each lookup to the worker
//! and waits for the answer at most [`ANSWER_WAIT_MAX`]. While the worker has no session, or is
//! still on a lookup the broker gave up on, a CONNECT is refused at once. The worker reconnects
//! in between, at most once per [`RECONNECT_INTERVAL`], each attempt bounded by
//! [`CONNECT_TIMEOUT`], and every statement by the server's `statement_timeout`
//! ([`STATEMENT_TIMEOUT_MS`]). Only the broker thread talks to Mosquitto (its log included); the
//! worker only talks to PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, Statement};
use rki_gateway::store::pg_tls::RustlsConnect;
use rki_gateway::store::postgres as pg;

use crate::auth::{Credentials, StoreUnavailable, HASHES_PER_IDENTITY_MAX};

/// The one query of a CONNECT: an identity's current hashes (the view's rule decides which), found
/// by kind and SN ([`lookup_key`]) so that the SN's unique index drives it whatever the planner's
/// statistics say (migration 12: by `username`, a fleet just uploaded was a scan of every GUDID).
pub const QUERY: &str = "SELECT password_hash FROM rki_broker_credentials WHERE kind = $1 AND name = $2 LIMIT 4";

/// The terminals' re-check after admission ([`crate::admitted::TERMINAL_RECHECKS`]): the current
/// hashes of many SNs in one query, by the same index.
pub const TERMINALS_QUERY: &str =
    "SELECT name, password_hash FROM rki_broker_credentials WHERE kind = 'terminal' AND name = ANY($1)";

/// The view's `kind` and `name` of a user name: `init@{SN}` is ('bootstrap', SN),
/// `backend@{org}~{name}` is ('backend', '{org}~{name}'), any other name a terminal's SN.
pub fn lookup_key(username: &str) -> (&'static str, &str) {
    if let Some(sn) = username.strip_prefix("init@") {
        ("bootstrap", sn)
    } else if let Some(name) = username.strip_prefix("backend@") {
        ("backend", name)
    } else {
        ("terminal", username)
    }
}
const _: () = assert!(HASHES_PER_IDENTITY_MAX == 4, "the LIMIT of QUERY");
/// Longest the broker thread waits for one lookup; then the CONNECT is refused.
pub const ANSWER_WAIT_MAX: Duration = Duration::from_secs(2);
/// The server cancels a lookup that runs longer than this (set on the session).
pub const STATEMENT_TIMEOUT_MS: u64 = 1500;
/// One attempt to reach the server (TCP) at most this long, unless the URL sets
/// `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one connection attempt per this, however many CONNECTs arrive meanwhile (each is
/// refused at once).
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// TCP keepalive on the connection: a database host that disappears is noticed while idle.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// How long the broker's shutdown waits for the worker to end (it ends at once unless a lookup
/// is stuck in the network).
const STOP_WAIT_MAX: Duration = Duration::from_secs(3);

/// The connection settings from the store URL: the gateway's own parser (`store::postgres::
/// parse_url`: libpq's `sslmode` and `sslrootcert`, on rustls), plus the plugin's bounds.
pub struct Settings {
    config: postgres::Config,
    tls: Option<RustlsConnect>,
}

impl std::fmt::Debug for Settings {
    // The configuration holds the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings").field("hosts", &self.config.get_hosts().len()).finish_non_exhaustive()
    }
}

impl Settings {
    pub fn from_url(url: &str) -> Result<Settings, String> {
        let (mut config, tls) = pg::parse_url(url).map_err(|e| e.to_string())?;
        if config.get_application_name().is_none() {
            config.application_name("rki-mosquitto-auth");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        config.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
        Ok(Settings { config, tls })
    }

    /// What the log may say about the target: the database and whether TLS is on, never the URL.
    pub fn describe(&self) -> String {
        format!(
            "database {:?}, TLS {}",
            self.config.get_dbname().unwrap_or("(default)"),
            if self.tls.is_some() { "on" } else { "off" }
        )
    }
}

/// Reads the store URL from `path`, which only its owner may read (mode 0600 or 0400): the URL
/// holds the database password, which therefore stays out of `mosquitto.conf`.
pub fn read_url_file(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("{}: mode {mode:o}; it holds a password, make it 0600", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let url = text.trim();
    if url.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(url.to_string())
}

struct Request {
    id: u64,
    what: Lookup,
}

/// What the worker is asked.
enum Lookup {
    /// One identity's hashes, at its CONNECT.
    One(String),
    /// These terminals' hashes, as (SN, hash).
    Terminals(Vec<String>),
}

struct Answer {
    id: u64,
    /// (name, hash) pairs; the name is empty for [`Lookup::One`].
    result: Result<Vec<(String, String)>, StoreUnavailable>,
}

/// The broker thread's end of the link.
pub struct StoreLink {
    /// Lookups to the worker; one at a time (capacity 1). Dropped to stop it.
    requests: Option<SyncSender<Request>>,
    answers: Receiver<Answer>,
    /// A lookup the broker gave up waiting for: the worker is still on it.
    pending: Option<u64>,
    next_id: u64,
    /// Closed when the worker ends.
    stopped: Receiver<()>,
    /// The worker's connection state, so that a CONNECT is refused at once while it reconnects.
    health: Arc<Health>,
}

/// What the worker tells the broker thread without being asked.
#[derive(Default)]
struct Health {
    /// A session is open (the last attempt or lookup did not fail).
    connected: AtomicBool,
    /// Why not, when not.
    why: Mutex<String>,
}

impl Health {
    fn set(&self, connected: Result<(), &str>) {
        if let Err(why) = connected {
            if let Ok(mut text) = self.why.lock() {
                why.clone_into(&mut text);
            }
        }
        self.connected.store(connected.is_ok(), Ordering::Release);
    }

    fn unavailable(&self) -> StoreUnavailable {
        let why = self.why.lock().map(|w| w.clone()).unwrap_or_default();
        StoreUnavailable(format!("{why} (reconnecting at most once a second)"))
    }
}

impl StoreLink {
    /// Starts the worker, which connects at once (so that the first CONNECT finds a session).
    pub fn start(settings: Settings) -> Result<StoreLink, String> {
        let (requests, requests_rx) = mpsc::sync_channel::<Request>(1);
        let (answers_tx, answers) = mpsc::channel::<Answer>();
        let (stopped_tx, stopped) = mpsc::channel::<()>();
        let health = Arc::new(Health::default());
        health.set(Err("not connected yet"));
        let worker_health = health.clone();
        std::thread::Builder::new()
            .name("rki-auth-store".into())
            .spawn(move || {
                // Dropped when the thread ends, which is what `stopped` waits for.
                let _stopped = stopped_tx;
                let connection = Connection { settings, session: None, last_attempt: None, health: worker_health };
                work(connection, requests_rx, answers_tx);
            })
            .map_err(|e| format!("start the store thread: {e}"))?;
        Ok(StoreLink { requests: Some(requests), answers, pending: None, next_id: 1, stopped, health })
    }

    /// Takes the answer to the lookup the broker gave up on, if it has come; `false` while the
    /// worker is still on it.
    fn settle_pending(&mut self) -> Result<bool, StoreUnavailable> {
        let Some(id) = self.pending else { return Ok(true) };
        loop {
            match self.answers.try_recv() {
                Ok(answer) if answer.id == id => {
                    self.pending = None;
                    return Ok(true);
                }
                Ok(_) => continue,
                Err(TryRecvError::Empty) => return Ok(false),
                Err(TryRecvError::Disconnected) => return Err(gone()),
            }
        }
    }
}

fn gone() -> StoreUnavailable {
    StoreUnavailable("the store thread has ended".into())
}

impl Credentials for StoreLink {
    fn hashes(&mut self, username: &str) -> Result<Vec<String>, StoreUnavailable> {
        Ok(self.ask(Lookup::One(username.to_string()))?.into_iter().map(|(_, hash)| hash).collect())
    }

    fn terminal_hashes(&mut self, sns: &[String]) -> Result<Vec<(String, String)>, StoreUnavailable> {
        self.ask(Lookup::Terminals(sns.to_vec()))
    }
}

impl StoreLink {
    /// Hands one lookup to the worker and waits at most [`ANSWER_WAIT_MAX`] for its answer.
    fn ask(&mut self, what: Lookup) -> Result<Vec<(String, String)>, StoreUnavailable> {
        if !self.health.connected.load(Ordering::Acquire) {
            return Err(self.health.unavailable());
        }
        if !self.settle_pending()? {
            return Err(StoreUnavailable("still waiting for the database on an earlier CONNECT".into()));
        }
        let id = self.next_id;
        self.next_id += 1;
        let requests = self.requests.as_ref().ok_or_else(gone)?;
        requests.try_send(Request { id, what }).map_err(|_| gone())?;
        self.pending = Some(id);
        let deadline = Instant::now() + ANSWER_WAIT_MAX;
        loop {
            match self.answers.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(answer) if answer.id == id => {
                    self.pending = None;
                    return answer.result;
                }
                // An answer to a lookup given up on earlier.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(StoreUnavailable(format!(
                        "no answer from the database within {} ms",
                        ANSWER_WAIT_MAX.as_millis()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }
}

impl Drop for StoreLink {
    /// Stops the worker and waits for it briefly: Mosquitto unloads the plugin's code after its
    /// cleanup, which must not leave the thread running in it.
    fn drop(&mut self) {
        self.requests = None;
        let _ = self.stopped.recv_timeout(STOP_WAIT_MAX);
    }
}

/// The worker: answers lookups on its session; without one, answers "unavailable" at once and
/// reconnects in between, at most once per [`RECONNECT_INTERVAL`], so that the broker never waits
/// for a connection attempt. Ends when the broker drops its end.
fn work(mut connection: Connection, requests: Receiver<Request>, answers: mpsc::Sender<Answer>) {
    connection.reconnect();
    loop {
        let request = if connection.session.is_some() {
            match requests.recv() {
                Ok(request) => Some(request),
                Err(_) => return,
            }
        } else {
            match requests.recv_timeout(RECONNECT_INTERVAL) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(request) = request {
            let result = match &request.what {
                Lookup::One(username) => {
                    connection.lookup(username).map(|hashes| hashes.into_iter().map(|h| (String::new(), h)).collect())
                }
                Lookup::Terminals(sns) => connection.lookup_terminals(sns),
            };
            if answers.send(Answer { id: request.id, result }).is_err() {
                return;
            }
        }
        if connection.session.is_none() {
            connection.reconnect();
        }
    }
}

/// The worker's session: a client and its prepared statement, made again after a failure.
struct Connection {
    settings: Settings,
    /// The client, [`QUERY`] and [`TERMINALS_QUERY`], prepared.
    session: Option<(Client, Statement, Statement)>,
    last_attempt: Option<Instant>,
    health: Arc<Health>,
}

impl Connection {
    /// One attempt, unless the last one was less than [`RECONNECT_INTERVAL`] ago.
    fn reconnect(&mut self) {
        let now = Instant::now();
        if self.last_attempt.is_some_and(|at| now.duration_since(at) < RECONNECT_INTERVAL) {
            return;
        }
        self.last_attempt = Some(now);
        let connected = pg::connect_with(&self.settings.config, self.settings.tls.as_ref())
            .map_err(|e| format!("connect to PostgreSQL: {}", pg::with_causes(&e)))
            .and_then(|mut client| match (client.prepare(QUERY), client.prepare(TERMINALS_QUERY)) {
                (Ok(one), Ok(terminals)) => Ok((client, one, terminals)),
                (Err(e), _) | (_, Err(e)) => Err(format!("prepare the lookups: {}", pg::with_causes(&e))),
            });
        match connected {
            Ok(session) => {
                self.session = Some(session);
                self.health.set(Ok(()));
            }
            Err(e) => self.health.set(Err(&e)),
        }
    }

    fn lookup(&mut self, username: &str) -> Result<Vec<String>, StoreUnavailable> {
        let (kind, name) = lookup_key(username);
        let rows = self.query(|(_, one, _)| one, &[&kind, &name], "look up credentials")?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| StoreUnavailable(format!("read credentials: {e}")))
    }

    fn lookup_terminals(&mut self, sns: &[String]) -> Result<Vec<(String, String)>, StoreUnavailable> {
        let rows = self.query(|(_, _, terminals)| terminals, &[&sns], "look up terminals again")?;
        rows.iter()
            .map(|row| Ok((row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?)))
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(|e| StoreUnavailable(format!("read credentials: {e}")))
    }

    /// Runs one of the session's prepared statements. Whatever fails (the connection, a cancelled
    /// statement, a changed schema), the next lookup starts from a new session.
    fn query(
        &mut self,
        statement: fn(&(Client, Statement, Statement)) -> &Statement,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<postgres::Row>, StoreUnavailable> {
        if self.session.as_ref().is_some_and(|(client, _, _)| client.is_closed()) {
            self.session = None;
            self.health.set(Err("the database closed the connection"));
        }
        let Some(session) = self.session.as_mut() else { return Err(self.health.unavailable()) };
        let prepared = statement(session).clone();
        match session.0.query(&prepared, params) {
            Ok(rows) => Ok(rows),
            Err(e) => {
                self.session = None;
                let why = format!("{what}: {}", pg::with_causes(&e));
                self.health.set(Err(&why));
                Err(StoreUnavailable(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_is_looked_up_by_the_views_kind_and_name() {
        assert_eq!(lookup_key("P3-0001"), ("terminal", "P3-0001"));
        assert_eq!(lookup_key("init@P3-0001"), ("bootstrap", "P3-0001"));
        assert_eq!(lookup_key("backend@acme~billing"), ("backend", "acme~billing"));
        // The name is passed as a parameter, never spliced: a hostile one is just a name.
        assert_eq!(lookup_key("init@x' OR '1'='1"), ("bootstrap", "x' OR '1'='1"));
    }
}
