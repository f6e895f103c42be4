//! Offline devices, power-on delivery and expiry on the injected clock.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_gateway::api::types::{TaskDetail, TaskRequest};
use rki_protocol::message::Message;
use rki_tests::{
    create_task, for_group, preview, provision, sns, task_detail, wait_task, wait_task_done, GatewayOptions,
    GatewayProcess, RawDevice, TestResult,
};
use serde_json::json;

#[test]
fn a_device_powered_off_at_task_creation_gets_its_key_at_power_on() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("OFF", 3), "shelf")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    let sleeper = &fleet.devices()[0];
    rt.block_on(sleeper.power_off())?;
    gw.wait_online(&[sleeper.sn()], false)?;
    let task = create_task(&api, &for_group("shelf"))?.task.id;
    let t = wait_task(&api, task, Duration::from_secs(20), |c| c.succeeded == 2)?;
    assert_eq!(t.task.status, "unfinished", "the powered-off device is still pending");
    assert_eq!(t.task.counts.succeeded, 2);
    assert_eq!(sleeper.status().injections, 0);
    rt.block_on(sleeper.power_on())?;
    let done = wait_task_done(&api, task, Duration::from_secs(30))?;
    assert_eq!(done.task.counts.succeeded, 3);
    assert_eq!(sleeper.status().injections, 1);
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn a_device_never_seen_before_expiry_ends_expired_and_gets_nothing_afterwards() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions { adjustable_clock: true, ..Default::default() })?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("NEVER", 1), "late")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    // Initialised (it has its keys) but it never says hello: the gateway has never seen it online.
    let mut device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid))?;
    let preview = preview(&api, &for_group("late"))?;
    assert_eq!(preview.never_seen.first(), Some(&sn), "{preview:?}");
    let task = create_task(&api, &for_group("late"))?.task.id;
    gw.advance_days(29)?;
    assert_eq!(task_detail(&api, task)?.task.status, "unfinished", "still open on day 29");
    let expired = gw.advance_days(2)?;
    assert_eq!(expired["expired"], 1, "{expired}");
    let t = task_detail(&api, task)?;
    assert_eq!(t.task.counts.expired, 1, "{t:?}");
    assert_eq!(t.executions.first().map(|e| e.state.as_str()), Some("expired"), "{t:?}");
    let records = api.ok(&format!("/v1/records?task={task}"))?;
    assert_eq!(records["records"][0]["result"], "expired");
    // The device shows up after expiry: nothing is delivered.
    let deliveries = gw.metric("rki_deliveries_total");
    rt.block_on(device.send(RawDevice::hello(false)))?;
    let next = rt.block_on(device.next_down(Duration::from_secs(2)));
    assert!(next.is_err(), "expected no delivery after expiry, got {next:?}");
    assert_eq!(gw.metric("rki_deliveries_total"), deliveries);
    Ok(())
}

#[test]
fn a_180_day_task_survives_day_179_and_delivers_then() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions { adjustable_clock: true, ..Default::default() })?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("LONG", 1), "long")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let mut device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid))?;
    let (status, refused) = api.post("/v1/tasks", &json!({"group": "long", "expiry_days": 181}));
    assert_eq!(status, 400, "181 days is over the maximum: {refused}");
    let task = create_task(&api, &TaskRequest { expiry_days: Some(180), ..for_group("long") })?.task.id;
    let expired = gw.advance_days(179)?;
    assert_eq!(expired["expired"], 0);
    rt.block_on(device.send(RawDevice::hello(false)))?;
    let Message::Download(download) = rt.block_on(device.next_down(Duration::from_secs(5)))? else {
        return Err("expected a download".into());
    };
    wait_task(&api, task, Duration::from_secs(5), |c| c.delivered == 1)?;
    let ack = rki_protocol::message::Ack {
        execution_id: download.execution_id,
        result: 0,
        slot: download.slot,
        key_id: download.key_id.clone(),
        kcv: download.kcv.clone(),
        injection: rki_protocol::terminal::InjectionType::Auto,
    };
    rt.block_on(device.send(Message::Ack(ack)))?;
    let done = wait_task_done(&api, task, Duration::from_secs(10))?;
    assert_eq!(done.task.counts.succeeded, 1);
    gw.advance_days(2)?;
    assert_eq!(task_detail(&api, task)?.task.counts.succeeded, 1, "a recorded success never expires");
    Ok(())
}

/// The executions of `task` by SN: (state, delivery_count, delivered_at is set).
fn sends_by_sn(api: &rki_tests::Api, task: i64) -> TestResult<std::collections::HashMap<String, (String, i64, bool)>> {
    let v: TaskDetail = api.ok_as(&format!("/v1/tasks/{task}?limit=100"))?;
    Ok(v.executions.into_iter().map(|e| (e.sn, (e.state, e.delivery_count, e.delivered_at.is_some()))).collect())
}

/// Every send is counted once, whichever way it is written: an ack that comes at once carries
/// its send in its ending, a download left unacked is marked delivered by the delivery writer
/// about a second later, and a graceful stop writes the sends still waiting.
#[test]
fn every_send_is_counted_whether_the_ack_comes_at_once_later_or_not_before_a_stop() -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("SEND", 3), "sends")?;
    let mut devices = Vec::new();
    for (sn, gudid) in &provisioned.gudids {
        let mut device = rt.block_on(RawDevice::initialise(gw.mqtt_port, sn, gudid))?;
        // Online before the task: the task's creation sends each download once.
        rt.block_on(device.send(RawDevice::hello(false)))?;
        devices.push(device);
    }
    // Every hello handled before the task exists, so its creation is the one send.
    gw.wait_online(&provisioned.sns, true)?;
    let task = create_task(&api, &for_group("sends"))?.task.id;
    let mut downloads = Vec::new();
    for device in devices.iter_mut() {
        let Message::Download(download) = rt.block_on(device.next_down(Duration::from_secs(5)))? else {
            return Err("expected a download".into());
        };
        downloads.push(download);
    }
    let sn = |i: usize| provisioned.gudids[i].0.clone();
    // At once: recorded with its one send.
    rt.block_on(devices[0].send(RawDevice::ack(&downloads[0])))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 1)?;
    // Left unacked: written as delivered, once each.
    wait_task(&api, task, Duration::from_secs(5), |c| c.delivered == 2)?;
    let sends = sends_by_sn(&api, task)?;
    assert_eq!(sends[&sn(0)], ("succeeded".to_string(), 1, true), "the fast ack's ending counts its send");
    assert_eq!(sends[&sn(1)], ("delivered".to_string(), 1, true));
    assert_eq!(sends[&sn(2)], ("delivered".to_string(), 1, true));
    // A late ack adds no send.
    rt.block_on(devices[1].send(RawDevice::ack(&downloads[1])))?;
    wait_task(&api, task, Duration::from_secs(5), |c| c.succeeded == 2)?;
    assert_eq!(sends_by_sn(&api, task)?[&sn(1)], ("succeeded".to_string(), 1, true));
    // A second send (the hello re-delivers), then SIGTERM well within the write's delay: the
    // graceful stop writes it.
    rt.block_on(devices[2].send(RawDevice::hello(false)))?;
    let Message::Download(again) = rt.block_on(devices[2].next_down(Duration::from_secs(5)))? else {
        return Err("expected the download again".into());
    };
    assert_eq!(again.execution_id, downloads[2].execution_id);
    let status = gw.terminate()?;
    assert!(status.success(), "graceful stop: {status}");
    gw.start_again()?;
    assert_eq!(
        sends_by_sn(&gw.api(), task)?[&sn(2)],
        ("delivered".to_string(), 2, true),
        "the send made just before the stop is counted"
    );
    Ok(())
}
