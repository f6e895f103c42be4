//! The happy path, end to end: the real gateway binary, real MQTT, simulated terminals.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_gateway::api::types::TaskDetail;
use rki_tests::{
    create_task, expected_kcv, for_group, preview, provision, sns, wait_task_done, GatewayOptions, GatewayProcess,
    TestResult,
};

#[test]
fn a_group_of_200_devices_gets_one_verified_key_each_and_ends_locked() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let devices = sns("HAPPY", 200);
    let provisioned = provision(&gw, &devices, "warehouse")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    // Every device reported its firmware through its hello: all are ready.
    let preview = preview(&api, &for_group("warehouse"))?;
    assert_eq!(preview.ready.len(), 200, "{preview:?}");
    let task = create_task(&api, &for_group("warehouse"))?.task.id;
    let done = wait_task_done(&api, task, Duration::from_secs(60))?;
    assert_eq!(done.task.counts.succeeded, 200, "{:?}", done.task);
    assert_eq!(done.task.outcome, "succeeded");
    rt.block_on(fleet.wait_keys_installed(200, Duration::from_secs(10))).map_err(|e| format!("{e:?}"))?;
    // The task's devices: every one by default, a page with limit/offset, none with limit=0.
    let all = &done.executions;
    assert_eq!((all.len(), done.executions_total), (200, 200));
    let counts_only: TaskDetail = api.ok_as(&format!("/v1/tasks/{task}?limit=0"))?;
    assert!(counts_only.executions.is_empty(), "{:?}", counts_only.executions);
    assert_eq!((counts_only.executions_total, &counts_only.task.counts), (200, &done.task.counts));
    let page: TaskDetail = api.ok_as(&format!("/v1/tasks/{task}?limit=3&offset=198"))?;
    let page_ids: Vec<i64> = page.executions.iter().map(|e| e.id).collect();
    assert_eq!(page_ids, vec![all[198].id, all[199].id], "the last two of 200 from offset 198");
    assert_eq!(page.executions_offset, 198);

    let records = api.ok(&format!("/v1/records?task={task}"))?;
    let records = records["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 200);
    let mut seen = std::collections::HashSet::new();
    for r in &records {
        assert_eq!(r["result"], "succeeded");
        assert_eq!(r["injection"], "auto");
        assert_eq!(r["key_type"], "IPEK");
        assert_eq!(r["key_source"], "bdk-test");
        let ksn = r["key_id"].as_str().unwrap_or_default();
        assert_eq!(r["kcv"].as_str(), Some(expected_kcv(ksn)?.as_str()), "KCV of {ksn}");
        assert!(seen.insert(ksn.to_string()), "KSN {ksn} used twice");
        assert!(seen.insert(r["sn"].to_string()), "SN recorded twice");
    }
    // The devices are locked, both as the gateway records it and on the terminals themselves.
    let listed = api.ok("/v1/devices?group=warehouse")?;
    for d in listed["devices"].as_array().cloned().unwrap_or_default() {
        assert_eq!(d["lock"], "locked", "{d}");
        assert_eq!(d["task"], "none");
    }
    for device in fleet.devices() {
        let status = device.status();
        assert!(status.locked, "{} not locked", device.sn());
        assert_eq!(status.injections, 1, "{} injected {} times", device.sn(), status.injections);
    }
    assert_eq!(gw.metric("rki_acks_total{result=\"succeeded\"}"), 200.0);
    assert_eq!(gw.metric("rki_keys_injected_total{org=\"acme\"}"), 200.0);
    let billing = api.ok("/v1/billing")?;
    assert_eq!(billing["billing"][0]["keys"], 200, "{billing}");
    rt.block_on(fleet.shutdown());
    Ok(())
}
