//! rumqttd drops messages for a subscriber that falls behind its filter's in-memory log
//! (`CursorJump`). With the gateway's own log made tiny, a burst of acks overruns it: the lost acks
//! leave executions delivered, the retry timer re-delivers, the terminals answer the duplicates with
//! the same ack, and every device still ends with exactly one injection and one record.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_tests::{create_task, provision, sns, wait_task_done, GatewayOptions, GatewayProcess, TestResult};
use serde_json::json;

#[test]
fn acks_lost_by_an_overrun_broker_log_are_recovered_by_retries_without_a_second_injection() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions {
        env: vec![("RKI_BROKER_SEGMENT_BYTES".into(), "1024".into()), ("RKI_RETRY_INITIAL_SECONDS".into(), "1".into())],
        ..Default::default()
    })?;
    let api = gw.api();
    let n = 600;
    let provisioned = provision(&gw, &sns("LOSSY", n), "lossy")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(120),
    ))?;
    let task = create_task(&api, &json!({"group": "lossy"}))?;
    let done = wait_task_done(&api, task, Duration::from_secs(120))?;
    assert_eq!(done["task"]["counts"]["succeeded"], n, "{}", done["task"]["counts"]);
    let deliveries = gw.metric("rki_deliveries_total");
    let duplicates = gw.metric("rki_duplicate_acks_total");
    let jumps = gw.metric("rki_broker_alerts_total{kind=\"cursor_jump\"}");
    eprintln!("{n} devices: {deliveries} deliveries, {duplicates} duplicate acks, {jumps} cursor jumps");
    assert!(jumps > 0.0, "the broker reported no cursor jump: the test proved nothing");
    assert!(
        deliveries > n as f64,
        "nothing was lost, so nothing was retried: the test proved nothing ({deliveries} deliveries)"
    );
    for device in fleet.devices() {
        assert_eq!(device.status().injections, 1, "{} injected {} times", device.sn(), device.status().injections);
    }
    let records = api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().map(Vec::len);
    assert_eq!(records, Some(n));
    rt.block_on(fleet.shutdown());
    Ok(())
}
