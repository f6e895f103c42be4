//! Topic confinement with the embedded broker: it has no per-topic ACL, so the message layer must
//! make another terminal's subscriptions useless and its publications harmless.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_protocol::frame;
use rki_protocol::message::{Body, Message, Unlock};
use rki_protocol::topic;
use rki_tests::{
    create_task, provision, sns, wait_task_done, Capture, GatewayOptions, GatewayProcess, RawDevice, TestResult,
};
use serde_json::json;

#[test]
fn a_rogue_terminal_subscribed_to_everything_can_neither_use_nor_replay_what_it_sees() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("CONF", 4), "conf")?;
    let (rogue_sn, rogue_gudid) = provisioned.gudids[3].clone();
    let victims =
        rki_tests::Provisioned { sns: provisioned.sns[..3].to_vec(), gudids: provisioned.gudids[..3].to_vec() };
    // The rogue is a legitimate, initialised terminal of the same fleet.
    let rogue = rt.block_on(RawDevice::initialise(gw.mqtt_port, &rogue_sn, &rogue_gudid))?;
    // A second connection with the rogue's identity would take over its own session; a capture
    // needs its own identity, so it uses the bootstrap one, which any registered SN may open.
    let mut capture = rt.block_on(Capture::start(gw.mqtt_port, &format!("init@{rogue_sn}"), "bootstrap"))?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &victims, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    let task = create_task(&api, &json!({"sns": victims.sns}))?;
    wait_task_done(&api, task, Duration::from_secs(30))?;
    let captured = rt.block_on(capture.drain(Duration::from_millis(500))).to_vec();
    assert!(
        captured.iter().any(|(t, _)| t.ends_with("/down")),
        "the broker let the rogue see the downloads: that is the premise"
    );
    let records_before = api.ok("/v1/records")?["records"].as_array().map(Vec::len);
    let injections_before: Vec<u64> = fleet.devices().iter().map(|d| d.status().injections).collect();

    // 1. Replay every captured frame on every victim topic, up and down.
    for (_, bytes) in &captured {
        for sn in &victims.sns {
            for t in [topic::device_up(sn), topic::device_down(sn), topic::init(sn)] {
                rt.block_on(rogue.publish_raw(&t, bytes.clone()))?;
            }
        }
    }
    // 2. Forge: an unlock for a victim, signed with the rogue's own key; a hello on a victim's topic.
    let victim = &victims.sns[0];
    let unlock =
        Body { party: victim.clone(), counter: u64::MAX - 1, message: Message::Unlock(Unlock { unlock_id: 1 }) };
    rt.block_on(rogue.publish_raw(&topic::device_down(victim), frame::seal(&rogue.secrets.signing_key, &unlock)?))?;
    let hello = Body { party: victim.clone(), counter: u64::MAX - 1, message: RawDevice::hello(false) };
    rt.block_on(rogue.publish_raw(&topic::device_up(victim), frame::seal(&rogue.secrets.signing_key, &hello)?))?;
    std::thread::sleep(Duration::from_secs(2));

    // Nothing changed: no record, no injection, every victim still locked, the gateway still
    // sees them locked.
    assert_eq!(api.ok("/v1/records")?["records"].as_array().map(Vec::len), records_before);
    let injections_after: Vec<u64> = fleet.devices().iter().map(|d| d.status().injections).collect();
    assert_eq!(injections_after, injections_before);
    for device in fleet.devices() {
        let status = device.status();
        assert!(status.locked, "{} was unlocked by a forged or replayed frame", device.sn());
        assert!(status.rejected.total() > 0, "{} should have counted the frames it refused", device.sn());
    }
    for sn in &victims.sns {
        assert_eq!(api.ok(&format!("/v1/devices/{sn}"))?["device"]["lock"], "locked");
    }
    assert!(gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"replay\"}") >= 3.0);
    assert!(gw.metric("rki_rejected_messages_total{kind=\"hello\",reason=\"bad_mac\"}") >= 1.0);
    rt.block_on(fleet.shutdown());
    Ok(())
}
