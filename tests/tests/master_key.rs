//! The master key: a wrong one is refused at start; rotation re-seals everything; SIGTERM is graceful.

mod common;

use std::time::Duration;

use rki_device_sim::Knobs;
use rki_protocol::tr31::{self, Header};
use rki_protocol::{KcvLen, SecretBytes, SymmetricKey};
use rki_tests::{
    create_task, for_group, provision, sns, wait_task_done, GatewayOptions, GatewayProcess, TestResult, TEST_BDK,
};
use serde_json::json;

/// A two-key TDES KEK, entered as itself and an all-zero component.
const KEK: &str = "98BADCFE10325476F1E2D3C4B5A69788";

#[test]
fn rotating_the_master_key_keeps_every_key_usable_and_a_wrong_key_is_refused_at_start() -> TestResult {
    let rt = common::runtime();
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("ROT", 3), "rot")?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(30),
    ))?;
    // A KEK, entered before the rotation.
    let zero = "0".repeat(32);
    let kcv = |hex: &str| SymmetricKey::tdes_from_hex(hex).map(|k| k.kcv(KcvLen::Three).to_hex());
    let components = json!([{"key": KEK, "kcv": kcv(KEK)?}, {"key": zero, "kcv": kcv(&zero)?}]);
    gw.key_owner()
        .ok_post("/v1/orgs/acme/keks", &json!({"name": "zmk", "algorithm": "tdes", "components": components}))?;
    let status = gw.terminate()?;
    assert!(status.success(), "SIGTERM should stop the gateway cleanly: {status}");

    let key_file = gw.dir.join("data.master.key");
    let before = std::fs::read_to_string(&key_file)?;
    let out = gw.offline(&["rotate-master-key"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = std::fs::read_to_string(&key_file)?;
    assert_ne!(before, after);
    assert_eq!(std::fs::read_to_string(gw.dir.join("data.master.key.old"))?, before);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("re-sealed 14 keys"), "1 BDK + 1 KEK + 3 GUDIDs + 3 devices x 3 keys: {stdout}");
    assert!(!stdout.contains(after.trim()) && !stdout.contains(before.trim()), "a master key was printed");

    // The old key no longer opens this store: the gateway refuses to start with it.
    std::fs::rename(&key_file, gw.dir.join("new.key"))?;
    std::fs::copy(gw.dir.join("data.master.key.old"), &key_file)?;
    let refused = gw.start_again();
    assert!(refused.is_err(), "started with the old master key");
    assert!(gw.log_tail().contains("not the one this store was sealed under"), "{}", gw.log_tail());
    std::fs::rename(gw.dir.join("new.key"), &key_file)?;

    // With the new key: the devices' signing keys and the BDK still work end to end.
    gw.start_again()?;
    let task = create_task(&api, &for_group("rot"))?.task.id;
    let done = wait_task_done(&api, task, Duration::from_secs(60))?;
    assert_eq!(done.task.counts.succeeded, 3);
    // The KEK, re-sealed, still unwraps a BDK block.
    let kek = SymmetricKey::tdes_from_hex(KEK)?;
    let header = Header::parse("B0000B0TX00N0000")?;
    let block = tr31::wrap(&kek, &header, &SecretBytes::from_hex(TEST_BDK)?, &mut |b: &mut [u8]| b.fill(0))?;
    let body = json!({"name": "bdk-after", "algorithm": "tdes", "kek": "zmk", "key_block": block});
    let v = gw.key_owner().ok_post("/v1/orgs/acme/key-sources", &body)?;
    assert_eq!(v["key_source"]["kcv"].as_str(), Some(kcv(TEST_BDK)?.as_str()), "{v}");
    rt.block_on(fleet.shutdown());
    Ok(())
}
