//! Topic confinement: the MQTT endpoint confines every identity to its own topics, so a rogue
//! terminal of the same fleet sees nothing of the others and cannot publish on their topics; the
//! message layer's MACs and counters stay the second line.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_protocol::frame;
use rki_protocol::message::{Body, Message, Unlock};
use rki_protocol::topic;
use rki_tests::{
    bootstrap_password, create_task, for_sns, provision, sns, wait_task_done, Capture, GatewayOptions, GatewayProcess,
    RawDevice, TestResult,
};
use serde_json::json;

#[test]
fn a_rogue_terminal_can_neither_see_nor_publish_on_another_terminals_topics() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("CONF", 4), "conf")?;
    let (rogue_sn, rogue_gudid) = provisioned.gudids[3].clone();
    let victims =
        rki_tests::Provisioned { sns: provisioned.sns[..3].to_vec(), gudids: provisioned.gudids[..3].to_vec() };
    // The rogue is a legitimate, initialised terminal of the same fleet, and holds a second, live
    // GUDID for its own SN, so it can also open its bootstrap identity.
    let rogue = rt.block_on(RawDevice::initialise(gw.mqtt_port, &rogue_sn, &rogue_gudid))?;
    let second = api.ok_post("/v1/gudids", &json!({"sn": rogue_sn}))?["gudids"][0]["gudid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let password = bootstrap_password(&rki_protocol::init::Gudid::parse(&second)?, &rogue_sn);
    // Capture subscribes to `#`: refused.
    let mut capture = rt.block_on(Capture::start(gw.mqtt_port, &format!("init@{rogue_sn}"), &password))?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &victims, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    let task = create_task(&api, &for_sns(&victims.sns))?.task.id;
    wait_task_done(&api, task, Duration::from_secs(30))?;
    let captured = rt.block_on(capture.drain(Duration::from_millis(500))).to_vec();
    assert!(captured.is_empty(), "the endpoint let a `#` subscription see {} messages", captured.len());
    assert!(gw.metric("rki_mqtt_refusals_total{reason=\"wildcard_subscribe\"}") >= 1.0);
    let records_before = api.ok("/v1/records")?["records"].as_array().map(Vec::len);
    let injections_before: Vec<u64> = fleet.devices().iter().map(|d| d.status().injections).collect();

    // Forge: an unlock for a victim signed with the rogue's own key, on the victim's down topic. The
    // endpoint refuses the publish (MQTT 3.1.1: it closes the rogue's connection).
    let victim = &victims.sns[0];
    let unlock =
        Body { party: victim.clone(), counter: u64::MAX - 1, message: Message::Unlock(Unlock { unlock_id: 1 }) };
    let _ =
        rt.block_on(rogue.publish_raw(&topic::device_down(victim), frame::seal(&rogue.secrets.signing_key, &unlock)?));
    // Time passing is the point: nothing may happen within 2 s (there is no event to wait for).
    std::thread::sleep(Duration::from_secs(2));

    // Nothing changed: no record, no injection, every victim still locked.
    assert_eq!(api.ok("/v1/records")?["records"].as_array().map(Vec::len), records_before);
    let injections_after: Vec<u64> = fleet.devices().iter().map(|d| d.status().injections).collect();
    assert_eq!(injections_after, injections_before);
    for device in fleet.devices() {
        assert!(device.status().locked, "{} was unlocked by a forged frame", device.sn());
    }
    for sn in &victims.sns {
        assert_eq!(api.ok(&format!("/v1/devices/{sn}"))?["device"]["lock"], "locked");
    }
    assert!(gw.metric("rki_mqtt_refusals_total{reason=\"foreign_publish\"}") >= 1.0);
    assert!(gw.metric("rki_mqtt_connections_closed_total{reason=\"foreign_publish\"}") >= 1.0);
    rt.block_on(fleet.shutdown());
    Ok(())
}
