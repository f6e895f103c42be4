//! The gateway as a client of a real Mosquitto 2 with its dynamic security plugin, whose clients
//! and roles (managed by the gateway over `$CONTROL`) confine every terminal to its own topics.

mod common;

use std::time::Duration;

use rki_device_sim::{BrokerAddr, Brokers, Knobs};
use rki_protocol::message::Message;
use rki_protocol::topic;
use rki_tests::cluster::seed_and_start_mosquitto;
use rki_tests::{
    create_task, expected_kcv, free_port, provision, sns, temp_dir, wait, wait_bootstrap_admitted, wait_task_done,
    GatewayOptions, GatewayProcess, Mosquitto, RawDevice, TestResult,
};
use rumqttc::QoS;
use serde_json::json;

fn external_config(port: u16, dir: &std::path::Path) -> String {
    format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\nusername = \"rki-gateway\"\npassword = \"gw-secret\"\n\
         client_id = \"rki-gateway-1\"\nshared_group = \"rki\"\n\
         [broker.dynsec]\nadmin_password_file = \"{}/broker-admin.secret\"\n",
        dir.display()
    )
}

/// Seeds Mosquitto's dynamic security plugin (`rki-gateway dynsec-init`), starts Mosquitto on
/// it, then the gateway in external mode, which manages the broker's clients from then on.
fn gateway_and_mosquitto() -> TestResult<(GatewayProcess, Mosquitto)> {
    let port = free_port();
    let dir = temp_dir("dynsec");
    let toml = external_config(port, &dir);
    let mosquitto = seed_and_start_mosquitto(&toml, &dir, port)?;
    let gw = GatewayProcess::start(GatewayOptions { config_toml: Some(toml), ..Default::default() })?;
    wait::until("the gateway to connect to Mosquitto", Duration::from_secs(15), || {
        gw.metric("rki_broker_up") >= 1.0 && gw.metric("rki_dynsec_up") >= 1.0
    })
    .map_err(|e| format!("{e}: {}", gw.log_tail()))?;
    // Subscribed a moment after the CONNACK (the plugin's broker logs no subscriptions to wait on).
    std::thread::sleep(Duration::from_millis(500));
    Ok((gw, mosquitto))
}

#[test]
fn a_push_through_mosquitto_injects_every_device_once() -> TestResult {
    Mosquitto::binary()?;
    let rt = common::runtime();
    let (gw, mosquitto) = gateway_and_mosquitto()?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("MOSQ", 50), "mq")?;
    rt.block_on(wait_bootstrap_admitted(mosquitto.port, &provisioned.gudids, Duration::from_secs(15)))?;
    let mut config = common::fleet_config(mosquitto.port, &provisioned, Knobs::default())?;
    config.brokers = Brokers::one(BrokerAddr::new("127.0.0.1", mosquitto.port));
    let fleet = rt.block_on(common::spawn_fleet(config, Duration::from_secs(60)))?;
    let task = create_task(&api, &json!({"group": "mq"}))?;
    let done = wait_task_done(&api, task, Duration::from_secs(60))?;
    assert_eq!(done["task"]["counts"]["succeeded"], 50, "{}", done["task"]["counts"]);
    for r in api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default() {
        assert_eq!(r["kcv"].as_str(), Some(expected_kcv(r["key_id"].as_str().unwrap_or_default())?.as_str()));
    }
    for d in fleet.devices() {
        assert_eq!(d.status().injections, 1);
    }
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn mosquitto_refuses_a_terminal_the_topics_of_another() -> TestResult {
    Mosquitto::binary()?;
    let rt = common::runtime();
    let (gw, mosquitto) = gateway_and_mosquitto()?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("ACL", 2), "acl")?;
    rt.block_on(wait_bootstrap_admitted(mosquitto.port, &provisioned.gudids, Duration::from_secs(15)))?;
    let (a_sn, a_gudid) = provisioned.gudids[0].clone();
    let (b_sn, b_gudid) = provisioned.gudids[1].clone();
    let mut a = rt.block_on(RawDevice::initialise(mosquitto.port, &a_sn, &a_gudid))?;
    let mut b = rt.block_on(RawDevice::initialise(mosquitto.port, &b_sn, &b_gudid))?;
    // A tries to listen to B's downloads and to everything.
    rt.block_on(a.client.subscribe(topic::device_down(&b_sn), QoS::AtLeastOnce))?;
    rt.block_on(a.client.subscribe("#", QoS::AtLeastOnce))?;
    rt.block_on(b.send(RawDevice::hello(false)))?;
    gw.wait_online(&[&b_sn], true)?;
    let task = create_task(&api, &json!({"sns": [b_sn.clone()]}))?;
    let Message::Download(d) = rt.block_on(b.next_down(Duration::from_secs(10)))? else {
        return Err("no download for B".into());
    };
    // A saw nothing of it.
    let leaked = rt.block_on(a.next_down(Duration::from_secs(1)));
    assert!(leaked.is_err(), "A received B's traffic: {leaked:?}");
    // (The plugin refuses the SUBSCRIBE, and would filter each delivery by the receive rules
    // anyway: the proof is what A receives, above.)
    // A publishes an ack for B's execution on B's topic: the broker drops it; the gateway never sees it.
    let before = gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}");
    let forged =
        rki_protocol::message::Body { party: b_sn.clone(), counter: a.next_counter(), message: RawDevice::ack(&d) };
    rt.block_on(a.publish_raw(&topic::device_up(&b_sn), rki_protocol::frame::seal(&a.secrets.signing_key, &forged)?))?;
    // Time passing is the point: the forged publish must not reach the gateway within 800 ms
    // (the broker drops it; there is no event to wait for).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}"),
        before,
        "the forged publish reached the gateway"
    );
    assert_eq!(api.ok(&format!("/v1/tasks/{task}"))?["task"]["status"], "unfinished");
    // B's own ack goes through.
    rt.block_on(b.send(RawDevice::ack(&d)))?;
    wait_task_done(&api, task, Duration::from_secs(10))?;
    Ok(())
}
