//! Several gateway nodes on one PostgreSQL database and one Mosquitto broker, as
//! `docs/SCALE-OUT.md` describes: each node its own data directory, HTTP port and MQTT client id,
//! all in one shared subscription group, all with the same master key file (they share the
//! sealed keys in the database). Mosquitto authenticates the terminals from the password and ACL
//! files node 1 keeps ([`BrokerAuth::Files`]), through its dynamic security plugin, seeded by
//! `rki-gateway dynsec-init` and changed by every node over `$CONTROL` ([`BrokerAuth::Dynsec`]),
//! or from the store itself, through the project's plugin `librki_mosquitto_auth.so`, under a
//! database role that may read the `rki_broker_credentials` view only ([`BrokerAuth::Store`]).
//! The first node bootstraps the store (key owner, `acme`); the others join with its tokens.

use std::path::PathBuf;
use std::time::Duration;

use crate::pg::PgServer;
use crate::{free_port, temp_dir, Api, GatewayOptions, GatewayProcess, Mosquitto, TestResult};

/// The gateway's own broker identity in a cluster.
pub const GATEWAY_USER: &str = "rki-gateway";
pub const GATEWAY_PASSWORD: &str = "gw-secret";
/// The filters a gateway node subscribes to on the broker (`rki_gateway::external::filters`: device
/// up, init, backend tasks).
pub const NODE_SUBSCRIPTIONS: usize = 3;

/// How Mosquitto learns the terminals' credentials and access rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrokerAuth {
    /// Password and ACL files that node 1 rewrites (`[broker.mosquitto_sync]`) and Mosquitto
    /// reloads on SIGHUP.
    #[default]
    Files,
    /// The dynamic security plugin, which every node changes over `$CONTROL` (`[broker.dynsec]`).
    Dynsec,
    /// The store plugin (`mosquitto-auth/`): Mosquitto reads PostgreSQL at each CONNECT; the
    /// nodes have no broker-auth section at all. The password and ACL files hold the gateway's
    /// identity only.
    Store,
}

impl BrokerAuth {
    /// The name `rki-loadtest --broker-auth` and its JSON use.
    pub fn name(self) -> &'static str {
        match self {
            BrokerAuth::Files => "files",
            BrokerAuth::Dynsec => "dynsec",
            BrokerAuth::Store => "store",
        }
    }
}

/// The database role of the store plugin: it may read the `rki_broker_credentials` view and
/// nothing else.
pub const BROKER_DB_ROLE: &str = "rki_broker";

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub broker_auth: BrokerAuth,
    /// Top-level TOML lines added to every node's configuration (e.g. `retry_initial_seconds = 2`).
    pub extra_toml: String,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self { nodes: 3, broker_auth: BrokerAuth::default(), extra_toml: String::new(), env: Vec::new() }
    }
}

pub struct Cluster {
    /// Node 1 first.
    pub nodes: Vec<GatewayProcess>,
    pub mosquitto: Mosquitto,
    pub pg: PgServer,
    /// The master key, and Mosquitto's files (password and ACL files, the dynamic security
    /// plugin's configuration and the admin's password file, or the store plugin's URL file).
    pub shared: PathBuf,
    pub store_url: String,
    pub broker_auth: BrokerAuth,
}

impl Cluster {
    pub fn start(options: ClusterOptions) -> TestResult<Cluster> {
        Mosquitto::binary()?;
        let pg = PgServer::start()?;
        pg.create_database("rki")?;
        let store_url = pg.uri("rki");
        let shared = temp_dir("cluster");
        let broker_port = free_port();
        let config = |i: usize| {
            let auth = match (options.broker_auth, i) {
                (BrokerAuth::Dynsec, _) => {
                    format!("[broker.dynsec]\nadmin_password_file = \"{}/broker-admin.secret\"\n", shared.display())
                }
                (BrokerAuth::Files, 1) => format!(
                    "[broker.mosquitto_sync]\npassword_file = \"{0}/mosq.passwd\"\nacl_file = \"{0}/mosq.acl\"\npid_file = \"{0}/mosq.pid\"\n",
                    shared.display()
                ),
                (BrokerAuth::Files, _) | (BrokerAuth::Store, _) => String::new(),
            };
            format!(
                "store = \"{store_url}\"\nmaster_key_file = \"{}/master.key\"\n{}\n\
                 [broker]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nusername = \"{GATEWAY_USER}\"\n\
                 password = \"{GATEWAY_PASSWORD}\"\nclient_id = \"rki-gateway-{i}\"\nshared_group = \"rki\"\n{auth}",
                shared.display(),
                options.extra_toml
            )
        };
        let node_options =
            |i: usize| GatewayOptions { config_toml: Some(config(i)), env: options.env.clone(), ..Default::default() };
        let (first, mosquitto) = match options.broker_auth {
            BrokerAuth::Dynsec => {
                let mosquitto = seed_and_start_mosquitto(&config(1), &shared, broker_port)?;
                (GatewayProcess::start(node_options(1))?, mosquitto)
            }
            BrokerAuth::Store => {
                // Node 1 creates the schema (the view among it) before the plugin's role can be
                // granted it.
                let first = GatewayProcess::start(node_options(1))?;
                let mosquitto = start_store_auth_mosquitto(&pg, &shared, broker_port)?;
                (first, mosquitto)
            }
            BrokerAuth::Files => {
                let first = GatewayProcess::start(node_options(1))?;
                crate::wait::until("node 1 to write its ACL file", Duration::from_secs(10), || {
                    shared.join("mosq.acl").exists()
                })
                .map_err(|e| format!("{e}: {}", first.log_tail()))?;
                let mosquitto = Mosquitto::start(
                    broker_port,
                    &shared.join("mosq.passwd"),
                    &shared.join("mosq.acl"),
                    &shared.join("mosq.pid"),
                )?;
                (first, mosquitto)
            }
        };
        let mut nodes = vec![first];
        for i in 2..=options.nodes {
            let node = GatewayProcess::join(node_options(i), &nodes[0].key_owner_token, &nodes[0].org_token)?;
            nodes.push(node);
        }
        let cluster = Cluster { nodes, mosquitto, pg, shared, store_url, broker_auth: options.broker_auth };
        cluster.wait_connected(Duration::from_secs(15))?;
        Ok(cluster)
    }

    /// Waits until every node is connected to the broker (with the dynamic security plugin, its
    /// admin link ready too) and subscribed: the broker's log shows each node's subscriptions
    /// (the plugin's broker logs none; there the subscriptions follow a moment later).
    pub fn wait_connected(&self, timeout: Duration) -> TestResult {
        let dynsec = self.broker_auth == BrokerAuth::Dynsec;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.pid().is_none() {
                continue;
            }
            crate::wait::until(&format!("node {} to connect to Mosquitto", i + 1), timeout, || {
                node.metric("rki_broker_up") >= 1.0 && (!dynsec || node.metric("rki_dynsec_up") >= 1.0)
            })
            .map_err(|e| format!("{e}: {}", node.log_tail()))?;
            if !dynsec {
                self.mosquitto.wait_subscribed(&format!("rki-gateway-{}", i + 1), NODE_SUBSCRIPTIONS, timeout)?;
            }
        }
        if dynsec {
            // Subscribed a moment after the CONNACK; the plugin's broker logs nothing to wait on.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }

    /// The admin API of node `i` (0-based).
    pub fn api(&self, i: usize) -> Api {
        self.nodes[i].api()
    }

    /// A direct connection to the database, for counts the API does not give.
    pub fn sql(&self) -> TestResult<postgres::Client> {
        Ok(postgres::Client::connect(&self.pg.url("rki"), postgres::NoTls)?)
    }

    /// The sum of one sample over the nodes still running.
    pub fn metric_sum(&self, sample: &str) -> f64 {
        self.nodes.iter().filter(|n| n.pid().is_some()).map(|n| n.metric(sample)).sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
        }
        if !std::thread::panicking() && std::env::var_os("RKI_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.shared);
        }
    }
}

/// Writes the dynamic security plugin's configuration with `rki-gateway dynsec-init` (on the
/// configuration `toml`, which names the admin password file it generates) into
/// `dir/dynamic-security.json`, and starts Mosquitto on it.
pub fn seed_and_start_mosquitto(toml: &str, dir: &std::path::Path, port: u16) -> TestResult<Mosquitto> {
    let config = dir.join("seed.toml");
    std::fs::write(&config, toml)?;
    let file = dir.join("dynamic-security.json");
    let out = std::process::Command::new(crate::binary("rki-gateway"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("seed-data"))
        .arg("dynsec-init")
        .arg(&file)
        .output()?;
    if !out.status.success() {
        return Err(format!("dynsec-init: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Mosquitto::start_dynsec(port, &file)
}

/// Lets the store plugin's role read the `rki_broker_credentials` view (and nothing else), writes
/// its URL file (0600) and the gateway's own password and ACL files into `dir`, and starts
/// Mosquitto with the plugin. The schema must exist (a node has started).
pub fn start_store_auth_mosquitto(pg: &PgServer, dir: &std::path::Path, port: u16) -> TestResult<Mosquitto> {
    use std::os::unix::fs::PermissionsExt;
    let mut admin = postgres::Client::connect(&pg.url("rki"), postgres::NoTls)?;
    admin.batch_execute(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{BROKER_DB_ROLE}') THEN \
         CREATE ROLE {BROKER_DB_ROLE} LOGIN; END IF; END $$; \
         GRANT SELECT ON rki_broker_credentials TO {BROKER_DB_ROLE};"
    ))?;
    let url_file = dir.join("rki-store.url");
    std::fs::write(&url_file, format!("postgres://{BROKER_DB_ROLE}@127.0.0.1:{}/rki\n", pg.port()))?;
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600))?;
    let password_file = dir.join("gateway.passwd");
    let hash = rki_gateway::mosquitto::password_hash(GATEWAY_PASSWORD.as_bytes())?;
    std::fs::write(&password_file, format!("{GATEWAY_USER}:{hash}\n"))?;
    let acl_file = dir.join("gateway.acl");
    std::fs::write(&acl_file, rki_gateway::mosquitto::gateway_acl(GATEWAY_USER))?;
    Mosquitto::start_store_auth(port, &url_file, GATEWAY_USER, &password_file, &acl_file)
}
