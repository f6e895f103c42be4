//! Configuration: defaults, then a TOML file, then `RKI_…` environment variables, then command-line
//! flags; each later source wins. `deploy/rki-gateway.toml` is the commented sample.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the store (`rki.sqlite` and its WAL).
    pub data_dir: PathBuf,
    /// The master key file. Default: `<data_dir>.master.key`, beside the data directory and
    /// outside it, so a backup of the data directory does not carry the key that opens it.
    pub master_key_file: Option<PathBuf>,
    /// Plain-TCP listener of the MQTT endpoint.
    pub mqtt_addr: SocketAddr,
    /// The MQTT endpoint's TLS listener, deadlines and session bounds.
    pub mqtt: MqttConfig,
    /// Admin API, `/metrics` and `/healthz`.
    pub http_addr: SocketAddr,
    /// If set, `/metrics` is served on this address (with `/healthz` and `/livez`) and no longer
    /// on `http_addr`: Prometheus then needs no route to the API port.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin port closes a connection that has not sent a whole request head within this
    /// (a new one, or an idle keep-alive one).
    pub http_header_timeout_seconds: u64,
    /// A request body must arrive whole within this.
    pub http_body_timeout_seconds: u64,
    /// `system`, or `adjustable` (tests only: enables `POST /v1/admin/clock`).
    pub clock: String,
    /// `text` or `json`.
    pub log_format: String,
    /// MQTT endpoint connection bound; 0 = derived from the open-file limit.
    pub max_connections: usize,
    /// `"embedded"` (default: the gateway's own MQTT endpoint) or a table for an external broker.
    pub broker: BrokerConfig,
    /// `"sqlite"` (default: `<data_dir>/rki.sqlite`) or a PostgreSQL URL
    /// (`postgres://user:password@host:port/database`, optionally `?sslmode=…&sslrootcert=…`:
    /// [`crate::store::pg_tls`]).
    pub store: String,
    /// Connections to PostgreSQL.
    pub store_pool_size: usize,
    /// First re-delivery of an unacknowledged download to an online device; doubles up to 10 min.
    pub retry_initial_seconds: u64,
    /// The integrity check SQLite runs on the store before the gateway trusts it: `"quick"`
    /// (`PRAGMA quick_check`, the default), `"full"` (`PRAGMA integrity_check`) or `"off"`.
    pub store_check: String,
    /// SQLite: below this much free space on the data directory's filesystem, API changes are
    /// refused with 507 `storage_full` and `/healthz` reports it, so the space left goes to the
    /// terminals' acks.
    pub store_min_free_bytes: u64,
    /// A store commit that takes longer than this makes `/healthz` report the store as slow.
    pub store_slow_commit_ms: u64,
    /// Backend channel: events are kept this many days (at least 7), whether acknowledged or not;
    /// an `Events` request for older ones gets `Gap`.
    pub backend_events_retention_days: u32,
    /// Backend channel: at most this many events are kept per organization (the newest).
    pub backend_events_per_org_max: u64,
}

/// `[mqtt]`: the MQTT endpoint beyond its plain listener (`mqtt_addr`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// TLS listener; needs `tls_cert` and `tls_key`. Plain and TLS may listen together.
    pub tls_addr: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    pub tls_key: Option<PathBuf>,
    /// Time from the TCP accept to a complete CONNECT, the TLS handshake included (ms).
    pub connect_timeout_ms: u64,
    /// Downlinks a session keeps, queued or unacknowledged, at most.
    pub session_messages_max: usize,
    /// Longest a persistent session outlives its connection (seconds).
    pub session_expiry_seconds_max: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            tls_addr: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout_ms: 10_000,
            session_messages_max: 32,
            session_expiry_seconds_max: 3600,
        }
    }
}

/// Which MQTT broker the gateway uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BrokerConfig {
    /// Only `"embedded"` is valid.
    Named(String),
    External(ExternalBroker),
}

/// The gateway as a client of an external broker.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalBroker {
    /// `mqtt://host:port`.
    pub url: String,
    pub username: Option<String>,
    /// Prefer `RKI_BROKER_PASSWORD` in the environment to a password in the file.
    pub password: Option<String>,
    /// Stable per node, so the broker keeps the node's session. Default `rki-gateway-<pid>`.
    pub client_id: Option<String>,
    /// Shared-subscription group: nodes with the same group split the device traffic.
    pub shared_group: Option<String>,
    /// Connect with a persistent session (MQTT clean session 0), so that what the broker
    /// receives while this node is away (its own connection lost, the broker restarting with
    /// `persistence true`) waits for it. Default: on with a configured `client_id` and an SQLite
    /// store (one node), off otherwise (a one-off client id would leave orphan sessions, and
    /// several nodes recover a lost message by the cluster sweep instead). docs/SCALE-OUT.md.
    pub persistent_session: Option<bool>,
    /// Keep a Mosquitto password file and ACL file in step with the device registry.
    pub mosquitto_sync: Option<MosquittoSync>,
    /// Manage the broker's clients and roles through Mosquitto's dynamic security plugin
    /// (`$CONTROL/dynamic-security/v1`), on every node. Use it or `mosquitto_sync`: with both,
    /// the files are written too, for a Mosquitto that does not load the plugin.
    pub dynsec: Option<Box<Dynsec>>,
}

/// The gateway's admin identity at Mosquitto's dynamic security plugin: the only identity
/// allowed `$CONTROL`. Its password is read from a file (mode 0600, the same on every node),
/// never from the configuration text, and `rki-gateway dynsec-init` generates it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Dynsec {
    #[serde(default = "default_dynsec_admin")]
    pub admin_username: String,
    pub admin_password_file: PathBuf,
}

fn default_dynsec_admin() -> String {
    "rki-admin".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MosquittoSync {
    pub password_file: PathBuf,
    pub acl_file: PathBuf,
    /// Mosquitto's pid file: the gateway sends it SIGHUP after rewriting the files.
    pub pid_file: Option<PathBuf>,
}

impl BrokerConfig {
    pub fn external(&self) -> Option<&ExternalBroker> {
        match self {
            BrokerConfig::External(e) => Some(e),
            BrokerConfig::Named(_) => None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./rki-data"),
            master_key_file: None,
            mqtt_addr: "127.0.0.1:1883".parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1883))),
            mqtt: MqttConfig::default(),
            http_addr: "127.0.0.1:8080".parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080))),
            metrics_addr: None,
            http_header_timeout_seconds: 10,
            http_body_timeout_seconds: 30,
            clock: "system".into(),
            log_format: "text".into(),
            max_connections: 0,
            broker: BrokerConfig::Named("embedded".into()),
            store: "sqlite".into(),
            store_pool_size: 8,
            retry_initial_seconds: 15,
            store_check: "quick".into(),
            store_min_free_bytes: 64 * 1024 * 1024,
            store_slow_commit_ms: 5_000,
            backend_events_retention_days: 30,
            backend_events_per_org_max: 10_000_000,
        }
    }
}

impl Config {
    /// Reads the file (if any), then applies environment overrides.
    pub fn load(file: Option<&Path>) -> Result<Config, String> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
                toml::from_str::<Config>(&text).map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let addr =
            |name: &str, value: String| value.parse::<SocketAddr>().map_err(|e| format!("{name}={value:?}: {e}"));
        if let Some(v) = get("RKI_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("RKI_MASTER_KEY_FILE") {
            self.master_key_file = Some(v.into());
        }
        if let Some(v) = get("RKI_MQTT_ADDR") {
            self.mqtt_addr = addr("RKI_MQTT_ADDR", v)?;
        }
        if let Some(v) = get("RKI_HTTP_ADDR") {
            self.http_addr = addr("RKI_HTTP_ADDR", v)?;
        }
        if let Some(v) = get("RKI_METRICS_ADDR") {
            self.metrics_addr = Some(addr("RKI_METRICS_ADDR", v)?);
        }
        if let Some(v) = get("RKI_HTTP_HEADER_TIMEOUT_SECONDS") {
            self.http_header_timeout_seconds =
                v.parse().map_err(|e| format!("RKI_HTTP_HEADER_TIMEOUT_SECONDS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_HTTP_BODY_TIMEOUT_SECONDS") {
            self.http_body_timeout_seconds =
                v.parse().map_err(|e| format!("RKI_HTTP_BODY_TIMEOUT_SECONDS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_CLOCK") {
            self.clock = v;
        }
        if let Some(v) = get("RKI_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(url) = get("RKI_BROKER_URL") {
            let mut external = match &self.broker {
                BrokerConfig::External(e) => e.clone(),
                BrokerConfig::Named(_) => ExternalBroker {
                    url: String::new(),
                    username: None,
                    password: None,
                    client_id: None,
                    shared_group: None,
                    persistent_session: None,
                    mosquitto_sync: None,
                    dynsec: None,
                },
            };
            external.url = url;
            self.broker = BrokerConfig::External(external);
        }
        if let BrokerConfig::External(e) = &mut self.broker {
            if let Some(v) = get("RKI_BROKER_USERNAME") {
                e.username = Some(v);
            }
            if let Some(v) = get("RKI_BROKER_PASSWORD") {
                e.password = Some(v);
            }
            if let Some(v) = get("RKI_BROKER_CLIENT_ID") {
                e.client_id = Some(v);
            }
            if let Some(v) = get("RKI_BROKER_SHARED_GROUP") {
                e.shared_group = Some(v);
            }
            if let Some(v) = get("RKI_BROKER_PERSISTENT_SESSION") {
                e.persistent_session =
                    Some(v.parse().map_err(|e| format!("RKI_BROKER_PERSISTENT_SESSION={v:?}: {e} (true or false)"))?);
            }
        }
        if let Some(v) = get("RKI_BACKEND_EVENTS_RETENTION_DAYS") {
            self.backend_events_retention_days =
                v.parse().map_err(|e| format!("RKI_BACKEND_EVENTS_RETENTION_DAYS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_BACKEND_EVENTS_PER_ORG_MAX") {
            self.backend_events_per_org_max =
                v.parse().map_err(|e| format!("RKI_BACKEND_EVENTS_PER_ORG_MAX={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_RETRY_INITIAL_SECONDS") {
            self.retry_initial_seconds = v.parse().map_err(|e| format!("RKI_RETRY_INITIAL_SECONDS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_MQTT_TLS_ADDR") {
            self.mqtt.tls_addr = Some(addr("RKI_MQTT_TLS_ADDR", v)?);
        }
        if let Some(v) = get("RKI_MQTT_TLS_CERT") {
            self.mqtt.tls_cert = Some(v.into());
        }
        if let Some(v) = get("RKI_MQTT_TLS_KEY") {
            self.mqtt.tls_key = Some(v.into());
        }
        if let Some(v) = get("RKI_MQTT_CONNECT_TIMEOUT_MS") {
            self.mqtt.connect_timeout_ms = v.parse().map_err(|e| format!("RKI_MQTT_CONNECT_TIMEOUT_MS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_STORE") {
            self.store = v;
        }
        if let Some(v) = get("RKI_STORE_CHECK") {
            self.store_check = v;
        }
        if let Some(v) = get("RKI_STORE_MIN_FREE_BYTES") {
            self.store_min_free_bytes = v.parse().map_err(|e| format!("RKI_STORE_MIN_FREE_BYTES={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_STORE_SLOW_COMMIT_MS") {
            self.store_slow_commit_ms = v.parse().map_err(|e| format!("RKI_STORE_SLOW_COMMIT_MS={v:?}: {e}"))?;
        }
        if let Some(v) = get("RKI_MAX_CONNECTIONS") {
            self.max_connections = v.parse().map_err(|e| format!("RKI_MAX_CONNECTIONS={v:?}: {e}"))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.clock.as_str(), "system" | "adjustable") {
            return Err(format!("clock = {:?}: expected \"system\" or \"adjustable\"", self.clock));
        }
        match &self.broker {
            BrokerConfig::Named(name) if name != "embedded" => {
                return Err(format!(
                    "broker = {name:?}: expected \"embedded\" or a table with url = \"mqtt://host:port\""
                ));
            }
            BrokerConfig::External(e) => {
                crate::external::parse_url(&e.url)?;
                if e.dynsec.is_some() && e.username.is_none() {
                    return Err("broker.dynsec needs broker.username (the gateway's own identity)".into());
                }
            }
            BrokerConfig::Named(_) => {}
        }
        if !(self.store == "sqlite" || self.store.starts_with("postgres://") || self.store.starts_with("postgresql://"))
        {
            return Err("store: expected \"sqlite\" or a postgres://… URL".into());
        }
        if !(1..=600).contains(&self.retry_initial_seconds) {
            return Err("retry_initial_seconds must be 1 to 600".into());
        }
        let days_min = rki_protocol::backend::EVENTS_RETAINED_DAYS_MIN;
        if !(days_min..=3650).contains(&u64::from(self.backend_events_retention_days)) {
            return Err(format!("backend_events_retention_days must be {days_min} to 3650"));
        }
        if self.backend_events_per_org_max < rki_protocol::backend::EVENTS_BATCH_MAX {
            return Err("backend_events_per_org_max must be at least 1000".into());
        }
        let m = &self.mqtt;
        if !(100..=120_000).contains(&m.connect_timeout_ms) {
            return Err("mqtt.connect_timeout_ms must be 100 to 120000".into());
        }
        if !(1..=10_000).contains(&m.session_messages_max) {
            return Err("mqtt.session_messages_max must be 1 to 10000".into());
        }
        if m.session_expiry_seconds_max > 7 * 86_400 {
            return Err("mqtt.session_expiry_seconds_max must be at most 604800 (7 days)".into());
        }
        if m.tls_addr.is_some() != (m.tls_cert.is_some() && m.tls_key.is_some())
            || m.tls_cert.is_some() != m.tls_key.is_some()
        {
            return Err("mqtt: tls_addr, tls_cert and tls_key go together".into());
        }
        if self.store_pool_size == 0 || self.store_pool_size > 256 {
            return Err("store_pool_size must be 1 to 256".into());
        }
        if !matches!(self.store_check.as_str(), "quick" | "full" | "off") {
            return Err(format!("store_check = {:?}: expected \"quick\", \"full\" or \"off\"", self.store_check));
        }
        if !(1..=600).contains(&self.http_header_timeout_seconds)
            || !(1..=3600).contains(&self.http_body_timeout_seconds)
        {
            return Err("http_header_timeout_seconds must be 1 to 600 and http_body_timeout_seconds 1 to 3600".into());
        }
        if self.store_slow_commit_ms == 0 {
            return Err("store_slow_commit_ms must be at least 1".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!("log_format = {:?}: expected \"text\" or \"json\"", self.log_format));
        }
        Ok(())
    }

    pub fn master_key_path(&self) -> PathBuf {
        match &self.master_key_file {
            Some(path) => path.clone(),
            None => {
                let mut name = self.data_dir.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "rki-data".into());
                name.push(".master.key");
                self.data_dir.with_file_name(name)
            }
        }
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("rki.sqlite")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.mqtt_addr.to_string(), "127.0.0.1:1883");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./rki-data"));
        assert_eq!(c.master_key_path(), PathBuf::from("./rki-data.master.key"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c: Config = toml::from_str("mqtt_addr = \"127.0.0.1:1\"").expect("toml");
        c.apply_env(|n| (n == "RKI_MQTT_ADDR").then(|| "127.0.0.1:2".to_string())).expect("env");
        assert_eq!(c.mqtt_addr.port(), 2);
    }

    #[test]
    fn the_broker_is_embedded_or_an_external_table() {
        let c: Config = toml::from_str("broker = \"embedded\"").expect("toml");
        assert!(c.broker.external().is_none());
        let c: Config =
            toml::from_str("[broker]\nurl = \"mqtt://127.0.0.1:1884\"\nshared_group = \"rki\"").expect("toml");
        assert_eq!(c.broker.external().map(|e| e.url.as_str()), Some("mqtt://127.0.0.1:1884"));
        let c: Config = toml::from_str("broker = \"mosquitto\"").expect("toml");
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_mqtt_table_has_its_defaults_and_tls_needs_all_three_settings() {
        let c: Config = toml::from_str("[mqtt]\nconnect_timeout_ms = 1000").expect("toml");
        assert_eq!((c.mqtt.connect_timeout_ms, c.mqtt.session_messages_max), (1000, 32));
        assert!(c.validate().is_ok());
        let c: Config = toml::from_str("[mqtt]\ntls_addr = \"127.0.0.1:8883\"").expect("toml");
        assert!(c.validate().is_err(), "a TLS listener without a certificate");
        let c: Config =
            toml::from_str("[mqtt]\ntls_addr = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"")
                .expect("toml");
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<Config>("[mqtt]\nunknown = 1").is_err());
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let mut c = Config::default();
        let err = c.apply_env(|n| (n == "RKI_HTTP_ADDR").then(|| "nope".to_string())).expect_err("bad");
        assert!(err.contains("RKI_HTTP_ADDR"));
        assert!(toml::from_str::<Config>("unknown_option = 1").is_err());
        c.clock = "fast".into();
        assert!(c.validate().is_err());
    }
}
