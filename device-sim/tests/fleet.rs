//! Fleets: hundreds of terminals in one process against a real broker.

mod common;

use std::time::Duration;

use common::TestNet;
use rki_device_sim::{FailingShare, Fleet, FleetConfig, FleetMember, SnPattern};
use rki_protocol::terminal::TerminalError;

/// A fleet of this size must initialise, connect and take a key each within the timeout.
const FLEET_SIZE: usize = 500;
const FLEET_TIMEOUT: Duration = Duration::from_secs(120);

fn members(net: &TestNet, pattern: &str, count: usize) -> Vec<FleetMember> {
    let pattern = SnPattern::parse(pattern).expect("pattern");
    pattern
        .generate(1, count)
        .into_iter()
        .map(|sn| FleetMember { gudid: Some(net.gateway.provision(&sn)), profile: TestNet::profile(&sn) })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_500_terminals_initialises_connects_and_installs_one_key_each() {
    let net = TestNet::start_for(FLEET_SIZE).await;
    net.gateway.set_auto_push(true);
    let config =
        FleetConfig::new(members(&net, "SIM{:06}", FLEET_SIZE), rki_device_sim::Brokers::one(net.broker.addr.clone()));
    let fleet = Fleet::spawn(config).await.expect("fleet");
    assert_eq!(fleet.len(), FLEET_SIZE);

    let n = FLEET_SIZE as u64;
    let done = fleet.wait_until(|s| s.keys_installed >= n && s.acks_confirmed >= n, FLEET_TIMEOUT).await;
    let troubled: Vec<String> = fleet
        .devices()
        .iter()
        .map(|d| (d.sn().to_string(), d.status()))
        .filter(|(_, s)| s.injections == 0)
        .map(|(sn, s)| format!("{sn}: {s:?}"))
        .collect();
    let done = done.unwrap_or_else(|e| panic!("{e}\n{}", troubled.join("\n")));
    assert!(troubled.is_empty(), "{}", troubled.join("\n"));
    assert_eq!((done.initialised, done.connected, done.keys_installed), (n, n, n));
    // A connection storm on one broker thread may time some connections out (counted as
    // errors); every terminal retries with a backoff and gets there.
    assert_eq!((done.failure_acks, done.rejected_frames), (0, 0));

    let pushed = net.gateway.pushed();
    assert_eq!(pushed.len(), FLEET_SIZE);
    for (sn, (execution_id, kcv)) in pushed {
        // The broker confirmed every ack to the terminals; the gateway may still be reading them.
        net.gateway.wait_ack(&sn, execution_id, 1).await;
        let acks = net.gateway.acks_for(&sn, execution_id);
        assert!(acks.iter().all(|a| a.result == 0 && a.kcv == kcv), "{sn}: {acks:?}");
        net.gateway.assert_clean_up_channel(&sn);
        assert!(fleet.device(&sn).expect("device").status().locked);
    }
    fleet.shutdown().await;
    let after = fleet.snapshot();
    assert_eq!((after.connected, after.initialised), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_share_of_a_fleet_acks_with_its_code_and_the_rest_install() {
    let net = TestNet::start_for(50).await;
    net.gateway.set_auto_push(true);
    let mut config =
        FleetConfig::new(members(&net, "FAIL{:03}", 50), rki_device_sim::Brokers::one(net.broker.addr.clone()));
    config.failing = Some(FailingShare::new(0.1, TerminalError::DebugKeyPresent).expect("share"));
    let fleet = Fleet::spawn(config).await.expect("fleet");
    let done = fleet
        .wait_until(|s| s.keys_installed + s.failure_acks >= 50 && s.acks_confirmed >= 50, FLEET_TIMEOUT)
        .await
        .expect("every terminal answered");
    assert_eq!((done.keys_installed, done.failure_acks), (45, 5));
    let debug: Vec<_> = fleet.devices().iter().filter(|d| d.status().debug_mode).collect();
    assert_eq!(debug.len(), 5);
    for device in debug {
        let (execution_id, _) = net.gateway.pushed()[device.sn()].clone();
        let ack = net.gateway.wait_ack(device.sn(), execution_id, 1).await;
        assert_eq!(ack.result, -3000);
    }
}
