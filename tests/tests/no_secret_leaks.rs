//! After a whole run (a BDK entered as components, a KEK entered at its ceremony and a BDK
//! imported under it, GUDIDs provisioned, terminals initialised, a push acknowledged), no secret is
//! found in the gateway's log (at debug level), its `/metrics`, its API answers or its store
//! files: each secret is searched for as its exact bytes and as upper- and lower-case hex.

mod common;

use std::process::Command;
use std::time::Duration;

use rki_protocol::dukpt::tdes::{derive_ipek, Ksn};
use rki_protocol::init::Gudid;
use rki_protocol::message::Message;
use rki_protocol::{KcvLen, SymmetricKey};
use rki_tests::{
    binary, create_task, for_group, provision, sns, wait_task_done, GatewayOptions, GatewayProcess, RawDevice,
    TestResult, COMPONENT_2, TEST_BDK,
};
use serde_json::json;

const KEK_COMPONENT_1: &str = "0123456789ABCDEFFEDCBA9876543210";
const KEK_COMPONENT_2: &str = "1F1E1D1C1B1A19180706050403020100";
/// The second BDK, which arrives as a TR-31 block under the KEK.
const IMPORTED_BDK: &str = "A1B2C3D4E5F60718293A4B5C6D7E8F90";

fn xor_hex(a: &str, b: &str) -> TestResult<String> {
    let (a, b) = (hex::decode(a)?, hex::decode(b)?);
    Ok(hex::encode_upper(a.iter().zip(&b).map(|(x, y)| x ^ y).collect::<Vec<u8>>()))
}

/// Every form a secret could be written in: its bytes, and its hex in both cases.
fn forms(name: &str, bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{name} (bytes)"), bytes.to_vec()),
        (format!("{name} (HEX)"), hex::encode_upper(bytes).into_bytes()),
        (format!("{name} (hex)"), hex::encode(bytes).into_bytes()),
    ]
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() >= 8 && haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_secret_reaches_the_log_the_metrics_the_api_or_the_store() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions { log_filter: Some("debug".into()), ..Default::default() })?;
    let api = gw.api();
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let component_1 = xor_hex(TEST_BDK, COMPONENT_2)?;
    for (name, key) in [("BDK", TEST_BDK), ("BDK component 1", &component_1), ("BDK component 2", COMPONENT_2)] {
        secrets.extend(forms(name, &hex::decode(key)?));
    }

    // BDK by components (inside provision), GUDIDs, terminals initialised.
    let provisioned = provision(&gw, &sns("LEAK", 2), "leak")?;
    let mut devices = Vec::new();
    for (sn, gudid) in &provisioned.gudids {
        secrets.push((format!("GUDID of {sn}"), gudid.as_bytes().to_vec()));
        let parsed = Gudid::parse(gudid)?;
        secrets.extend(forms(&format!("GUDID MAC key of {sn}"), parsed.mac_key().expose_secret()));
        secrets.push((format!("bootstrap password of {sn}"), parsed.bootstrap_password(sn).expose_secret().to_vec()));
        let device = rt.block_on(RawDevice::initialise(gw.mqtt_port, sn, gudid))?;
        let s = &device.secrets;
        secrets.extend(forms(&format!("signing key of {sn}"), s.signing_key.expose_secret()));
        secrets.extend(forms(&format!("AES KBPK of {sn}"), s.kbpk_aes.expose_secret()));
        secrets.extend(forms(&format!("TDES KBPK of {sn}"), s.kbpk_tdes.expose_secret()));
        secrets.push((format!("MQTT password of {sn}"), s.mqtt_password.expose_secret().to_vec()));
        devices.push(device);
    }

    // The KEK ceremony, then a BDK as a TR-31 block under the KEK.
    let kek = xor_hex(KEK_COMPONENT_1, KEK_COMPONENT_2)?;
    for (name, key) in
        [("KEK", kek.as_str()), ("KEK component 1", KEK_COMPONENT_1), ("KEK component 2", KEK_COMPONENT_2)]
    {
        secrets.extend(forms(name, &hex::decode(key)?));
    }
    secrets.extend(forms("imported BDK", &hex::decode(IMPORTED_BDK)?));
    let components: Vec<_> = [KEK_COMPONENT_1, KEK_COMPONENT_2]
        .iter()
        .map(|c| Ok(json!({"key": c, "kcv": SymmetricKey::tdes_from_hex(c)?.kcv(KcvLen::Three).to_hex()})))
        .collect::<TestResult<_>>()?;
    gw.key_owner()
        .ok_post("/v1/orgs/acme/keks", &json!({"name": "zmk", "algorithm": "tdes", "components": components}))?;
    let out = Command::new(binary("rkictl"))
        .env("RKICTL_KBPK", &kek)
        .env("RKICTL_KEY", IMPORTED_BDK)
        .args(["--json", "key", "tr31-wrap", "--header", "B0000B0TX00N0000"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let block: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let out = Command::new(binary("rkictl"))
        .env("RKI_URL", gw.url())
        .env("RKI_TOKEN", &gw.key_owner_token)
        .args(["key-sources", "import", "--org", "acme", "--name", "bdk-imported", "--algorithm", "tdes"])
        .args(["--kek", "zmk", "--key-block", block["key_block"].as_str().ok_or("no key block")?])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A push: each terminal acknowledges its key; its IPEK is a secret too.
    let bdk = SymmetricKey::tdes_from_hex(TEST_BDK)?;
    for device in &mut devices {
        rt.block_on(device.send(RawDevice::hello(false)))?;
        gw.wait_online(&[&device.sn], true)?;
    }
    let task = create_task(&api, &for_group("leak"))?.task.id;
    for device in &mut devices {
        let Message::Download(d) = rt.block_on(device.next_down(Duration::from_secs(20)))? else {
            return Err("the first downlink is not a Download".into());
        };
        let ipek = derive_ipek(&bdk, &Ksn::from_hex(&hex::encode_upper(&d.key_id))?)?;
        secrets.extend(forms(&format!("IPEK of {}", device.sn), ipek.expose_secret()));
        rt.block_on(device.send(RawDevice::ack(&d)))?;
    }
    let done = wait_task_done(&api, task, Duration::from_secs(30))?;
    assert_eq!(done.task.counts.succeeded, 2, "{:?}", done.task);
    secrets.push(("organization token".into(), gw.org_token.as_bytes().to_vec()));
    secrets.push(("key owner token".into(), gw.key_owner_token.as_bytes().to_vec()));

    // Everything an outsider or an operator can read.
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for path in [
        "/v1/whoami",
        "/v1/devices",
        "/v1/groups",
        "/v1/key-sources",
        "/v1/tasks",
        &format!("/v1/tasks/{task}"),
        "/v1/records",
        "/v1/records?format=csv",
        "/v1/billing",
        "/v1/gudids",
        "/v1/audit",
        "/metrics",
    ] {
        let (status, v) = api.get(path);
        places.push((format!("GET {path} ({status})"), v.to_string().into_bytes()));
    }
    for path in ["/v1/keks", "/v1/key-sources", "/v1/audit", "/v1/orgs"] {
        let (status, v) = gw.key_owner().get(path);
        places.push((format!("GET {path} as the key owner ({status})"), v.to_string().into_bytes()));
    }
    let metrics = ureq::get(&format!("{}/metrics", gw.url())).call()?.into_string()?;
    places.push(("/metrics".into(), metrics.into_bytes()));
    for device in devices {
        rt.block_on(device.client.disconnect()).ok();
    }
    // The log, with everything the run wrote (a graceful stop flushes the store too).
    let mut gw = gw;
    gw.terminate()?;
    places.push(("the gateway's log".into(), std::fs::read(gw.log_path())?));
    for entry in std::fs::read_dir(gw.data_dir())? {
        let path = entry?.path();
        if path.is_file() {
            places.push((format!("store file {}", path.display()), std::fs::read(&path)?));
        }
    }
    assert!(places.iter().any(|(name, _)| name.contains("rki.sqlite")), "the store was searched");

    let mut found = Vec::new();
    for (place, haystack) in &places {
        for (secret, needle) in &secrets {
            if find(haystack, needle) {
                found.push(format!("{secret} in {place}"));
            }
        }
    }
    assert!(found.is_empty(), "secrets found:\n{}", found.join("\n"));
    assert!(secrets.len() > 50, "the search covered {} forms of secrets", secrets.len());
    Ok(())
}
