//! Several gateway nodes on one PostgreSQL database and one Mosquitto broker, as
//! `docs/SCALE-OUT.md` describes: each node its own data directory, HTTP port and MQTT client id,
//! all in one shared subscription group, all with the same master key file (they share the
//! sealed keys in the database). Mosquitto runs the dynamic security plugin on a configuration
//! `rki-gateway dynsec-init` wrote; every node manages its clients over `$CONTROL`. The first
//! node bootstraps the store (key owner, `acme`); the others join with its tokens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::pg::PgServer;
use crate::{free_port, temp_dir, Api, GatewayOptions, GatewayProcess, Mosquitto, TestResult};

/// The gateway's own broker identity in a cluster.
pub const GATEWAY_USER: &str = "rki-gateway";
const GATEWAY_PASSWORD: &str = "gw-secret";

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Top-level TOML lines added to every node's configuration (e.g. `retry_initial_seconds = 2`).
    pub extra_toml: String,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self { nodes: 3, extra_toml: String::new(), env: Vec::new() }
    }
}

pub struct Cluster {
    /// Node 1 first.
    pub nodes: Vec<GatewayProcess>,
    pub mosquitto: Mosquitto,
    pub pg: PgServer,
    /// The master key, the broker admin's password file and the plugin's configuration.
    pub shared: PathBuf,
    pub store_url: String,
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
            format!(
                "store = \"{store_url}\"\nmaster_key_file = \"{0}/master.key\"\n{1}\n\
                 [broker]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nusername = \"{GATEWAY_USER}\"\n\
                 password = \"{GATEWAY_PASSWORD}\"\nclient_id = \"rki-gateway-{i}\"\nshared_group = \"rki\"\n\
                 [broker.dynsec]\nadmin_password_file = \"{0}/broker-admin.secret\"\n",
                shared.display(),
                options.extra_toml
            )
        };
        let mosquitto = seed_and_start_mosquitto(&config(1), &shared, broker_port)?;
        let node_options =
            |i: usize| GatewayOptions { config_toml: Some(config(i)), env: options.env.clone(), ..Default::default() };
        let mut nodes = vec![GatewayProcess::start(node_options(1))?];
        for i in 2..=options.nodes {
            let node = GatewayProcess::join(node_options(i), &nodes[0].key_owner_token, &nodes[0].org_token)?;
            nodes.push(node);
        }
        let cluster = Cluster { nodes, mosquitto, pg, shared, store_url };
        cluster.wait_connected(Duration::from_secs(15))?;
        Ok(cluster)
    }

    /// Waits until every node is connected to the broker and its dynamic security admin link is
    /// ready (and, a moment later, subscribed).
    pub fn wait_connected(&self, timeout: Duration) -> TestResult {
        let started = Instant::now();
        for node in &self.nodes {
            while node.metric("rki_broker_up") < 1.0 || node.metric("rki_dynsec_up") < 1.0 {
                if started.elapsed() > timeout {
                    return Err(format!("a node is not connected to Mosquitto: {}", node.log_tail()).into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
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
