//! Counters that survive any clock (issue 20, part 2), on the real binaries with the adjustable
//! clock, which steps both ways and keeps its offset across a restart:
//! - a gateway that ran 20 days ahead, then restarted with its clock set back (stepped back, or
//!   at real time again), still gets its downloads and unlocks accepted by the terminals, and its
//!   record times do not run backwards;
//! - a terminal that refuses a download as a replay says so, and the execution shows it; a
//!   refusal within reach moves the gateway's counter, and the re-delivery, fired by moving the
//!   clock, is accepted.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_gateway::api::types::Execution;
use rki_tests::{
    create_task, for_group, provision, sns, task_detail, wait, wait_task, wait_task_done, Api, GatewayOptions,
    GatewayProcess, TestResult,
};
use serde_json::{json, Value};

const DAY_SECONDS: i64 = 86_400;

fn step_clock(gw: &GatewayProcess, seconds: i64) -> TestResult<Value> {
    let (status, v) = gw.key_owner().post("/v1/admin/clock", &json!({"advance_seconds": seconds}));
    if status != 200 {
        return Err(format!("clock step {seconds} s: {status} {v}").into());
    }
    Ok(v)
}

fn record_times(api: &Api, task: i64) -> TestResult<Vec<i64>> {
    let records = api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default();
    Ok(records.iter().filter_map(|r| r["at"].as_i64()).collect())
}

/// Waits until every one of `sns` satisfies `condition` as the API shows it, 30 s for all.
fn wait_devices(api: &Api, sns: &[String], what: &str, condition: impl Fn(&Value) -> bool) -> TestResult {
    wait::poll(&format!("{} devices to be {what}", sns.len()), Duration::from_secs(30), || {
        for sn in sns {
            let v = api.ok(&format!("/v1/devices/{sn}")).map_err(|e| e.to_string())?;
            if !condition(&v["device"]) {
                return Err(format!("{sn}: {}", v["device"]));
            }
        }
        Ok(())
    })
}

/// How the clock comes back behind the time the terminals last saw.
#[derive(Debug, Clone, Copy)]
enum SetBack {
    /// A step of the adjustable clock to a day behind real time, kept across the restart.
    StepBack,
    /// The adjustable clock's offset file removed: the restarted gateway runs at real time again,
    /// as a gateway that ran under `faketime` and was restarted without it (the case).
    OffsetLost,
}

#[test]
fn a_restart_with_the_clock_stepped_back_keeps_downloads_and_unlocks_accepted() -> TestResult {
    ahead_then_restarted_behind(SetBack::StepBack, "CLKS")
}

#[test]
fn a_restart_at_real_time_after_running_ahead_keeps_downloads_and_unlocks_accepted() -> TestResult {
    ahead_then_restarted_behind(SetBack::OffsetLost, "CLKL")
}

fn ahead_then_restarted_behind(set_back: SetBack, prefix: &str) -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions { adjustable_clock: true, ..Default::default() })?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns(prefix, 4), "clock")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    // 20 days ahead: the terminals accept counters of that time.
    step_clock(&gw, 20 * DAY_SECONDS)?;
    let first = create_task(&api, &for_group("clock"))?.task.id;
    let done = wait_task_done(&api, first, Duration::from_secs(30))?;
    assert_eq!(done.task.counts.succeeded, 4, "{:?}", done.task.counts);
    let first_times = record_times(&api, first)?;
    match set_back {
        SetBack::StepBack => {
            // To a day behind real time; the offset survives the restart.
            let stepped = step_clock(&gw, -21 * DAY_SECONDS)?;
            assert_eq!(stepped["offset_ms"].as_i64(), Some(-DAY_SECONDS * 1000));
        }
        SetBack::OffsetLost => {
            let _ = std::fs::remove_file(gw.dir.join("data").join("adjustable-clock-offset-ms"));
        }
    }
    gw.restart()?;
    rt.block_on(fleet.wait_connected(4, Duration::from_secs(30)))
        .map_err(|e| format!("{e:?}: {}", fleet.snapshot().status_line()))?;
    // Unlocks go out with counters above the ones of 20 days ahead: the terminals accept them and
    // report themselves unlocked.
    for sn in &provisioned.sns {
        api.ok_post(&format!("/v1/devices/{sn}/unlock"), &json!({}))?;
    }
    wait_devices(&api, &provisioned.sns, "unlocked", |d| d["locked"] == false && d["unlock_pending"] == false)?;
    let second = create_task(&api, &for_group("clock"))?.task.id;
    let done = wait_task_done(&api, second, Duration::from_secs(30))?;
    assert_eq!(done.task.counts.succeeded, 4, "{:?}", done.task.counts);
    for d in fleet.devices() {
        let status = d.status();
        assert_eq!(status.rejected.replay, 0, "{}: a frame refused as a replay", d.sn());
        assert_eq!(status.refusals_sent, 0, "{}", d.sn());
        assert_eq!(status.injections, 2, "{}", d.sn());
    }
    // Record times never run backwards, though the clock was set back across the restart.
    let first_last = first_times.iter().copied().max().ok_or("no first records")?;
    let second_times = record_times(&api, second)?;
    assert_eq!(second_times.len(), 4);
    for at in second_times {
        assert!(at >= first_last, "a record at {at} is before the previous task's last record at {first_last}");
    }
    assert_eq!(gw.metric("rki_device_refusals_total{frame=\"download\",code=\"replay\"}"), 0.0);
    rt.block_on(fleet.shutdown());
    Ok(())
}

/// Waits until `n` executions of the task show a refusal; returns the executions.
fn wait_refused(api: &Api, task: i64, n: usize) -> TestResult<Vec<Execution>> {
    wait::poll(&format!("a refusal on {n} executions of task {task}"), Duration::from_secs(20), || {
        let v = task_detail(api, task).map_err(|e| e.to_string())?;
        if v.executions.iter().filter(|e| e.last_refusal.is_some()).count() >= n {
            Ok(v.executions)
        } else {
            Err(format!("{:?}", v.executions))
        }
    })
}

#[test]
fn a_terminal_refusing_a_replayed_download_shows_on_the_execution_and_a_retry_repairs_it() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions { adjustable_clock: true, ..Default::default() })?;
    let api = gw.api();
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    // Two groups of terminals that accepted gateway counters from the future: ten years ahead
    // (beyond what the gateway believes; the delivery stays refused) and one day ahead (within
    // reach: the refusal moves the gateway's counter and the re-delivery is accepted).
    let mut fleets = Vec::new();
    for (group, ahead_days) in [("far", 3650u64), ("near", 1)] {
        let provisioned = provision(&gw, &sns(&format!("REF{}", group.to_uppercase()), 2), group)?;
        let knobs =
            Knobs { accepted_down_counter_at_init: Some(now_us + ahead_days * 86_400 * 1_000_000), ..Knobs::default() };
        let config = common::fleet_config(gw.mqtt_port, &provisioned, knobs)?;
        fleets.push(rt.block_on(common::spawn_fleet(config, Duration::from_secs(30)))?);
    }
    let far = create_task(&api, &for_group("far"))?.task.id;
    let refused = wait_refused(&api, far, 2)?;
    for e in &refused {
        let refusal = e.last_refusal.as_ref().ok_or_else(|| format!("no refusal: {e:?}"))?;
        // Open: `queued` until the send's deferred `Delivered` write (up to a second), then `delivered`.
        assert!(e.state == "queued" || e.state == "delivered", "{e:?}");
        assert_eq!(refusal.code, "replay", "{e:?}");
        assert_eq!(refusal.frame, "download", "{e:?}");
        assert!(refusal.refused_counter < refusal.accepted_counter, "{e:?}");
    }
    assert!(gw.metric("rki_device_refusals_total{frame=\"download\",code=\"replay\"}") >= 2.0);
    for d in fleets[0].devices() {
        assert!(d.status().refusals_sent >= 1, "{}", d.sn());
        assert_eq!(d.status().injections, 0, "{}", d.sn());
    }
    // One day ahead: refused once, then re-delivered above the terminal's counter. The retry
    // (first after 15 s) is fired by moving the clock, not by waiting.
    let near = create_task(&api, &for_group("near"))?.task.id;
    wait_refused(&api, near, 2)?;
    step_clock(&gw, 20)?;
    let done = wait_task_done(&api, near, Duration::from_secs(20))?;
    assert_eq!(done.task.counts.succeeded, 2, "{:?}", done.task.counts);
    for e in &done.executions {
        assert!(e.last_refusal.is_none(), "an ended execution keeps no refusal: {e:?}");
    }
    // The far ones stay refused and visible, delivered and never acked.
    let v = wait_task(&api, far, Duration::from_secs(10), |counts| counts.delivered == 2)?;
    for e in &v.executions {
        assert_eq!(e.last_refusal.as_ref().map(|r| r.code.as_str()), Some("replay"), "{e:?}");
    }
    for fleet in fleets {
        rt.block_on(fleet.shutdown());
    }
    Ok(())
}
