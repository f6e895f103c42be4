//! Wiring: store, key service, engine, MQTT endpoint (or external broker link) and HTTP, started
//! in that order; stopped in reverse on SIGTERM or Ctrl-C, with the store flushed.

use std::sync::Arc;

use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::Engine;
use crate::keyservice::{MasterKey, SoftwareKeyService};
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

/// Opens the store, creating the data directory. Used by `run` and by the offline commands.
pub fn open_store(config: &Config) -> Result<Arc<SqliteStore>, String> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| format!("data dir {}: {e}", config.data_dir.display()))?;
    let store =
        SqliteStore::open(&config.store_path()).map_err(|e| format!("store {}: {e}", config.store_path().display()))?;
    Ok(Arc::new(store))
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), String> {
    let fd_limit = raise_fd_limit();
    // PostgreSQL's synchronous client runs its own runtime: never on an async thread.
    let store = tokio::task::block_in_place(|| OpenedStore::open(&config))?;
    let master_path = config.master_key_path();
    let (master, created) = MasterKey::load_or_create(&master_path).map_err(|e| e.to_string())?;
    if created {
        warn!(
            path = %master_path.display(),
            "generated a new master key (mode 0600). It encrypts every key in the store: back it up \
             separately from the data directory, keep it offline, and never store it beside the backups"
        );
    }
    tokio::task::block_in_place(|| check_master_key(&store, &master))?;
    let keys = Arc::new(SoftwareKeyService::new(master));
    let clock = Arc::new(if config.clock == "adjustable" {
        warn!("the clock is adjustable (tests only)");
        Clock::adjustable()
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
    let engine = match config.broker.external() {
        None => {
            let m = &config.mqtt;
            let endpoint = crate::mqtt::Endpoint::new(crate::mqtt::Settings {
                connect_timeout: std::time::Duration::from_millis(m.connect_timeout_ms),
                session_messages_max: m.session_messages_max,
                session_lifetime_max: std::time::Duration::from_secs(m.session_expiry_seconds_max),
                connections_max: max_connections,
            });
            let engine = Engine::start(store_dyn, keys, clock, endpoint.outbound()).await.map_err(|e| e.to_string())?;
            let tls = match (m.tls_addr, &m.tls_cert, &m.tls_key) {
                (Some(addr), Some(cert), Some(key)) => Some((addr, cert.as_path(), key.as_path())),
                _ => None,
            };
            endpoint.serve(engine.clone(), Some(config.mqtt_addr), tls).await?;
            engine
        }
        Some(external) => {
            let mut link = crate::external::ExternalLink::new(external)?;
            let engine =
                Engine::start(store_dyn, keys, clock, link.outbound.clone()).await.map_err(|e| e.to_string())?;
            // Other nodes share the store only if it is PostgreSQL (an SQLite file has one node).
            engine.set_shared_store(matches!(store, OpenedStore::Postgres(_)));
            link.run(engine.clone())?;
            if let Some(sync) = &external.mosquitto_sync {
                crate::mosquitto::spawn_sync(engine.clone(), sync.clone(), external.clone())?;
            }
            info!(url = %external.url, "using the external MQTT broker; device authentication and ACLs are the broker's");
            engine
        }
    };
    engine.set_retry_initial_ms(config.retry_initial_seconds.saturating_mul(1000) as i64);
    crate::sampler::spawn(engine.clone(), config.store_path());
    let state = Arc::new(AppState { engine: engine.clone(), prometheus });
    let listener =
        tokio::net::TcpListener::bind(config.http_addr).await.map_err(|e| format!("http {}: {e}", config.http_addr))?;
    info!(http = %config.http_addr, mqtt = %config.mqtt_addr, fd_limit, data_dir = %config.data_dir.display(), "rki-gateway ready");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
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

    pub fn reseal_all(&self, reseal: impl Fn(&str) -> Result<String, String>, kcv: &str) -> Result<usize, String> {
        match self {
            OpenedStore::Sqlite(s) => s.reseal_all(reseal, kcv),
            OpenedStore::Postgres(s) => s.reseal_all(reseal, kcv),
        }
        .map_err(|e| e.to_string())
    }
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
    }
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
