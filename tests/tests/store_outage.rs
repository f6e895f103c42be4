//! A PostgreSQL outage under a running gateway: the API says 503 `store_unavailable` (not "500
//! internal error"), `/healthz` says so, and once the database returns the same gateway serves
//! again with nothing lost.

mod common;

use std::time::Duration;

use rki_tests::pg::PgServer;
use rki_tests::{for_group, wait, GatewayOptions, GatewayProcess, TestResult};

fn import(gw: &GatewayProcess, prefix: &str, n: usize) -> (u16, serde_json::Value) {
    let csv = std::iter::once("sn,model".to_string())
        .chain((0..n).map(|i| format!("{prefix}{i:04},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    gw.upload_devices("acme", &csv)
}

#[test]
fn a_postgresql_outage_is_answered_with_503_and_survived_with_nothing_lost() -> TestResult {
    let pg = PgServer::start()?;
    pg.create_database("outage")?;
    let url = pg.uri("outage");
    let gw =
        GatewayProcess::start(GatewayOptions { env: vec![("RKI_STORE".into(), url)], ..GatewayOptions::default() })?;
    let (status, v) = import(&gw, "PGUP", 50);
    assert_eq!(status, 200, "{v}");

    pg.stop()?;
    let (status, v) = import(&gw, "PGDOWN", 50);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    let (status, v) = gw.api().get("/v1/devices");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    let (status, health) = gw.api().get("/healthz");
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "store_unavailable", "{health}");
    let (status, _) = gw.api().get("/livez");
    assert_eq!(status, 200, "the process itself is alive");

    pg.start_again()?;
    wait::poll("/healthz to answer 200 after the database returned", Duration::from_secs(30), || {
        match gw.api().get("/healthz") {
            (200, _) => Ok(()),
            (status, health) => Err(format!("{status} {health}")),
        }
    })?;
    let v = gw.api().ok("/v1/devices?limit=1")?;
    assert_eq!(v["total"], 50, "{v}");
    let (status, v) = import(&gw, "PGBACK", 50);
    assert_eq!(status, 200, "{v}");
    assert_eq!(gw.api().ok("/v1/devices?limit=1")?["total"], 100);
    Ok(())
}

#[test]
fn acks_during_a_postgresql_outage_are_counted_as_store_unavailable_and_recorded_once_after_it() -> TestResult {
    let rt = common::runtime();
    let pg = PgServer::start()?;
    pg.create_database("outage_acks")?;
    let gw = GatewayProcess::start(GatewayOptions {
        env: vec![("RKI_STORE".into(), pg.uri("outage_acks")), ("RKI_RETRY_INITIAL_SECONDS".into(), "1".into())],
        ..GatewayOptions::default()
    })?;
    let api = gw.api();
    let provisioned = rki_tests::provision(&gw, &rki_tests::sns("PGACK", 40), "fleet")?;
    // The acks come 2 s after each download: the database goes down in between.
    let knobs = rki_device_sim::Knobs { ack_delay: Duration::from_secs(2), ..rki_device_sim::Knobs::default() };
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, knobs)?,
        Duration::from_secs(60),
    ))?;
    let task = rki_tests::create_task(&api, &for_group("fleet"))?.task.id;
    // Every download is out before the database goes down.
    gw.wait_metric("rki_deliveries_total", Duration::from_secs(20), |v| v >= 40.0)?;
    pg.stop()?;
    // Every ack arrives while the database is down.
    wait::until("every terminal to ack during the outage", Duration::from_secs(30), || {
        fleet.snapshot().acks_sent >= 40
    })?;
    let unavailable = gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"store_unavailable\"}");
    pg.start_again()?;
    let done = rki_tests::wait_task_done(&api, task, Duration::from_secs(90))?;
    let unknown = gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"unknown_execution\"}");
    assert_eq!(done.task.counts.succeeded, 40, "{:?}", done.task);
    assert_eq!(unknown, 0.0, "acks during the outage were taken for unknown executions");
    let records = api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default();
    let mut sns: Vec<&str> = records.iter().filter_map(|r| r["sn"].as_str()).collect();
    sns.sort_unstable();
    sns.dedup();
    assert_eq!((records.len(), sns.len()), (40, 40), "each terminal recorded exactly once");
    assert_eq!(fleet.snapshot().keys_installed, 40);
    // Either the ack found the store down (counted as such) or its record's commit failed and it
    // was delivered again; nothing was counted as an unknown device or execution.
    eprintln!("acks refused as store_unavailable during the outage: {unavailable}");
    Ok(())
}
