//! A real Prometheus scrapes a real gateway through a small push, and sees the right values.
//!
//! Needs the `prometheus` and `promtool` binaries (Debian's `prometheus` package, which `.ci/run`
//! installs); without them the tests fail.
//!
//! - The shipped `deploy/prometheus/prometheus.yml` and `alerts.yml` pass `promtool check`, and
//!   the alert rules pass their unit tests (`alerts.test.yml`).
//! - Prometheus runs with the shipped configuration (scrape and evaluation every second, the
//!   target pointed at the test gateway), scrapes a push of 8 terminals (5 ack, 2 never say
//!   hello, 1 never initialises), forged acks, a used GUDID, a refused CONNECT and a bad API
//!   call; its HTTP API must
//!   show every expected series with its value, the alerts that must be pending or firing, and
//!   the gateway-down alert once the gateway is killed.

mod common;
#[path = "support/prometheus.rs"]
mod prometheus_support;

use std::process::Command;
use std::time::Duration;

use rki_gateway::api::types::TaskRequest;
use rki_protocol::frame::MacKey;
use rki_protocol::message::{Ack, Download, Message};
use rki_protocol::terminal::InjectionType;
use rki_protocol::SecretBytes;
use rki_tests::{
    create_task, for_group, mqtt_connect, provision, sns, stop_task, task_detail, wait_task, GatewayOptions,
    GatewayProcess, RawDevice, TestResult,
};

use prometheus_support::{deploy_dir, prometheus_tools, run_ok, Prometheus};

#[test]
fn the_shipped_prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() -> TestResult {
    let (_, promtool) = prometheus_tools()?;
    let dir = deploy_dir().join("prometheus");
    let config = run_ok(Command::new(&promtool).arg("check").arg("config").arg(dir.join("prometheus.yml")))?;
    assert!(config.contains("SUCCESS: 1 rule files found"), "{config}");
    let rules = run_ok(Command::new(&promtool).arg("check").arg("rules").arg(dir.join("alerts.yml")))?;
    assert!(rules.contains("SUCCESS"), "{rules}");
    let tests = run_ok(Command::new(&promtool).current_dir(&dir).args(["test", "rules", "alerts.test.yml"]))?;
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Every alert the issue asks for is there, and each has a unit test.
    let alerts = std::fs::read_to_string(dir.join("alerts.yml"))?;
    let unit_tests = std::fs::read_to_string(dir.join("alerts.test.yml"))?;
    for alert in [
        "RkiAckRejectionsRising",
        "RkiExecutionsExpiringOnNeverSeenDevices",
        "RkiTaskNoProgress",
        "RkiStoreCommitSlow",
        "RkiGatewayDown",
        "RkiBrokerConnectionsNearLimit",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}\n")), "no alert {alert}");
        assert!(unit_tests.contains(&format!("alertname: {alert}\n")), "alert {alert} has no unit test");
    }
    Ok(())
}

async fn download(device: &mut RawDevice) -> TestResult<Download> {
    match device.next_down(Duration::from_secs(10)).await? {
        Message::Download(d) => Ok(d),
        other => Err(format!("expected a download, got {other:?}").into()),
    }
}

#[test]
fn a_real_prometheus_scrapes_a_push_and_sees_every_series_with_its_value() -> TestResult {
    let (server, _) = prometheus_tools()?;
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let prometheus = Prometheus::start(
        &server,
        &format!("127.0.0.1:{}", gw.http_port),
        &[deploy_dir().join("prometheus/alerts.yml")],
    )?;
    prometheus.expect("up{job=\"rki-gateway\"}", 1.0)?;

    // 8 terminals: 5 say hello and ack, 2 initialise but are never seen online, 1 never even
    // initialises (so it is not ready, and its GUDID stays unused).
    let provisioned = provision(&gw, &sns("PROM", 8), "shop")?;
    let mut devices = Vec::new();
    for (sn, gudid) in provisioned.gudids.iter().take(7) {
        devices.push(rt.block_on(RawDevice::initialise(gw.mqtt_port, sn, gudid))?);
    }
    for device in devices.iter_mut().take(5) {
        rt.block_on(device.send(RawDevice::hello(false)))?;
    }
    gw.wait_online(&devices.iter().take(5).map(|d| d.sn.clone()).collect::<Vec<_>>(), true)?;
    let task = create_task(&api, &TaskRequest { expiry_days: Some(1), ..for_group("shop") })?.task.id;
    for device in devices.iter_mut().take(5) {
        let d = rt.block_on(download(device))?;
        rt.block_on(device.send(RawDevice::ack(&d)))?;
    }
    wait_task(&api, task, Duration::from_secs(10), |c| c.succeeded == 5)?;

    // Hostile and mistaken input, each counted: a used GUDID, a CONNECT of a device that never
    // initialised, a bad API call.
    let (sn, used) = provisioned.gudids[0].clone();
    assert!(rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &used)).is_err(), "a used GUDID worked twice");
    assert!(rt.block_on(mqtt_connect(gw.mqtt_port, "PROM000008", "made-up", false)).is_err());
    assert_eq!(api.get("/v1/tasks/999999").0, 404);

    // What the portal shows, as Prometheus sees it.
    let org = "org=\"acme\"";
    for (promql, expected) in [
        ("rki_acks_total{result=\"succeeded\"}".to_string(), 5.0),
        ("rki_acks_total{result=\"failed\"}".to_string(), 0.0),
        (format!("rki_keys_injected_total{{{org}}}"), 5.0),
        ("rki_executions_ended_total{state=\"succeeded\"}".to_string(), 5.0),
        ("rki_initialisations_total".to_string(), 7.0),
        (format!("rki_tasks_created_total{{{org}}}"), 1.0),
        ("rki_delivery_latency_seconds_count{from=\"creation\"}".to_string(), 5.0),
        // A spent GUDID no longer opens the bootstrap identity: refused at CONNECT.
        ("rki_mqtt_connects_refused_total{reason=\"no_live_gudid\"}".to_string(), 1.0),
        ("rki_gudid_refusals_total{reason=\"gudid_used\"}".to_string(), 0.0),
        ("rki_mqtt_connects_refused_total{reason=\"not_initialised\"}".to_string(), 1.0),
        ("rki_api_errors_total{code=\"not_found\"}".to_string(), 1.0),
        (format!("rki_executions{{{org},state=\"succeeded\"}}"), 5.0),
        (format!("rki_executions{{{org},state=\"queued\"}}"), 2.0),
        (format!("rki_executions{{{org},state=\"failed\"}}"), 0.0),
        (format!("rki_task_executions{{{org},state=\"succeeded\"}}"), 5.0),
        (format!("rki_task_executions{{{org},state=\"queued\"}}"), 2.0),
        (format!("rki_tasks{{{org},status=\"unfinished\"}}"), 1.0),
        (format!("rki_tasks{{{org},status=\"done\"}}"), 0.0),
        (format!("rki_devices{{{org},state=\"registered\"}}"), 8.0),
        (format!("rki_devices{{{org},state=\"initialised\"}}"), 7.0),
        (format!("rki_devices{{{org},state=\"online\"}}"), 5.0),
        (format!("rki_devices{{{org},state=\"never_seen\"}}"), 3.0),
        (format!("rki_devices{{{org},state=\"locked\"}}"), 5.0),
        (format!("rki_devices{{{org},state=\"assigned\"}}"), 8.0),
        (format!("rki_devices{{{org},state=\"pending\"}}"), 2.0),
        (format!("rki_gudids{{{org},state=\"used\"}}"), 7.0),
        (format!("rki_gudids{{{org},state=\"unused\"}}"), 1.0),
        (format!("rki_gudids{{{org},state=\"expired\"}}"), 0.0),
        ("rki_executions_expiring{window=\"24h\"}".to_string(), 2.0),
        ("rki_executions_expiring{window=\"7d\"}".to_string(), 2.0),
        ("rki_executions_expiring_never_seen{window=\"24h\"}".to_string(), 2.0),
        ("rki_devices_connected".to_string(), 5.0),
        ("rki_store_up".to_string(), 1.0),
        ("rki_broker_up".to_string(), 1.0),
        ("rki_sampler_errors_total".to_string(), 0.0),
        (format!("rki_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1.0),
        ("rki_mqtt_connections_max > bool 0".to_string(), 1.0),
        ("rki_store_commit_seconds_count > bool 0".to_string(), 1.0),
        ("rki_store_file_bytes{file=\"database\"} > bool 0".to_string(), 1.0),
        ("rki_deliveries_total >= bool 5".to_string(), 1.0),
    ] {
        prometheus.expect(&promql, expected)?;
    }

    // Forged acks: one first, so that Prometheus has the series before it rises.
    let forger = MacKey::new(SecretBytes::from_slice(&[7u8; 32]))?;
    let forged = Message::Ack(Ack {
        execution_id: 1,
        result: 0,
        slot: rki_protocol::terminal::KeySlot(1),
        key_id: vec![0; 10],
        kcv: vec![0; 3],
        injection: InjectionType::Auto,
    });
    rt.block_on(devices[0].send_with(&forger, forged.clone()))?;
    prometheus.expect("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}", 1.0)?;
    for _ in 0..8 {
        rt.block_on(devices[0].send_with(&forger, forged.clone()))?;
    }
    prometheus.expect("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}", 9.0)?;
    assert_eq!(task_detail(&api, task)?.task.counts.succeeded, 5, "a forged ack changed state");

    // The alerts: rejections fire at once; the never-seen ones wait for their `for` (pending).
    prometheus.expect_alert("RkiAckRejectionsRising", &["firing"])?;
    prometheus.expect_alert("RkiExecutionsExpiringOnNeverSeenDevices", &["pending"])?;
    prometheus.expect_alert("RkiExecutionsExpiringOnNeverSeenDevicesSoon", &["pending"])?;
    for quiet in ["RkiGatewayDown", "RkiStoreDown", "RkiBrokerDown", "RkiBrokerConnectionsNearLimit"] {
        assert_eq!(prometheus.alert_state(quiet)?, None, "{quiet} is active");
    }
    // Every rule evaluates without error against the real series.
    let rules = prometheus.api("rules", &[])?;
    let mut evaluated = 0;
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(rule["health"], "ok", "rule {} failed: {}", rule["name"], rule["lastError"]);
            evaluated += 1;
        }
    }
    assert!(evaluated >= 10, "only {evaluated} rules loaded");

    // Stopping the task moves it to done, and its executions leave the progress gauge.
    stop_task(&api, task)?;
    for (promql, expected) in [
        (format!("rki_tasks{{{org},status=\"done\"}}"), 1.0),
        (format!("rki_tasks{{{org},status=\"unfinished\"}}"), 0.0),
        (format!("sum(rki_task_executions{{{org}}})"), 0.0),
        (format!("rki_executions{{{org},state=\"terminated\"}}"), 2.0),
        ("rki_executions_ended_total{state=\"terminated\"}".to_string(), 2.0),
        ("rki_executions_expiring{window=\"7d\"}".to_string(), 0.0),
        (format!("rki_devices{{{org},state=\"pending\"}}"), 0.0),
    ] {
        prometheus.expect(&promql, expected)?;
    }

    // The gateway dies: Prometheus notices, and the gateway-down alert becomes pending.
    gw.kill()?;
    prometheus.expect("up{job=\"rki-gateway\"}", 0.0)?;
    prometheus.expect_alert("RkiGatewayDown", &["pending", "firing"])?;
    Ok(())
}
