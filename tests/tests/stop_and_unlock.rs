//! Stop, unlock and re-injection, and an injection over a locked device.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_gateway::api::types::{TaskList, TaskStopped};
use rki_protocol::message::{Ack, Message};
use rki_protocol::terminal::InjectionType;
use rki_tests::{
    create_task, for_group, preview, provision, sns, stop_task, wait, wait_task, wait_task_done, GatewayOptions,
    GatewayProcess, RawDevice, TestResult,
};
use serde_json::json;

#[test]
fn stopping_a_task_mid_push_terminates_the_rest_as_manually_terminated() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("STOP", 6), "stop")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    for device in &fleet.devices()[3..] {
        rt.block_on(device.power_off())?;
    }
    wait::until("the three terminals to be powered off and disconnected", Duration::from_secs(10), || {
        fleet.devices()[3..].iter().all(|d| !d.status().powered && !d.status().connected)
    })?;
    let task = create_task(&api, &for_group("stop"))?.task.id;
    wait_task(&api, task, Duration::from_secs(20), |c| c.succeeded == 3)?;
    let (status, v) = api.post(&format!("/v1/tasks/{task}/stop"), &json!({}));
    assert_eq!(status, 200, "{v}");
    let stopped: TaskStopped = serde_json::from_value(v)?;
    assert_eq!(stopped.terminated, 3);
    assert_eq!(stopped.task.outcome, "manually terminated");
    assert_eq!(stopped.task.status, "done");
    let done: TaskList = api.ok_as("/v1/tasks?status=done")?;
    assert_eq!(done.tasks.first().map(|t| t.outcome.as_str()), Some("manually terminated"), "{done:?}");
    let records = api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.iter().filter(|r| r["result"] == "terminated").count(), 3);
    assert_eq!(records.iter().filter(|r| r["result"] == "succeeded").count(), 3);
    // Terminated executions are never delivered: the devices come back and get nothing.
    for device in &fleet.devices()[3..] {
        rt.block_on(device.power_on())?;
    }
    // Back online (their hellos handled), and then a second to act on anything sent: time
    // passing is the point (nothing may arrive; there is no event to wait for).
    gw.wait_online(&fleet.devices()[3..].iter().map(|d| d.sn().to_string()).collect::<Vec<_>>(), true)?;
    std::thread::sleep(Duration::from_secs(1));
    for device in &fleet.devices()[3..] {
        assert_eq!(device.status().injections, 0);
    }
    // Stopping again, or stopping another organization's task, changes nothing.
    assert_eq!(stop_task(&api, task)?.terminated, 0);
    assert_eq!(api.post("/v1/tasks/999999/stop", &json!({})).0, 404);
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn unlock_then_a_new_task_injects_again() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("UNLK", 1), "u")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    let device = &fleet.devices()[0];
    let first = create_task(&api, &for_group("u"))?.task.id;
    wait_task_done(&api, first, Duration::from_secs(20))?;
    rt.block_on(device.wait_for("locked", Duration::from_secs(5), |s| s.locked))?;
    let first_ksn = api.ok(&format!("/v1/records?task={first}"))?["records"][0]["key_id"].clone();
    // Locked: the preview says so and no task can be created.
    let preview = preview(&api, &for_group("u"))?;
    let not_ready = preview.not_ready.first().ok_or_else(|| format!("every device ready: {preview:?}"))?;
    assert_eq!(not_ready.reasons.first().map(String::as_str), Some("locked"), "{preview:?}");
    assert_eq!(
        not_ready.meanings.first().map(String::as_str),
        Some("device is locked: a key is already injected; unlock it first")
    );
    let me = api.ok("/v1/whoami")?;
    assert_eq!((me["role"].as_str(), me["org"]["name"].as_str()), (Some("admin"), Some("acme")));
    assert_eq!(api.post("/v1/tasks", &json!({"group": "u"})).0, 409);
    // Unlock: the device obeys the signed unlock and reports itself unlocked.
    api.ok_post(&format!("/v1/devices/{}/unlock", device.sn()), &json!({}))?;
    rt.block_on(device.wait_for("unlocked", Duration::from_secs(10), |s| !s.locked))?;
    wait::until("the API to show the device ready", Duration::from_secs(5), || {
        api.ok(&format!("/v1/devices/{}", device.sn())).is_ok_and(|v| v["device"]["lock"] == "ready")
    })?;
    let second = create_task(&api, &for_group("u"))?.task.id;
    let done = wait_task_done(&api, second, Duration::from_secs(20))?;
    assert_eq!(done.task.counts.succeeded, 1);
    let second_ksn = api.ok(&format!("/v1/records?task={second}"))?["records"][0]["key_id"].clone();
    assert_ne!(first_ksn, second_ksn, "a re-injection gets a new KSN");
    assert_eq!(device.status().injections, 2);
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn an_injection_over_a_locked_device_is_recorded_as_minus_11208_with_its_meaning() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("LOCK", 1), "l")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    // Initialised, never seen online: the gateway cannot know the terminal is locked.
    let mut device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid))?;
    let task = create_task(&api, &for_group("l"))?.task.id;
    rt.block_on(device.send(RawDevice::hello(true)))?;
    let Message::Download(d) = rt.block_on(device.next_down(Duration::from_secs(10)))? else {
        return Err("no download".into());
    };
    let ack = Ack {
        execution_id: d.execution_id,
        result: -11208,
        slot: d.slot,
        key_id: vec![],
        kcv: vec![],
        injection: InjectionType::Auto,
    };
    rt.block_on(device.send(Message::Ack(ack)))?;
    let done = wait_task_done(&api, task, Duration::from_secs(10))?;
    assert_eq!(done.task.counts.failed, 1);
    let execution = done.executions.first().ok_or("no execution")?;
    assert_eq!(execution.result, Some(-11208));
    assert_eq!(execution.result_meaning.as_deref(), Some("device is locked: a key is already injected"));
    let record = &api.ok(&format!("/v1/records?task={task}"))?["records"][0];
    assert_eq!(record["result"], "failed");
    assert_eq!(record["error_code"], -11208);
    assert_eq!(record["kcv"], "");
    assert_eq!(gw.metric("rki_acks_total{result=\"failed\"}"), 1.0);
    let csv = api.get_text(&format!("/v1/records?task={task}&format=csv")).1;
    assert!(csv.contains("-11208,device is locked: a key is already injected"), "{csv}");
    Ok(())
}
