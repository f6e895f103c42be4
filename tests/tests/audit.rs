//! The audit log as an operator reads it: every change names who did it and to what, in the same
//! object vocabulary (`group:NAME`, `devices:N`, `task:ID`, `device:SN`); no key material appears
//! in it; and one organization never sees another's entries.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_tests::{
    create_task, for_group, provision, sns, stop_task, GatewayOptions, GatewayProcess, TestResult, TEST_BDK,
};
use serde_json::{json, Value};

fn entries(v: &Value) -> Vec<Value> {
    v["audit"].as_array().cloned().unwrap_or_default()
}

fn find<'a>(entries: &'a [Value], action: &str, object: &str) -> Option<&'a Value> {
    entries.iter().find(|e| e["action"] == action && e["object"] == object)
}

#[test]
fn every_operator_change_is_audited_with_a_readable_object_and_no_key_material() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let devices = sns("AUD", 3);
    let provisioned = provision(&gw, &devices, "audited")?;
    // Initialised terminals, then switched off: the task stays open until it is stopped.
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    for device in fleet.devices() {
        rt.block_on(device.power_off())?;
    }
    gw.wait_online(&devices, false)?;
    api.ok_post("/v1/assignments", &json!({"sns": [devices[0], devices[1]], "key_source": "bdk-test"}))?;
    let task = create_task(&api, &for_group("audited"))?.task.id;
    stop_task(&api, task)?;
    api.ok_post(&format!("/v1/devices/{}/unlock", devices[2]), &json!({}))?;

    let log = entries(&api.ok("/v1/audit")?);
    let group = find(&log, "assignment.set", "group:audited").ok_or("no assignment of the group")?;
    assert_eq!(group["details"]["devices"], 3, "{group}");
    assert_eq!(group["details"]["key_source"], "bdk-test");
    let by_sn = find(&log, "assignment.set", "devices:2").ok_or("no assignment by SN")?;
    assert_eq!(by_sn["details"]["sns"], json!([devices[0], devices[1]]), "{by_sn}");
    assert!(find(&log, "group.create", "group:audited").is_some(), "{log:?}");
    // The key owner's upload is in the organization's log too, naming the organization and the count.
    let upload = find(&log, "devices.upload", "devices:3").ok_or("no upload")?;
    assert_eq!((&upload["details"]["org"], &upload["details"]["imported"]), (&json!("acme"), &json!(3)), "{upload}");
    let grouped = find(&log, "group.add_devices", "group:audited").ok_or("no group addition")?;
    assert_eq!(grouped["details"]["added"], 3, "{grouped}");
    // One entry per GUDID, written with it (object `device:SN`, the GUDID's row id in details).
    for sn in &devices {
        let entry = find(&log, "gudid.provision", &format!("device:{sn}")).ok_or("no GUDID provisioning")?;
        assert!(entry["details"]["gudid"].as_i64().is_some(), "{entry}");
    }
    assert!(find(&log, "task.create", &format!("task:{task}")).is_some(), "{log:?}");
    let stop = find(&log, "task.stop", &format!("task:{task}")).ok_or("no stop")?;
    assert_eq!(stop["details"]["terminated"], 3, "{stop}");
    assert!(find(&log, "device.unlock", &format!("device:{}", devices[2])).is_some(), "{log:?}");
    for entry in &log {
        assert!(!entry["actor"].as_str().unwrap_or_default().is_empty(), "an entry without an actor: {entry}");
        let object = entry["object"].as_str().unwrap_or_default();
        assert!(!object.contains('(') && !object.contains('"'), "a debug-formatted object: {entry}");
    }

    // The key owner's view holds the ceremony; nowhere does a component or the BDK appear.
    let owner_log = entries(&gw.key_owner().ok("/v1/audit")?);
    assert!(owner_log.iter().any(|e| e["action"] == "key_source.authorize"), "{owner_log:?}");
    let text = format!("{log:?}{owner_log:?}").to_uppercase();
    assert!(!text.contains(TEST_BDK), "the BDK appears in the audit log");
    assert!(!text.contains("1111111111111111EEEEEEEEEEEEEEEE"), "a BDK component appears in the audit log");

    // Another organization sees none of it.
    let rival = rki_tests::Api::new(&gw.url(), &gw.init_org("rival")?);
    let rival_log = entries(&rival.ok("/v1/audit")?);
    assert!(
        rival_log.iter().all(|e| !e["object"].as_str().unwrap_or_default().contains("audited")
            && !e["object"].as_str().unwrap_or_default().starts_with("task:")),
        "{rival_log:?}"
    );
    rt.block_on(fleet.shutdown());
    Ok(())
}

/// The gateway SIGKILLs itself at the crash point named in its environment (`RKI_CRASH_POINT`):
/// right after an action's transaction committed, where its audit entry used to be written on
/// its own, or inside that transaction before the commit. After the restart, the action and its
/// audit entry are both there, or neither is.
#[test]
fn an_action_and_its_audit_entry_survive_a_sigkill_together_or_not_at_all() -> TestResult {
    use std::os::unix::process::ExitStatusExt;
    for (point, kept) in [("group.create", true), ("group.create@transaction", false)] {
        let crash = vec![("RKI_CRASH_POINT".to_string(), point.to_string())];
        let mut gw = GatewayProcess::start(GatewayOptions { env: crash, ..GatewayOptions::default() })?;
        let api = gw.api();
        let (status, answer) = api.post("/v1/groups", &json!({"name": "crashed"}));
        assert_eq!(status, 0, "{point}: the gateway answered instead of dying: {answer}");
        let exit = gw.wait_exit(Duration::from_secs(10))?;
        assert_eq!(exit.signal(), Some(9), "{point}: not killed by SIGKILL: {exit:?}");
        gw.set_env(Vec::new());
        gw.start_again()?;
        let groups = api.ok("/v1/groups")?;
        let exists = groups["groups"].as_array().is_some_and(|g| g.iter().any(|g| g["name"] == "crashed"));
        let log = entries(&api.ok("/v1/audit")?);
        let audited = find(&log, "group.create", "group:crashed").is_some();
        assert_eq!((exists, audited), (kept, kept), "{point}: group there {exists}, audited {audited}: {log:?}");
        // The store goes on: the group is created again, or is there already.
        let (status, _) = api.post("/v1/groups", &json!({"name": "crashed"}));
        assert_eq!(status, if kept { 409 } else { 201 }, "{point}");
    }
    Ok(())
}
