//! Shared pieces of the end-to-end tests.
#![allow(dead_code)]

use std::time::Duration;

use rki_device_sim::{BrokerAddr, Brokers, DeviceProfile, Fleet, FleetConfig, FleetMember, Knobs};
use rki_protocol::terminal::Model;
use rki_tests::{Provisioned, TestResult};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A fleet of P3 terminals at minimum firmware, one per provisioned SN, each initialising with its
/// GUDID at power-on.
pub fn fleet_config(port: u16, provisioned: &Provisioned, knobs: Knobs) -> TestResult<FleetConfig> {
    let members = provisioned
        .gudids
        .iter()
        .map(|(sn, gudid)| Ok(FleetMember { profile: DeviceProfile::new(sn, Model::P3)?, gudid: Some(gudid.clone()) }))
        .collect::<TestResult<Vec<_>>>()?;
    let mut config = FleetConfig::new(members, Brokers::one(BrokerAddr::new("127.0.0.1", port)));
    config.knobs = knobs;
    // Terminals are switched on over a few seconds, as a warehouse does, not in one instant: the
    // embedded broker accepts connections on one thread (see docs/benchmarks/HISTORY.md).
    config.spawn_interval = Duration::from_micros(1500);
    Ok(config)
}

pub async fn spawn_fleet(config: FleetConfig, initialised_timeout: Duration) -> TestResult<Fleet> {
    let n = config.members.len() as u64;
    let fleet = Fleet::spawn(config).await?;
    if let Err(e) = fleet.wait_initialised(n, initialised_timeout).await {
        let errors: Vec<String> = fleet
            .devices()
            .iter()
            .filter(|d| !d.status().initialised)
            .filter_map(|d| d.status().last_error.map(|e| format!("{}: {e}", d.sn())))
            .take(5)
            .collect();
        return Err(format!("{e:?}: {}; first errors: {errors:?}", fleet.snapshot().status_line()).into());
    }
    fleet
        .wait_connected(n, initialised_timeout)
        .await
        .map_err(|e| format!("{e:?}: {}", fleet.snapshot().status_line()))?;
    Ok(fleet)
}
