//! Three gateway nodes on one Mosquitto and one PostgreSQL (`docs/SCALE-OUT.md`): 2,000 simulated
//! terminals, one task created through one node, the work shared by the three through `$share`.
//! Every terminal is injected once and recorded once, with or without a node SIGKILLed in the
//! middle of the push, Mosquitto authenticating from node 1's files or, for the kill, also from
//! the store through the plugin (`mosquitto-auth/`) and from its dynamic security plugin that
//! every node changes; the three publish a fair share of the
//! downloads each; a retry timer fires once per execution across the cluster.
//!
//! The tests of this file run one at a time (each starts a PostgreSQL, a Mosquitto, three gateways
//! and 2,000 terminals; two at once would only contend for this machine's two cores).

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rki_device_sim::{BrokerAddr, Brokers, Fleet, Knobs};
use rki_protocol::message::Message;
use rki_tests::{
    create_task, expected_kcv, for_group, for_sns, provision, sns, wait_task, wait_task_done, BrokerAuth, Cluster,
    ClusterOptions, RawDevice, TestResult,
};

const DEVICES: usize = 2_000;
/// The fleet of the kill test on the store plugin: enough for an initialisation storm through
/// the three nodes, small enough to add seconds, not minutes, to the suite.
const STORE_PLUGIN_DEVICES: usize = 300;
const SUCCEEDED: &str = "rki_acks_total{result=\"succeeded\"}";
const DELIVERIES: &str = "rki_deliveries_total";
/// The least share of a task's downloads each of the three nodes publishes (a third each if the
/// claims interleave perfectly).
const FAIR_SHARE_MIN: f64 = 0.15;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cluster of three nodes on `auth`, `devices` terminals provisioned through node 1 and
/// connected to Mosquitto (initialised, said hello).
fn cluster_with_fleet(
    rt: &tokio::runtime::Runtime,
    prefix: &str,
    extra_toml: &str,
    knobs: Knobs,
    auth: BrokerAuth,
    devices: usize,
) -> TestResult<(Cluster, rki_tests::Provisioned, Fleet)> {
    let _ = rki_device_sim::raise_fd_limit();
    let cluster =
        Cluster::start(ClusterOptions { extra_toml: extra_toml.into(), broker_auth: auth, ..Default::default() })?;
    let provisioned = provision(&cluster.nodes[0], &sns(prefix, devices), "fleet")?;
    // Node 1 rewrites Mosquitto's files on the import (the bootstrap identities).
    let port = cluster.mosquitto.port;
    rt.block_on(rki_tests::wait_bootstrap_admitted(port, &provisioned.gudids, Duration::from_secs(15)))?;
    let mut config = common::fleet_config(port, &provisioned, knobs)?;
    config.brokers = Brokers::one(BrokerAddr::new("127.0.0.1", port));
    let fleet = rt.block_on(common::spawn_fleet(config, Duration::from_secs(120)))?;
    Ok((cluster, provisioned, fleet))
}

/// Records per SN of the task, each KCV recomputed here; and the terminals' own injections.
fn check_exactly_once(cluster: &Cluster, task: i64, provisioned: &rki_tests::Provisioned, fleet: &Fleet) -> TestResult {
    let devices = provisioned.sns.len();
    let records =
        cluster.api(0).ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default();
    let mut per_sn: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let sn = r["sn"].as_str().unwrap_or_default().to_string();
        *per_sn.entry(sn.clone()).or_default() += 1;
        assert_eq!(r["result"], "succeeded", "{r}");
        let kcv = expected_kcv(r["key_id"].as_str().unwrap_or_default())?;
        assert_eq!(r["kcv"].as_str(), Some(kcv.as_str()), "{sn}: the KCV is not the one derived here");
    }
    let lost: Vec<&String> = provisioned.sns.iter().filter(|sn| !per_sn.contains_key(*sn)).collect();
    let twice: Vec<(&String, &usize)> = per_sn.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "{} devices without a record, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    assert!(twice.is_empty(), "devices recorded twice: {twice:?}");
    assert_eq!(records.len(), devices);
    // The database agrees: one record per execution of the task, none for another task.
    let mut sql = cluster.sql()?;
    let row = sql.query_one(
        "SELECT count(*), count(DISTINCT device_id), count(DISTINCT execution_id) FROM records WHERE task_id = $1",
        &[&task],
    )?;
    let (n, devices_recorded, executions): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let (n, recorded, executions): (i64, i64, i64) = (n, devices_recorded, executions);
    assert_eq!((n, recorded, executions), (devices as i64, devices as i64, devices as i64));
    // Each terminal installed its key once (a repeated download is answered, not installed).
    let twice_injected: Vec<String> = fleet
        .devices()
        .iter()
        .filter(|d| d.status().injections != 1)
        .map(|d| format!("{}: {}", d.sn(), d.status().injections))
        .collect();
    assert!(twice_injected.is_empty(), "terminals not injected exactly once: {twice_injected:?}");
    Ok(())
}

/// What the open executions of a task that does not finish look like, from the store, the
/// terminals and the nodes' rejection counters.
fn diagnose(cluster: &Cluster, task: i64, fleet: &Fleet) -> TestResult<String> {
    let mut sql = cluster.sql()?;
    let mut out = String::new();
    for row in sql.query(
        "SELECT e.id, d.sn, e.state, e.delivery_count, e.last_sent_at, e.retry_claimed_until, e.generation
         FROM executions e JOIN devices d ON d.id = e.device_id
         WHERE e.task_id = $1 AND e.state IN ('queued', 'delivered') ORDER BY e.id LIMIT 5",
        &[&task],
    )? {
        let (id, sn, state): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
        let (count, last, claimed, generation): (i64, Option<i64>, Option<i64>, i64) =
            (row.get(3), row.get(4), row.get(5), row.get(6));
        let status = fleet.device(&sn).map(|d| format!("{:?}", d.status())).unwrap_or_default();
        out += &format!(
            "execution {id} {sn} {state} sends {count} last {last:?} claimed {claimed:?} gen {generation}; terminal {status}\n"
        );
    }
    for (i, node) in cluster.nodes.iter().enumerate().filter(|(_, n)| n.pid().is_some()) {
        let (_, metrics) = node.api().get_text("/metrics");
        let rejected: Vec<&str> = metrics.lines().filter(|l| l.starts_with("rki_rejected_messages_total")).collect();
        out += &format!("node {}: {rejected:?}\n", i + 1);
    }
    Ok(out)
}

#[test]
fn three_nodes_inject_every_terminal_exactly_once_and_each_counts_its_own() -> TestResult {
    let _serial = one_at_a_time();
    let started = Instant::now();
    let rt = common::runtime();
    // Retries late enough that none is due during the push: every delivery is a first one.
    let (cluster, provisioned, fleet) =
        cluster_with_fleet(&rt, "TRIA", "retry_initial_seconds = 60", Knobs::default(), BrokerAuth::Files, DEVICES)?;
    let connected = started.elapsed();
    let task = create_task(&cluster.api(0), &for_group("fleet"))?.task.id;
    let push = Instant::now();
    let done = wait_task_done(&cluster.api(0), task, Duration::from_secs(120))?;
    let push = push.elapsed();
    assert_eq!(done.task.counts.succeeded, DEVICES as i64, "{:?}", done.task.counts);
    check_exactly_once(&cluster, task, &provisioned, &fleet)?;

    // Metrics are per node: each counts the acks it recorded (once its batch is durable), and
    // they add up to the fleet.
    rki_tests::wait::until("the nodes' succeeded acks to add up to the fleet", Duration::from_secs(10), || {
        cluster.metric_sum(SUCCEEDED) >= DEVICES as f64
    })?;
    let per_node: Vec<f64> = cluster.nodes.iter().map(|n| n.metric(SUCCEEDED)).collect();
    let injected: f64 = cluster.metric_sum("rki_keys_injected_total{org=\"acme\"}");
    eprintln!("succeeded acks per node: {per_node:?}; connect {connected:?}, push {push:?}");
    assert_eq!(per_node.iter().sum::<f64>(), DEVICES as f64, "per node: {per_node:?}");
    assert_eq!(injected, DEVICES as f64);
    assert!(per_node.iter().all(|n| *n > 0.0), "a node recorded no ack: {per_node:?}");
    // One download per execution across the cluster: the new executions are claimed by one node
    // each (the node that created the task does not deliver them itself as well). And every node
    // published its share, not only node 1 that created the task: woken by the store's
    // notification, each claims a third of the task at once.
    let published: Vec<f64> = cluster.nodes.iter().map(|n| n.metric(DELIVERIES)).collect();
    eprintln!("downloads published per node: {published:?}");
    assert_eq!(published.iter().sum::<f64>(), DEVICES as f64, "downloads published by the three nodes");
    assert!(
        published.iter().all(|n| *n >= FAIR_SHARE_MIN * DEVICES as f64),
        "a node published less than {:.0} % of the task: {published:?}",
        FAIR_SHARE_MIN * 100.0
    );
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn a_node_killed_mid_push_loses_nothing_and_the_others_finish() -> TestResult {
    let _serial = one_at_a_time();
    kill_a_node_mid_push("TRIB", BrokerAuth::Files, DEVICES)
}

/// The same with Mosquitto reading the store at each CONNECT (`librki_mosquitto_auth.so`): the
/// fleet initialises through the three nodes and connects, and the kill loses nothing.
#[test]
fn a_node_killed_mid_push_loses_nothing_with_the_broker_reading_the_store() -> TestResult {
    let _serial = one_at_a_time();
    kill_a_node_mid_push("TRIS", BrokerAuth::Store, STORE_PLUGIN_DEVICES)
}

/// The same on Mosquitto's dynamic security plugin, which every node changes over `$CONTROL`
/// (issue 25's first spec): the fleet initialises through the three nodes, and the kill loses
/// nothing.
#[test]
fn a_node_killed_mid_push_loses_nothing_on_the_dynamic_security_plugin() -> TestResult {
    let _serial = one_at_a_time();
    kill_a_node_mid_push("TRID", BrokerAuth::Dynsec, STORE_PLUGIN_DEVICES)
}

/// `devices` terminals whose acks are spread over 5 s; node 3 SIGKILLed once a tenth of them are
/// recorded; the two others finish: every terminal recorded once and injected once.
fn kill_a_node_mid_push(prefix: &str, auth: BrokerAuth, devices: usize) -> TestResult {
    let rt = common::runtime();
    let (mut cluster, provisioned, fleet) =
        cluster_with_fleet(&rt, prefix, "retry_initial_seconds = 3", Knobs::default(), auth, devices)?;
    if auth == BrokerAuth::Store {
        // Every terminal got in (`cluster_with_fleet` waits for all); that none was refused at its
        // first CONNECT is `store_auth.rs`' storm spec, with raw clients that never retry.
        let log = cluster.mosquitto.log();
        assert!(log.contains("rki-auth: authenticating"), "the plugin is loaded: {log}");
    }
    // Acks spread over 5 s (terminal i waits i × 5 s / devices), so that the kill falls in the
    // middle of the push, with node 3 holding acks not yet durable and downloads not yet acked.
    let step = Duration::from_secs(5) / devices as u32;
    rt.block_on(async {
        for (i, d) in fleet.devices().iter().enumerate() {
            d.set_ack_delay(step * i as u32).await?;
        }
        Ok::<(), rki_device_sim::DeviceError>(())
    })?;
    let api = cluster.api(0);
    let task = create_task(&api, &for_group("fleet"))?.task.id;
    // Terminals ack after their delay; kill node 3 once some, not all, are recorded.
    let at_kill =
        wait_task(&api, task, Duration::from_secs(60), |c| c.succeeded >= (devices / 10) as i64)?.task.counts.succeeded;
    let node3_at_kill = cluster.nodes[2].metric(SUCCEEDED);
    cluster.nodes[2].kill()?;
    eprintln!("node 3 SIGKILLed with {at_kill} records in the store, {node3_at_kill} of them by node 3");
    assert!(at_kill < devices as i64, "the push was over before the kill");
    let done = match wait_task_done(&api, task, Duration::from_secs(90)) {
        Ok(done) => done,
        Err(e) => return Err(format!("{e}\n{}", diagnose(&cluster, task, &fleet)?).into()),
    };
    assert_eq!(done.task.counts.succeeded, devices as i64, "{:?}", done.task.counts);
    check_exactly_once(&cluster, task, &provisioned, &fleet)?;
    // The two survivors recorded the rest (node 3's count died with it).
    let survivors = cluster.metric_sum(SUCCEEDED);
    let published: Vec<f64> = cluster.nodes[..2].iter().map(|n| n.metric(DELIVERIES)).collect();
    eprintln!("succeeded acks recorded by the survivors: {survivors}; downloads they published: {published:?}");
    // Node 3 may have made a few more durable between its last scrape and the kill, no fewer.
    assert!(survivors + node3_at_kill <= devices as f64, "survivors {survivors}, node 3 {node3_at_kill}");
    assert!(survivors > 0.0);
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn a_retry_timer_fires_once_across_the_cluster() -> TestResult {
    let _serial = one_at_a_time();
    let rt = common::runtime();
    let cluster =
        Cluster::start(ClusterOptions { extra_toml: "retry_initial_seconds = 1".into(), ..Default::default() })?;
    let provisioned = provision(&cluster.nodes[0], &sns("TRIR", 1), "one")?;
    rt.block_on(rki_tests::wait_bootstrap_admitted(
        cluster.mosquitto.port,
        &provisioned.gudids,
        Duration::from_secs(15),
    ))?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let mut device = rt.block_on(RawDevice::initialise(cluster.mosquitto.port, &sn, &gudid))?;
    // Three hellos: the shared subscription hands them to the nodes in turn, so every node holds
    // the device (online) in its cache, as after reconnections.
    for _ in 0..3 {
        rt.block_on(device.send(RawDevice::hello(false)))?;
    }
    for node in &cluster.nodes {
        node.wait_online(&[&sn], true)?;
    }
    create_task(&cluster.api(0), &for_sns(&[&sn]))?;
    // The terminal never acks. Downloads of its one execution, as they arrive for 8 s.
    let mut arrivals = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let left = Duration::from_secs(8).saturating_sub(started.elapsed());
        match rt.block_on(device.next_down(left)) {
            Ok(Message::Download(_)) => arrivals.push(started.elapsed()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    eprintln!("downloads at {arrivals:?}");
    // One timer: sent, then again after 1 s, 2 s, 4 s (1 + 1 + 2 + 4 = 7 s): four downloads.
    // A timer per node would send about three times as many, several within the same second.
    assert!((3..=5).contains(&arrivals.len()), "downloads at {arrivals:?}");
    for pair in arrivals.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(800), "two downloads too close: {arrivals:?}");
    }
    // Every published download arrived (one may be on its way as the 8 s end).
    let deliveries = cluster.metric_sum(DELIVERIES) as usize;
    assert!((arrivals.len()..=arrivals.len() + 1).contains(&deliveries), "{deliveries} published");
    Ok(())
}
