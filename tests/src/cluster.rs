//! Several gateway nodes on one PostgreSQL database and one Mosquitto broker, as
//! `docs/SCALE-OUT.md` describes: each node its own data directory, HTTP port and MQTT client id,
//! all in one shared subscription group, all with the same master key file (they share the
//! sealed keys in the database). The first node bootstraps the store (key owner, `acme`) and
//! keeps Mosquitto's password and ACL files; the others join with its tokens.

use std::path::PathBuf;
use std::time::Duration;

use crate::pg::PgServer;
use crate::{free_port, temp_dir, Api, GatewayOptions, GatewayProcess, Mosquitto, TestResult};

/// The gateway's own broker identity in a cluster.
pub const GATEWAY_USER: &str = "rki-gateway";
const GATEWAY_PASSWORD: &str = "gw-secret";
/// The filters a gateway node subscribes to on the broker (`rki_gateway::external::filters`: device
/// up, init, backend tasks).
pub const NODE_SUBSCRIPTIONS: usize = 3;

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
    /// The master key, Mosquitto's files and its pid file.
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
            let sync = if i == 1 {
                format!(
                    "[broker.mosquitto_sync]\npassword_file = \"{0}/mosq.passwd\"\nacl_file = \"{0}/mosq.acl\"\npid_file = \"{0}/mosq.pid\"\n",
                    shared.display()
                )
            } else {
                String::new()
            };
            format!(
                "store = \"{store_url}\"\nmaster_key_file = \"{}/master.key\"\n{}\n\
                 [broker]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nusername = \"{GATEWAY_USER}\"\n\
                 password = \"{GATEWAY_PASSWORD}\"\nclient_id = \"rki-gateway-{i}\"\nshared_group = \"rki\"\n{sync}",
                shared.display(),
                options.extra_toml
            )
        };
        let node_options =
            |i: usize| GatewayOptions { config_toml: Some(config(i)), env: options.env.clone(), ..Default::default() };
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
        let mut nodes = vec![first];
        for i in 2..=options.nodes {
            let node = GatewayProcess::join(node_options(i), &nodes[0].key_owner_token, &nodes[0].org_token)?;
            nodes.push(node);
        }
        let cluster = Cluster { nodes, mosquitto, pg, shared, store_url };
        cluster.wait_connected(Duration::from_secs(15))?;
        Ok(cluster)
    }

    /// Waits until every node is connected to the broker and subscribed (the broker's log shows
    /// each node's subscriptions).
    pub fn wait_connected(&self, timeout: Duration) -> TestResult {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.pid().is_none() {
                continue;
            }
            crate::wait::until(&format!("node {} to connect to Mosquitto", i + 1), timeout, || {
                node.metric("rki_broker_up") >= 1.0
            })
            .map_err(|e| format!("{e}: {}", node.log_tail()))?;
            self.mosquitto.wait_subscribed(&format!("rki-gateway-{}", i + 1), NODE_SUBSCRIPTIONS, timeout)?;
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
