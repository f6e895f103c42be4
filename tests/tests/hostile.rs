//! Hostile input changes nothing and is counted: forged, replayed, foreign and wrong-KCV acks,
//! garbage, oversized payloads, unknown SNs at CONNECT, bad CSVs, another organization's token.

mod common;

use std::time::Duration;

use rki_gateway::api::types::TaskCounts;
use rki_protocol::frame::MacKey;
use rki_protocol::message::{Download, Message};
use rki_protocol::{topic, SecretBytes};
use rki_tests::{
    create_task, for_group, mqtt_connect, provision, sns, task_detail, wait_task, GatewayOptions, GatewayProcess,
    RawDevice, TestResult,
};
use serde_json::json;

fn rejected(gw: &GatewayProcess, kind: &str, reason: &str) -> f64 {
    gw.metric(&format!("rki_rejected_messages_total{{kind=\"{kind}\",reason=\"{reason}\"}}"))
}

/// Polls until the rejection counter reaches `at_least`.
fn wait_rejected(gw: &GatewayProcess, kind: &str, reason: &str, at_least: f64) -> TestResult {
    let sample = format!("rki_rejected_messages_total{{kind=\"{kind}\",reason=\"{reason}\"}}");
    gw.wait_metric(&sample, Duration::from_secs(5), |v| v >= at_least).map(drop)
}

async fn download(device: &mut RawDevice) -> TestResult<Download> {
    match device.next_down(Duration::from_secs(10)).await? {
        Message::Download(d) => Ok(d),
        other => Err(format!("expected a download, got {other:?}").into()),
    }
}

#[test]
fn hostile_acks_change_nothing_and_are_counted_then_the_honest_ack_succeeds() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("HOST", 2), "pair")?;
    let (sn_a, gudid_a) = provisioned.gudids[0].clone();
    let (sn_b, gudid_b) = provisioned.gudids[1].clone();
    let mut a = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn_a, &gudid_a))?;
    let mut b = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn_b, &gudid_b))?;
    rt.block_on(a.send(RawDevice::hello(false)))?;
    rt.block_on(b.send(RawDevice::hello(false)))?;
    gw.wait_online(&[&sn_a, &sn_b], true)?;
    let task = create_task(&api, &for_group("pair"))?.task.id;
    let da = rt.block_on(download(&mut a))?;
    let db = rt.block_on(download(&mut b))?;
    let open = |c: &TaskCounts| c.succeeded == 0 && c.failed == 0;

    // A forged ack: right content, wrong key.
    let forger = MacKey::new(SecretBytes::from_slice(&[7u8; 32]))?;
    rt.block_on(a.send_with(&forger, RawDevice::ack(&da)))?;
    wait_rejected(&gw, "ack", "bad_mac", 1.0)?;
    // A wrong KCV, properly signed.
    rt.block_on(a.send(RawDevice::ack_with_kcv(&da, vec![0, 0, 0])))?;
    wait_rejected(&gw, "ack", "kcv_mismatch", 1.0)?;
    // B acks A's execution with B's own valid signature.
    rt.block_on(b.send(RawDevice::ack(&da)))?;
    wait_rejected(&gw, "ack", "foreign_execution", 1.0)?;
    // Garbage and an oversized payload.
    rt.block_on(a.publish_raw(&topic::device_up(&sn_a), b"\x01\xff\xff\xff garbage".to_vec()))?;
    wait_rejected(&gw, "device", "malformed", 1.0)?;
    rt.block_on(a.publish_raw(&topic::device_up(&sn_a), vec![1u8; 5000]))?;
    wait_rejected(&gw, "device", "oversized", 1.0)?;
    let counts = task_detail(&api, task)?.task.counts;
    assert!(open(&counts), "a rejected ack changed state: {counts:?}");
    assert_eq!(api.ok("/v1/records")?["records"].as_array().map(Vec::len), Some(0));

    // The honest ack succeeds; replaying its exact bytes is refused and changes nothing.
    let honest = rt.block_on(a.send(RawDevice::ack(&da)))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 1)?;
    rt.block_on(a.publish_raw(&topic::device_up(&sn_a), honest))?;
    wait_rejected(&gw, "ack", "replay", 1.0)?;
    rt.block_on(b.send(RawDevice::ack(&db)))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 2)?;
    let records = api.ok(&format!("/v1/records?task={task}"))?;
    assert_eq!(records["records"].as_array().map(Vec::len), Some(2), "exactly one record per device");

    // B publishes on A's topic, signed by B: the endpoint refuses it before the engine sees it
    // (MQTT 3.1.1: B's connection is closed), so no frame reaches A's verification at all.
    let bad_mac_before = rejected(&gw, "ack", "bad_mac");
    let body =
        rki_protocol::message::Body { party: sn_a.clone(), counter: b.next_counter(), message: RawDevice::ack(&da) };
    let frame = rki_protocol::frame::seal(&b.secrets.signing_key, &body)?;
    let _ = rt.block_on(b.publish_raw(&topic::device_up(&sn_a), frame));
    gw.wait_metric("rki_mqtt_refusals_total{reason=\"foreign_publish\"}", Duration::from_secs(5), |v| v >= 1.0)
        .map_err(|e| format!("the foreign publish was not refused: {e}"))?;
    assert_eq!(rejected(&gw, "ack", "bad_mac"), bad_mac_before, "the foreign frame reached the engine");
    assert_eq!(api.ok("/v1/records")?["records"].as_array().map(Vec::len), Some(2));
    Ok(())
}

#[test]
fn unknown_sns_and_wrong_passwords_are_refused_at_connect_and_counted() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let provisioned = provision(&gw, &sns("CONN", 1), "one")?;
    let unknown = rt.block_on(mqtt_connect(gw.mqtt_port, "NOSUCHSN", "x", false));
    assert!(unknown.is_err(), "an unknown SN was let in");
    let wrong = rt.block_on(mqtt_connect(gw.mqtt_port, "CONN000001", "not-the-password", false));
    assert!(wrong.is_err(), "a device that never initialised was let in with a made-up password");
    let boot_unknown = rt.block_on(mqtt_connect(gw.mqtt_port, "init@NOSUCHSN", &"0".repeat(64), true));
    assert!(boot_unknown.is_err(), "bootstrap for an unregistered SN was let in");
    // The old public bootstrap password opens nothing: the bootstrap identity proves a live GUDID.
    let boot_public = rt.block_on(mqtt_connect(gw.mqtt_port, "init@CONN000001", "bootstrap", true));
    assert!(boot_public.is_err(), "the bootstrap identity was let in without its GUDID");
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"unknown_sn\"}") >= 1.0);
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"not_initialised\"}") >= 1.0);
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"no_live_gudid\"}") >= 1.0);
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"bad_bootstrap\"}") >= 1.0);
    let gudid = rki_protocol::init::Gudid::parse(&provisioned.gudids[0].1)?;
    let password = rki_tests::bootstrap_password(&gudid, "CONN000001");
    let boot = rt.block_on(mqtt_connect(gw.mqtt_port, "init@CONN000001", &password, true));
    assert!(boot.is_ok(), "a registered device with a live GUDID may bootstrap");
    Ok(())
}

#[test]
fn a_bad_csv_imports_nothing_and_names_each_bad_line() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let (status, v) = gw.upload_devices("acme", "sn,model\nGOOD1,P3\nbad sn,P3\nGOOD2,P99\nGOOD1,P3\n");
    assert_eq!(status, 422, "{v}");
    let lines: Vec<i64> =
        v["errors"].as_array().map(|e| e.iter().filter_map(|x| x["line"].as_i64()).collect()).unwrap_or_default();
    assert_eq!(lines, vec![3, 4, 5]);
    assert_eq!(api.ok("/v1/devices")?["total"], 0, "nothing half-imported");
    assert!(gw.metric("rki_api_errors_total{code=\"invalid_csv\"}") >= 1.0);
    Ok(())
}

#[test]
fn another_organizations_token_sees_and_touches_nothing() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    provision(&gw, &sns("MINE", 2), "mine")?;
    let other = rki_tests::Api::new(&gw.url(), &gw.init_org("rival")?);
    assert_eq!(other.ok("/v1/devices")?["total"], 0);
    assert_eq!(other.get("/v1/devices/MINE000001").0, 404);
    assert_eq!(other.ok("/v1/groups")?["groups"].as_array().map(Vec::len), Some(0));
    assert_eq!(other.ok("/v1/key-sources")?["key_sources"].as_array().map(Vec::len), Some(0));
    assert_eq!(other.post("/v1/assignments", &json!({"sns": ["MINE000001"], "key_source": "bdk-test"})).0, 404);
    assert_eq!(other.post("/v1/devices/MINE000001/unlock", &json!({})).0, 404);
    assert_eq!(other.post("/v1/gudids", &json!({"sn": "MINE000001"})).0, 404);
    assert_eq!(other.post("/v1/tasks/preview", &json!({"group": "mine"})).0, 404);
    // It cannot register SNs at all: the key owner uploads each organization's devices.
    let (status, v) = other.post_csv("/v1/devices/import", "MINE000001\n");
    assert_eq!(status, 403, "{v}");
    // The key owner's token is not an organization's token, and no token is no access.
    assert_eq!(gw.key_owner().get("/v1/devices").0, 403);
    assert_eq!(rki_tests::Api::new(&gw.url(), "rki_org_forged").get("/v1/devices").0, 401);
    // Nothing changed for the owner.
    assert_eq!(api.ok("/v1/devices")?["total"], 2);
    Ok(())
}
