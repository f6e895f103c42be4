//! SIGKILL in the middle of a fleet push: nothing lost, nothing twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use rki_device_sim::Knobs;
use rki_tests::{
    create_task, expected_kcv, for_group, provision, sns, wait_task, wait_task_done, GatewayOptions, GatewayProcess,
    TestResult,
};

#[test]
fn sigkill_mid_push_of_2000_devices_loses_nothing_and_records_each_device_once() -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("CRASH", 2000), "fleet")?;
    // Acks take a while, so the kill lands while most are in flight.
    let knobs = Knobs { ack_delay: Duration::from_millis(1500), ..Knobs::default() };
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, knobs)?,
        Duration::from_secs(120),
    ))?;
    let task = create_task(&api, &for_group("fleet"))?.task.id;
    // Kill once some acks are durable and many are not.
    wait_task(&api, task, Duration::from_secs(30), |c| c.succeeded >= 1)?;
    gw.kill()?;
    let installed_at_kill = fleet.snapshot().keys_installed;
    // The broker restarts with no sessions; devices reconnect and say hello.
    gw.restart()?;
    let done = wait_task_done(&api, task, Duration::from_secs(120))?;
    assert_eq!(done.task.counts.succeeded, 2000, "{:?}", done.task.counts);
    let records = api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 2000);
    let mut per_sn: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *per_sn.entry(r["sn"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        assert_eq!(r["kcv"].as_str(), Some(expected_kcv(r["key_id"].as_str().unwrap_or_default())?.as_str()));
    }
    assert_eq!(per_sn.len(), 2000);
    assert!(per_sn.values().all(|n| *n == 1), "a device was recorded twice");
    rt.block_on(fleet.wait_keys_installed(2000, Duration::from_secs(30))).map_err(|e| format!("{e:?}"))?;
    for device in fleet.devices() {
        assert_eq!(device.status().injections, 1, "{} injected twice", device.sn());
    }
    eprintln!("killed with {installed_at_kill} keys installed on devices; all 2000 recorded once after restart");
    rt.block_on(fleet.shutdown());
    Ok(())
}
