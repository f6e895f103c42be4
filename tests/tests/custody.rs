//! GUDID custody (issue 22): a copy of the store alone initialises nothing; GUDIDs are provisioned
//! all or nothing, audited, one live per SN, listed and revoked; a revoked GUDID opens nothing;
//! the master key file must be private.

mod common;

use std::process::Command;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::{Ephemeral, Gudid, BOOTSTRAP_PASSWORD_LABEL};
use rki_protocol::message::{Body, CreateKey, Message, RefusalCode};
use rki_protocol::SecretBytes;
use rki_tests::{
    binary, bootstrap_password, mqtt_connect, provision, sns, Api, GatewayOptions, GatewayProcess, RawBootstrap,
    RawDevice, TestResult,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn status_of(api: &Api, sn: &str) -> TestResult<Vec<String>> {
    let v = api.ok(&format!("/v1/gudids?sn={sn}"))?;
    Ok(v["gudids"]
        .as_array()
        .map(|a| a.iter().map(|g| g["status"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default())
}

/// Every value of every table of an SQLite file, as bytes (blobs as they are, text as UTF-8).
fn every_value(db: &rusqlite::Connection) -> TestResult<Vec<Vec<u8>>> {
    let tables: Vec<String> = {
        let mut s = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
        let rows = s.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for table in tables {
        let mut s = db.prepare(&format!("SELECT * FROM \"{table}\""))?;
        let columns = s.column_count();
        let mut rows = s.query([])?;
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Blob(b) => out.push(b.to_vec()),
                    rusqlite::types::ValueRef::Text(t) => out.push(t.to_vec()),
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

/// A CreateKey for `sn` naming `gudid_id`, tagged under `key`.
fn create_key(sn: &str, gudid_id: [u8; 32], key: &MacKey, counter: u64) -> TestResult<Vec<u8>> {
    let body = Body {
        party: sn.to_string(),
        counter,
        message: Message::CreateKey(CreateKey {
            gudid_id,
            x_pos_device_id: format!("THIEF-{sn}"),
            device_public: Ephemeral::random()?.public(),
        }),
    };
    Ok(frame::seal(key, &body)?)
}

/// A thief holds a backup of the store (taken with `rki-gateway backup`, the documented way) but
/// neither the master key nor the GUDID. Everything in the copy that could be the GUDID's MAC key
/// or its bootstrap password is tried: the `CreateKey` tag and the bootstrap CONNECT are refused,
/// the GUDID stays unused, and then the genuine terminal with the GUDID initialises.
#[test]
fn a_backup_of_the_store_without_the_gudid_initialises_nothing_and_the_genuine_terminal_does() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("CUST", 1), "custody")?;
    let (sn, gudid_text) = provisioned.gudids[0].clone();
    let gudid = Gudid::parse(&gudid_text)?;

    let copy = gw.dir.join("stolen.sqlite");
    let out = gw.offline(&["backup", copy.to_str().ok_or("path")?])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stolen = rusqlite::Connection::open(&copy)?;

    // What the copy holds of this GUDID.
    let (gudid_id, clear_mac_key, sealed_mac_key, bootstrap_hash): (Vec<u8>, Vec<u8>, Option<String>, String) = stolen
        .query_row(
            "SELECT g.gudid_id, g.mac_key, g.sealed_mac_key, g.bootstrap_hash
             FROM gudids g JOIN devices d ON d.id = g.device_id WHERE d.sn = ?1",
            [&sn],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
    let gudid_id: [u8; 32] = gudid_id.try_into().map_err(|_| "gudid_id is not 32 bytes")?;
    assert_eq!(gudid_id, gudid.id(), "the copy names the GUDID (a hash; it opens nothing)");
    assert!(clear_mac_key.is_empty(), "the clear MAC key column holds {} bytes", clear_mac_key.len());
    assert!(sealed_mac_key.as_deref().is_some_and(|s| s.starts_with('D')), "not sealed as a TR-31 D block");

    // Nowhere in the copy's bytes: the GUDID, its MAC key, its bootstrap password.
    let bytes = std::fs::read(&copy)?;
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let secret_gudid = hex::decode(gudid_text.replace('-', ""))?;
    let real_mac_key = gudid.mac_key();
    let real_password = bootstrap_password(&gudid, &sn);
    assert!(!contains(&secret_gudid), "the GUDID is in the copy");
    assert!(!contains(real_mac_key.expose_secret()), "the GUDID's MAC key is in the copy");
    assert!(!contains(hex::encode_upper(real_mac_key.expose_secret()).as_bytes()), "its hex is in the copy");
    assert!(!contains(real_password.as_bytes()), "the bootstrap password is in the copy");

    // The thief's candidate MAC keys: every 32-byte value of the copy (the clear column as an
    // older gateway filled it among them), hashes of the GUDID's row, and 16-byte values taken
    // for the GUDID itself.
    let values = every_value(&stolen)?;
    let mut keys: Vec<Vec<u8>> = values.iter().filter(|v| v.len() == 32).cloned().collect();
    // Hex text of 32 bytes, as a key written in text would be.
    keys.extend(values.iter().filter(|v| v.len() == 64).filter_map(|v| hex::decode(v).ok()));
    let sealed = sealed_mac_key.unwrap_or_default();
    keys.push(Sha256::digest(sealed.as_bytes()).to_vec());
    keys.push(Sha256::digest(bootstrap_hash.as_bytes()).to_vec());
    keys.push(Sha256::digest([&b"rki/v1 gudid mac"[..], &gudid_id].concat()).to_vec());
    for short in values.iter().filter(|v| v.len() == 16) {
        keys.push(Sha256::digest([&b"rki/v1 gudid mac"[..], short].concat()).to_vec());
    }
    if !clear_mac_key.is_empty() {
        keys.insert(0, clear_mac_key.clone());
    }
    keys.sort();
    keys.dedup();
    assert!(!keys.is_empty());
    assert!(!keys.iter().any(|k| k == real_mac_key.expose_secret()), "a candidate from the copy is the MAC key");

    // The bootstrap identity: the hash, and an HMAC of each candidate as the GUDID, are refused.
    let mut passwords = vec![bootstrap_hash.clone(), sealed.clone()];
    for k in values.iter().filter(|v| v.len() == 16 || v.len() == 32) {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(k).map_err(|e| e.to_string())?;
        mac.update(BOOTSTRAP_PASSWORD_LABEL);
        mac.update(sn.as_bytes());
        passwords.push(hex::encode_upper(mac.finalize().into_bytes()));
    }
    passwords.truncate(24);
    let bootstrap_id = format!("init@{sn}");
    for password in &passwords {
        assert!(
            rt.block_on(mqtt_connect(gw.mqtt_port, &bootstrap_id, password, true)).is_err(),
            "a password from the copy opened the bootstrap identity"
        );
    }

    // Past the CONNECT all the same (an external broker with a lax ACL, say): every CreateKey
    // tagged with a candidate is refused, and none is answered.
    let mut boot = rt.block_on(RawBootstrap::connect(gw.mqtt_port, &sn, &gudid))?;
    let mut counter = 1_000;
    for key in &keys {
        let key = MacKey::new(SecretBytes::from_slice(key))?;
        counter += 1;
        rt.block_on(boot.send(create_key(&sn, gudid_id, &key, counter)?))?;
        match rt.block_on(boot.next(Duration::from_secs(5)))? {
            Message::Refusal(r) => assert_eq!(r.code, RefusalCode::BadTag),
            other => return Err(format!("a key from the store copy initialised the terminal: {other:?}").into()),
        }
    }
    let _ = rt.block_on(boot.client.disconnect());
    assert_eq!(status_of(&api, &sn)?, ["unused"], "the GUDID was spent by the thief");
    assert!(gw.metric("rki_gudid_refusals_total{reason=\"bad_tag\"}") >= keys.len() as f64);

    // The genuine terminal, with the GUDID, initialises and then connects as itself.
    let device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid_text))?;
    assert_eq!(status_of(&api, &sn)?, ["used"]);
    assert_eq!(api.ok(&format!("/v1/devices/{sn}"))?["device"]["initialised"], true);
    let _ = rt.block_on(device.client.disconnect());
    Ok(())
}

fn entries(api: &Api, action: &str) -> TestResult<Vec<Value>> {
    let v = api.ok("/v1/audit?limit=1000")?;
    Ok(v["audit"].as_array().cloned().unwrap_or_default().into_iter().filter(|e| e["action"] == action).collect())
}

fn live(api: &Api) -> TestResult<Vec<(String, i64)>> {
    let v = api.ok("/v1/gudids?live=true")?;
    let mut out: Vec<(String, i64)> = v["gudids"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|g| (g["sn"].as_str().unwrap_or_default().to_string(), g["id"].as_i64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    Ok(out)
}

/// `POST /v1/gudids` stores nothing when one SN is unknown, audits each GUDID, keeps one live
/// GUDID per SN (the replaced one revoked, audited, refused at CONNECT and at CreateKey); an
/// operator lists the live ones and revokes one, through the API and `rkictl`.
#[test]
fn gudids_are_provisioned_all_or_nothing_audited_one_live_per_sn_listed_and_revoked() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let devices = sns("LIVE", 3);
    let provisioned = provision(&gw, &devices, "live")?;
    let provisioned_entries = entries(&api, "gudid.provision")?;
    assert_eq!(provisioned_entries.len(), 3, "one audit entry per GUDID: {provisioned_entries:?}");
    for sn in &devices {
        let entry = provisioned_entries.iter().find(|e| e["object"] == format!("device:{sn}")).ok_or("no entry")?;
        assert!(entry["details"]["gudid"].as_i64().is_some() && !entry["actor"].as_str().unwrap_or("").is_empty());
    }
    let before = api.ok("/v1/gudids")?["gudids"].as_array().map(Vec::len);

    // All or nothing: two known SNs and an unknown one provision nothing and audit nothing.
    let (status, v) = api.post("/v1/gudids", &json!({"sns": [devices[0], devices[1], "NOPE0001"]}));
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["unknown"], json!(["NOPE0001"]), "{v}");
    assert_eq!(api.ok("/v1/gudids")?["gudids"].as_array().map(Vec::len), before, "a GUDID was stored");
    assert_eq!(entries(&api, "gudid.provision")?.len(), 3, "a refused provisioning was audited");
    // Bounds: a repeated SN, no SN, more than 1000.
    let (status, v) = api.post("/v1/gudids", &json!({"sns": [devices[0], devices[0]]}));
    assert_eq!((status, v["code"].as_str()), (400, Some("duplicate_sn")), "{v}");
    let many: Vec<String> = (0..1001).map(|i| format!("MANY{i:05}")).collect();
    let (status, v) = api.post("/v1/gudids", &json!({ "sns": many }));
    assert_eq!((status, v["code"].as_str()), (400, Some("bad_target")), "{v}");
    assert_eq!(api.ok("/v1/gudids")?["gudids"].as_array().map(Vec::len), before);

    // One live GUDID per SN: a new one revokes the old, audited.
    let old_live = live(&api)?;
    assert_eq!(old_live.len(), 3);
    let old_id = old_live.iter().find(|(sn, _)| sn == &devices[0]).map(|(_, id)| *id).ok_or("no live GUDID")?;
    let answer = api.ok_post("/v1/gudids", &json!({"sn": devices[0]}))?;
    let fresh = &answer["gudids"][0];
    assert_eq!(fresh["revoked"], json!([old_id]), "{answer}");
    let new_id = fresh["id"].as_i64().ok_or("no id")?;
    let now_live = live(&api)?;
    assert_eq!(now_live.len(), 3, "{now_live:?}");
    assert!(now_live.contains(&(devices[0].clone(), new_id)) && !now_live.iter().any(|(_, id)| *id == old_id));
    let revocations = entries(&api, "gudid.revoke")?;
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    assert_eq!(revocations[0]["object"], format!("device:{}", devices[0]));
    assert_eq!(revocations[0]["details"], json!({"gudid": old_id, "reason": "replaced", "replaced_by": new_id}));
    // The replaced GUDID opens no bootstrap identity and initialises nothing.
    let old_gudid = Gudid::parse(&provisioned.gudids[0].1)?;
    let new_gudid = Gudid::parse(fresh["gudid"].as_str().ok_or("no gudid")?)?;
    let refused = rt.block_on(RawBootstrap::connect(gw.mqtt_port, &devices[0], &old_gudid));
    assert!(refused.is_err(), "the replaced GUDID opened init@SN");
    let mut boot = rt.block_on(RawBootstrap::connect(gw.mqtt_port, &devices[0], &new_gudid))?;
    rt.block_on(boot.send(RawBootstrap::create_key(&devices[0], &old_gudid)?))?;
    match rt.block_on(boot.next(Duration::from_secs(5)))? {
        Message::Refusal(r) => assert_eq!(r.code, RefusalCode::GudidExpired, "a revoked GUDID is no longer valid"),
        other => return Err(format!("the replaced GUDID initialised: {other:?}").into()),
    }
    let _ = rt.block_on(boot.client.disconnect());
    assert!(gw.metric("rki_gudid_refusals_total{reason=\"gudid_revoked\"}") >= 1.0);

    // An operator revokes a live GUDID with rkictl: listed live before, not after; audited; its
    // bootstrap identity closed. Another organization cannot touch it; a second revoke is 409.
    let target = now_live.iter().find(|(sn, _)| sn == &devices[1]).map(|(_, id)| *id).ok_or("no live GUDID")?;
    let rkictl = |args: &[&str]| -> TestResult<String> {
        let out = Command::new(binary("rkictl"))
            .env("RKI_URL", gw.url())
            .env("RKI_TOKEN", &gw.org_token)
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(format!("rkictl {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8(out.stdout)?)
    };
    let listed = rkictl(&["gudids", "list", "--live"])?;
    assert!(listed.contains(&devices[1]) && listed.contains(&target.to_string()), "{listed}");
    let rival = Api::new(&gw.url(), &gw.init_org("rival")?);
    assert_eq!(rival.post(&format!("/v1/gudids/{target}/revoke"), &json!({})).0, 404);
    let said = rkictl(&["gudids", "revoke", &target.to_string()])?;
    assert!(said.contains("revoked"), "{said}");
    let (status, v) = api.post(&format!("/v1/gudids/{target}/revoke"), &json!({}));
    assert_eq!(status, 409, "{v}");
    assert!(!rkictl(&["gudids", "list", "--live"])?.contains(&devices[1]), "still listed as live");
    assert_eq!(status_of(&api, &devices[1])?, ["revoked"]);
    let revoked = Gudid::parse(&provisioned.gudids[1].1)?;
    assert!(rt.block_on(RawBootstrap::connect(gw.mqtt_port, &devices[1], &revoked)).is_err(), "opened init@SN");
    let revocations = entries(&api, "gudid.revoke")?;
    assert_eq!(revocations.len(), 2);
    assert_eq!(revocations[0]["details"], json!({"gudid": target, "reason": "revoked"}), "{revocations:?}");
    assert_eq!(revocations[0]["object"], format!("device:{}", devices[1]));
    assert_eq!(live(&api)?.len(), 2);

    // The new GUDID of the first SN initialises its terminal.
    let device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &devices[0], &new_gudid.expose_text()))?;
    let _ = rt.block_on(device.client.disconnect());
    assert_eq!(live(&api)?.len(), 1);
    Ok(())
}

/// A master key file readable by its group or by others is refused at start, with a message that
/// says what to do; chmod 600 and it starts.
#[test]
fn a_master_key_file_readable_by_group_or_others_is_refused_at_start() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = GatewayProcess::start(GatewayOptions::default())?;
    gw.terminate()?;
    let key_file = gw.dir.join("data.master.key");
    assert_eq!(std::fs::metadata(&key_file)?.permissions().mode() & 0o777, 0o600, "generated 0600");
    for mode in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(mode))?;
        assert!(gw.start_again().is_err(), "started with the master key file at mode {mode:o}");
        let log = gw.log_tail();
        assert!(
            log.contains(&format!("permissions {mode:o} are too open; run chmod 600 on it")),
            "mode {mode:o}: {log}"
        );
    }
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    gw.start_again()?;
    assert!(gw.api().ok("/v1/gudids").is_ok());
    Ok(())
}
