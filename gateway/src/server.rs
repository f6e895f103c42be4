//! Wiring: store, key service, engine, MQTT endpoint (or external broker link) and HTTP, started
//! in that order; stopped in reverse on SIGTERM or Ctrl-C, with the store flushed.

use std::sync::Arc;

use rki_protocol::frame::MacKey;
use rki_protocol::SecretBytes;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Coordination, Engine, EngineOptions};
use crate::keyservice::{KeyService, MasterKey, SoftwareKeyService};
use crate::store::guard::{self, DataDirLock};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// Raises the open-file soft limit to the hard limit: every MQTT connection is a descriptor.
pub fn raise_fd_limit() -> u64 {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// Opens the store, creating the data directory (0700; the store's files 0600). Used by `run` and
/// by the offline commands, each holding the data directory's lock ([`lock_data_dir`]).
pub fn open_store(config: &Config) -> Result<Arc<SqliteStore>, String> {
    create_data_dir(config)?;
    let path = config.store_path();
    let store = SqliteStore::open(&path).map_err(|e| format!("store {}: {e}", path.display()))?;
    guard::make_private(&config.data_dir, &path)?;
    Ok(Arc::new(store))
}

fn create_data_dir(config: &Config) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .map_err(|e| format!("data dir {}: {e}", config.data_dir.display()))
}

/// Takes the data directory's lock for `what`, for an SQLite store: one process at a time may
/// open it for writing (see [`guard`]). `None` for PostgreSQL, which many nodes share.
pub fn lock_data_dir(config: &Config, what: &str) -> Result<Option<DataDirLock>, String> {
    if config.store != "sqlite" {
        return Ok(None);
    }
    create_data_dir(config)?;
    DataDirLock::acquire(&config.data_dir, what).map(Some)
}

/// Whether the configured SQLite store is missing or empty (0 bytes); `None` for PostgreSQL,
/// which says so only once connected (no stamp).
fn sqlite_store_is_empty(config: &Config) -> Option<bool> {
    (config.store == "sqlite").then(|| std::fs::metadata(config.store_path()).map(|m| m.len() == 0).unwrap_or(true))
}

/// Opens the store only if it is the one the master key belongs to: a missing or empty store
/// beside an existing master key (a mis-pointed data directory, a lost disk) is refused unless
/// `init` says a new store is intended, and a store sealed under a master key that is missing is
/// refused too. Then SQLite checks the database (`store_check`), and the store is stamped with
/// its identity and the master key's KCV.
pub fn open_checked(config: &Config, init: bool) -> Result<(OpenedStore, MasterKey), String> {
    let master_path = config.master_key_path();
    let master_exists = master_path.exists();
    if master_exists && sqlite_store_is_empty(config) == Some(true) && !init {
        return Err(format!(
            "the store {} is missing or empty, but the master key {} exists: the data directory may be the \
             wrong one, or its files lost. Point data_dir at the store this key belongs to, or restore it from \
             a backup. To start a new, empty store under this key on purpose, run with --init",
            config.store_path().display(),
            master_path.display()
        ));
    }
    let store = OpenedStore::open(config)?;
    store.check_integrity(&config.store_check)?;
    let stamped = store.meta("master_key_kcv")?;
    if let (false, Some(kcv)) = (master_exists, &stamped) {
        return Err(format!(
            "the store is sealed under a master key (KCV {kcv}), but there is no master key at {}: point \
             master_key_file at it. A new key would open nothing in this store",
            master_path.display()
        ));
    }
    if master_exists && stamped.is_none() && !init {
        return Err(format!(
            "the store {} has never been used with the master key {}: it may be the wrong store. To start it \
             under this key on purpose, run with --init",
            redact_url(&config.store),
            master_path.display()
        ));
    }
    let (master, created) = MasterKey::load_or_create(&master_path).map_err(|e| e.to_string())?;
    if created {
        warn!(
            path = %master_path.display(),
            "generated a new master key (mode 0600). It encrypts every key in the store: back it up \
             separately from the data directory, keep it offline, and never store it beside the backups"
        );
    }
    check_master_key(&store, &master)?;
    Ok((store, master))
}

/// Runs the gateway until SIGTERM or Ctrl-C. `init`: a missing or empty store may be created
/// beside an existing master key ([`open_checked`]).
pub async fn run(config: Config, init: bool) -> Result<(), String> {
    let fd_limit = raise_fd_limit();
    let _data_dir_lock = lock_data_dir(&config, "the running gateway (rki-gateway run)")?;
    // The endpoint's sockets are bound before the store opens: a terminal reconnecting while the
    // gateway starts waits in the listen backlog for its CONNACK instead of being refused and
    // backing off (a reconnect storm after a restart).
    let tls_files = match (&config.mqtt.tls_addr, &config.mqtt.tls_cert, &config.mqtt.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some((*addr, cert.clone(), key.clone())),
        _ => None,
    };
    let listeners = match config.broker.external() {
        None => {
            Some(crate::mqtt::Endpoint::bind(Some(config.mqtt_addr), tls_files.as_ref().map(|(addr, _, _)| *addr))?)
        }
        Some(_) => None,
    };
    // PostgreSQL's synchronous client runs its own runtime: never on an async thread.
    let (store, master) = tokio::task::block_in_place(|| open_checked(&config, init))?;
    let keys = Arc::new(SoftwareKeyService::new(master));
    tokio::task::block_in_place(|| seal_legacy_gudid_keys(&store, keys.as_ref()))?;
    let clock = Arc::new(if config.clock == "adjustable" {
        let clock = Clock::adjustable_persisted(&config.data_dir)?;
        warn!(offset_ms = clock.offset_ms(), "the clock is adjustable (tests only)");
        clock
    } else {
        Clock::system()
    });
    let prometheus = crate::metrics::install()?;
    let max_connections = if config.max_connections > 0 {
        config.max_connections
    } else {
        crate::mqtt::rules::connection_bound(rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(_, hard)| hard))
    };
    let store_dyn: Arc<dyn Store> = store.as_dyn();
    let options = EngineOptions {
        retry_initial_ms: config.retry_initial_seconds.saturating_mul(1000) as i64,
        ..EngineOptions::default()
    };
    let engine = match config.broker.external() {
        None => {
            let m = &config.mqtt;
            let endpoint = crate::mqtt::Endpoint::new(crate::mqtt::Settings {
                connect_timeout: std::time::Duration::from_millis(m.connect_timeout_ms),
                session_messages_max: m.session_messages_max,
                session_lifetime_max: std::time::Duration::from_secs(m.session_expiry_seconds_max),
                connections_max: max_connections,
            });
            let engine = Engine::start_with(store_dyn, keys, clock, endpoint.outbound(), options)
                .await
                .map_err(|e| e.to_string())?;
            let listeners = listeners.ok_or("the MQTT endpoint's sockets are not bound")?;
            let tls = tls_files.as_ref().map(|(_, cert, key)| (cert.as_path(), key.as_path()));
            endpoint.serve(engine.clone(), listeners, tls).await?;
            engine
        }
        Some(external) => {
            let shared_store = matches!(store, OpenedStore::Postgres(_));
            let mut link = crate::external::ExternalLink::new(external, shared_store)?;
            // Other nodes share the store only if it is PostgreSQL (an SQLite file has one node).
            let coordination = if shared_store { Coordination::Shared } else { Coordination::Single };
            let options = EngineOptions { coordination, ..options };
            let engine = Engine::start_with(store_dyn, keys, clock, link.outbound.clone(), options)
                .await
                .map_err(|e| e.to_string())?;
            link.run(engine.clone())?;
            if let Some(sync) = &external.mosquitto_sync {
                crate::mosquitto::spawn_sync(engine.clone(), sync.clone(), external.clone())?;
            }
            if let Some(admin) = &link.dynsec {
                crate::dynsec::spawn_reconcile(admin.clone(), engine.clone());
            }
            info!(url = %external.url, "using the external MQTT broker; device authentication and ACLs are the broker's");
            engine
        }
    };
    let channel_settings = crate::channel::ChannelSettings {
        events_retention_days: config.backend_events_retention_days,
        events_per_org_max: config.backend_events_per_org_max,
    };
    let requests = crate::channel::BackendChannel::start(
        crate::service::Service::new(engine.clone()),
        engine.outbound(),
        channel_settings,
    );
    engine.attach_backend_channel(requests);
    let sqlite = matches!(store, OpenedStore::Sqlite(_));
    engine.health.configure(
        config.store_slow_commit_ms,
        sqlite.then(|| config.data_dir.clone()),
        config.store_min_free_bytes,
    );
    if sqlite {
        // Everything that could touch the store's descriptors has started: nothing may have
        // released SQLite's locks (see `store::guard`; a lock counts as lost only when several
        // readings of /proc/locks miss it).
        crate::store::guard::check_sqlite_locks_held_off_workers(config.store_path()).await?;
        metrics::gauge!(crate::metrics::STORE_LOCKS_HELD).set(1.0);
    }
    crate::sampler::spawn(engine.clone(), config.store_path(), sqlite);
    let state = Arc::new(AppState::new(engine.clone(), prometheus));
    let listener =
        tokio::net::TcpListener::bind(config.http_addr).await.map_err(|e| format!("http {}: {e}", config.http_addr))?;
    let http_connections = crate::http::max_connections(fd_limit, max_connections);
    let limits = crate::http::Limits {
        max_connections: http_connections,
        header_read_timeout: std::time::Duration::from_secs(config.http_header_timeout_seconds),
        body_read_timeout: std::time::Duration::from_secs(config.http_body_timeout_seconds),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("metrics {addr}: {e}"))?;
            let router = api::metrics_router(state.clone());
            let limits = crate::http::Limits { max_connections: 16, ..limits };
            Some(tokio::spawn(crate::http::serve(listener, router, limits, stop_rx.clone())))
        }
        None => None,
    };
    info!(http = %config.http_addr, mqtt = %config.mqtt_addr, fd_limit, http_connections, data_dir = %config.data_dir.display(), "rki-gateway ready");
    let api_server =
        tokio::spawn(crate::http::serve(listener, api::router(state, config.metrics_addr.is_none()), limits, stop_rx));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = api_server.await;
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    info!("shutting down: flushing the store");
    engine.flush().await.map_err(|e| e.to_string())?;
    info!("stopped");
    Ok(())
}

/// The configured store: SQLite in the data directory (default) or PostgreSQL.
pub enum OpenedStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<crate::store::postgres::PostgresStore>),
}

impl OpenedStore {
    pub fn open(config: &Config) -> Result<Self, String> {
        if config.store == "sqlite" {
            return open_store(config).map(OpenedStore::Sqlite);
        }
        let store = crate::store::postgres::PostgresStore::connect(&config.store, config.store_pool_size)
            .map_err(|e| format!("store {}: {e}", redact_url(&config.store)))?;
        Ok(OpenedStore::Postgres(Arc::new(store)))
    }

    pub fn as_dyn(&self) -> Arc<dyn Store> {
        match self {
            OpenedStore::Sqlite(s) => s.clone(),
            OpenedStore::Postgres(s) => s.clone(),
        }
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, String> {
        match self {
            OpenedStore::Sqlite(s) => s.meta(key),
            OpenedStore::Postgres(s) => s.meta(key),
        }
        .map_err(|e| e.to_string())
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), String> {
        match self {
            OpenedStore::Sqlite(s) => s.set_meta(key, value),
            OpenedStore::Postgres(s) => s.set_meta(key, value),
        }
        .map_err(|e| e.to_string())
    }

    /// Runs the configured integrity check (`quick`, `full` or `off`) on an SQLite store; refuses a
    /// store that fails it, with its first findings.
    pub fn check_integrity(&self, check: &str) -> Result<(), String> {
        let OpenedStore::Sqlite(s) = self else { return Ok(()) };
        if check == "off" {
            return Ok(());
        }
        // A page too damaged to walk makes the check itself fail (SQLITE_CORRUPT): the same verdict.
        let findings = s.check_integrity(check == "full").unwrap_or_else(|e| vec![e.to_string()]);
        if findings.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the store failed SQLite's {check} check, so it is not trusted: {}. Restore it from a backup \
             (docs/OPERATIONS.md, \"Backups\")",
            findings.join("; ")
        ))
    }

    pub fn reseal_all(&self, reseal: impl Fn(&str) -> Result<String, String>, kcv: &str) -> Result<usize, String> {
        match self {
            OpenedStore::Sqlite(s) => s.reseal_all(reseal, kcv),
            OpenedStore::Postgres(s) => s.reseal_all(reseal, kcv),
        }
        .map_err(|e| e.to_string())
    }
}

/// Seals the MAC keys of the GUDIDs a pre-schema-7 gateway stored in the clear (PROTOCOL.md
/// §7.2's `gudid_mac_key`), so that nothing in the store lets anyone initialise a terminal
/// without the master key. Runs at every start, once the master key is checked; a no-op once done.
pub fn seal_legacy_gudid_keys(store: &OpenedStore, keys: &dyn KeyService) -> Result<(), String> {
    let seal = |clear: &[u8]| -> Result<String, String> {
        let key = MacKey::new(SecretBytes::from_slice(clear)).map_err(|e| format!("a stored GUDID MAC key: {e}"))?;
        keys.seal_gudid_mac_key(&key).map_err(|e| e.to_string())
    };
    let sealed = match store {
        OpenedStore::Sqlite(s) => s.seal_legacy_gudid_keys(seal),
        OpenedStore::Postgres(s) => s.seal_legacy_gudid_keys(seal),
    }
    .map_err(|e| format!("sealing the GUDID MAC keys stored in the clear: {e}"))?;
    if sealed > 0 {
        warn!(
            sealed,
            "sealed the MAC keys of {sealed} GUDIDs that an older gateway stored in the clear; backups taken before \
             this start still hold them: revoke the live GUDIDs provisioned before the upgrade if such a backup may \
             have leaked (rkictl gudids list --live, rkictl gudids revoke ID)"
        );
    }
    Ok(())
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Refuses to start with a master key other than the one the store was sealed under.
fn check_master_key(store: &OpenedStore, master: &MasterKey) -> Result<(), String> {
    let kcv = master.kcv().to_hex();
    match store.meta("master_key_kcv").map_err(|e| e.to_string())? {
        Some(stored) if stored != kcv => Err(format!(
            "the master key (KCV {kcv}) is not the one this store was sealed under (KCV {stored}); point master_key_file at the right key"
        )),
        Some(_) => Ok(()),
        None => store.set_meta("master_key_kcv", &kcv).map_err(|e| e.to_string()),
    }?;
    // The store's identity, in the log of every start: a restored or swapped store shows.
    let id = match store.meta("store_id")? {
        Some(id) => id,
        None => {
            let id = hex::encode(SecretBytes::random(16).map_err(|e| e.to_string())?.expose_secret());
            store.set_meta("store_id", &id)?;
            id
        }
    };
    info!(store_id = %id, master_key_kcv = %kcv, "store opened");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
