//! Where the gateway runs: one process with its embedded broker and SQLite (the default), or
//! several nodes on Mosquitto and PostgreSQL (`docs/SCALE-OUT.md`), started by the end-to-end
//! harness's [`rki_tests::Cluster`]. The terminals connect to the broker; the nodes share the
//! work through their shared subscription; the task is created through node 1.

use std::time::Duration;

use rki_tests::{BrokerAuth, Cluster, ClusterOptions};
use serde_json::json;

use crate::procfs::{self, ProcSample};
use crate::Result;

/// The MQTT broker the terminals connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrokerKind {
    /// The gateway's own (rumqttd), one node.
    #[default]
    Embedded,
    /// Mosquitto 2 started here; the gateway nodes are its clients.
    Mosquitto,
}

/// The store of the gateway nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// SQLite in the node's data directory.
    #[default]
    Sqlite,
    /// A PostgreSQL server started here, one database for every node.
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub gateways: usize,
    pub broker: BrokerKind,
    pub store: StoreKind,
    /// How Mosquitto authenticates the terminals (files, its dynamic security plugin, or the
    /// store plugin reading PostgreSQL).
    pub broker_auth: BrokerAuth,
}

impl Default for Topology {
    fn default() -> Self {
        Self { gateways: 1, broker: BrokerKind::Embedded, store: StoreKind::Sqlite, broker_auth: BrokerAuth::Files }
    }
}

impl Topology {
    /// Whether this is the default single process (the gateway child of [`crate::gateway`]).
    pub fn is_single_embedded(&self) -> bool {
        *self == Topology::default()
    }

    /// The supported shapes: the default, or N ≥ 1 nodes on Mosquitto and PostgreSQL.
    pub fn check(&self) -> Result<()> {
        match (self.gateways, self.broker, self.store) {
            (0, _, _) => Err("--gateways must be at least 1".into()),
            (1, BrokerKind::Embedded, StoreKind::Sqlite) => Ok(()),
            (_, BrokerKind::Mosquitto, StoreKind::Postgres) => Ok(()),
            (n, BrokerKind::Embedded, _) if n > 1 => {
                Err("several gateways share an external broker: add --broker mosquitto --store postgres".into())
            }
            _ => Err(
                "supported: the default (1 gateway, embedded broker, sqlite) or --broker mosquitto --store postgres \
                 with any --gateways"
                    .into(),
            ),
        }
    }

    pub fn label(&self) -> String {
        match self.broker {
            BrokerKind::Embedded => "1 node, embedded broker, sqlite".into(),
            BrokerKind::Mosquitto => {
                format!("{} node(s), mosquitto ({}), postgres", self.gateways, self.broker_auth.name())
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "gateways": self.gateways,
            "broker": match self.broker { BrokerKind::Embedded => "embedded", BrokerKind::Mosquitto => "mosquitto" },
            "store": match self.store { StoreKind::Sqlite => "sqlite", StoreKind::Postgres => "postgres" },
            "broker_auth": self.broker_auth.name(),
        })
    }
}

/// Starts Mosquitto, PostgreSQL and the nodes.
pub fn start_cluster(topology: &Topology) -> Result<Cluster> {
    let cluster = Cluster::start(ClusterOptions {
        nodes: topology.gateways,
        broker_auth: topology.broker_auth,
        ..Default::default()
    })
    .map_err(|e| format!("cluster: {e}"))?;
    Ok(cluster)
}

/// The processes of a cluster, by role, for `/proc` readings.
pub struct ClusterPids {
    pub nodes: Vec<u32>,
    pub mosquitto: u32,
    pub postmaster: Option<u32>,
}

impl ClusterPids {
    pub fn of(cluster: &Cluster) -> Self {
        ClusterPids {
            nodes: cluster.nodes.iter().filter_map(|n| n.pid()).collect(),
            mosquitto: cluster.mosquitto.pid(),
            postmaster: cluster.pg.postmaster_pid(),
        }
    }

    /// Every reading of one moment.
    pub fn sample(&self) -> ClusterSample {
        ClusterSample {
            nodes: self.nodes.iter().map(|p| procfs::sample(*p).unwrap_or_default()).collect(),
            mosquitto: procfs::sample(self.mosquitto).unwrap_or_default(),
            postgres: self.postmaster.map(procfs::tree_sample).unwrap_or_default(),
        }
    }
}

/// The processes' readings at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterSample {
    pub nodes: Vec<ProcSample>,
    pub mosquitto: ProcSample,
    /// The postmaster and its children (a backend per pooled connection, the writers).
    pub postgres: ProcSample,
}

impl ClusterSample {
    /// The gateway nodes summed (RSS, peak RSS, CPU).
    pub fn gateways(&self) -> ProcSample {
        self.nodes.iter().fold(ProcSample::default(), |a, s| ProcSample {
            rss_bytes: a.rss_bytes + s.rss_bytes,
            rss_peak_bytes: a.rss_peak_bytes + s.rss_peak_bytes,
            cpu_seconds: a.cpu_seconds + s.cpu_seconds,
        })
    }
}

/// Per node and per server process, between two readings: CPU seconds, RSS and peak RSS, and the
/// acks each node recorded (its own counter: metrics are per node).
pub fn report(before: &ClusterSample, after: &ClusterSample, urls: &[String], push: Duration) -> serde_json::Value {
    let secs = push.as_secs_f64().max(1e-9);
    let nodes: Vec<serde_json::Value> = before
        .nodes
        .iter()
        .zip(&after.nodes)
        .zip(urls)
        .enumerate()
        .map(|(i, ((b, a), url))| {
            json!({
                "node": i + 1,
                "cpu_seconds_push": crate::summary::round3(a.cpu_seconds - b.cpu_seconds),
                "cpu_share_push": crate::summary::round3((a.cpu_seconds - b.cpu_seconds) / secs),
                "rss_bytes": a.rss_bytes,
                "rss_peak_bytes": a.rss_peak_bytes,
                "acks_succeeded": crate::setup::metric(url, "rki_acks_total{result=\"succeeded\"}"),
                "deliveries": crate::setup::metric(url, "rki_deliveries_total"),
            })
        })
        .collect();
    let cpu = |b: &ProcSample, a: &ProcSample| crate::summary::round3(a.cpu_seconds - b.cpu_seconds);
    json!({
        "nodes": nodes,
        "mosquitto": {
            "cpu_seconds_push": cpu(&before.mosquitto, &after.mosquitto),
            "cpu_share_push": crate::summary::round3(cpu(&before.mosquitto, &after.mosquitto) / secs),
            "rss_bytes": after.mosquitto.rss_bytes,
        },
        "postgres": {
            "cpu_seconds_push": cpu(&before.postgres, &after.postgres),
            "cpu_share_push": crate::summary::round3(cpu(&before.postgres, &after.postgres) / secs),
            "rss_bytes": after.postgres.rss_bytes,
        },
    })
}
