//! Key-encryption keys and TR-31 import, end to end, on the real binaries: the key owner enters a
//! KEK once as components (`rkictl keks create`), then BDKs arrive as TR-31 key blocks under it
//! (`rkictl key-sources import`), wrapped by our own `rkictl key tr31-wrap` and by psec, an
//! independent TR-31 implementation in Python. A push with the imported key sources gives every
//! terminal the IPEK derived from the known BDK; bad blocks are refused and change nothing.
//!
//! Needs `python3` with `psec` (`pip install psec`, as `.ci/run` does): without it the test fails
//! and says so.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rki_device_sim::Knobs;
use rki_protocol::{KcvLen, SymmetricKey};
use rki_tests::{
    binary, create_task, expected_kcv, for_sns, provision, sns, temp_dir, wait_task_done, GatewayOptions,
    GatewayProcess, TestResult, TEST_BDK,
};
use serde_json::{json, Value};

/// The KEK's two components, as two custodians hold them; the KEK is their XOR.
const KEK_COMPONENT_1: &str = "89ABCDEF0123456776543210FEDCBA98";
const KEK_COMPONENT_2: &str = "11111111111111112222222222222222";
/// Another TDES key: a block under it is under the wrong KEK.
const OTHER_KEK: &str = "00112233445566778899AABBCCDDEEFF";
const AES_KEK: &str = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F";
const AES_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
/// The header of a BDK block: usage B0, TDES, mode X (derivation), exportability N.
const BDK_HEADER: &str = "B0000B0TX00N0000";

fn kek() -> String {
    let c1 = hex::decode(KEK_COMPONENT_1).expect("hex");
    let c2 = hex::decode(KEK_COMPONENT_2).expect("hex");
    hex::encode_upper(c1.iter().zip(&c2).map(|(a, b)| a ^ b).collect::<Vec<u8>>())
}

fn tdes_kcv(key: &str) -> TestResult<String> {
    Ok(SymmetricKey::tdes_from_hex(key)?.kcv(KcvLen::Three).to_hex())
}

fn run(mut cmd: Command) -> TestResult<String> {
    let out: Output = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `rkictl` against the gateway, as the key owner.
fn rkictl(gw: &GatewayProcess, args: &[&str]) -> TestResult<String> {
    let mut cmd = Command::new(binary("rkictl"));
    cmd.env("RKI_URL", gw.url()).env("RKI_TOKEN", &gw.key_owner_token).args(args);
    run(cmd)
}

/// A key block made by our own calculator, `rkictl key tr31-wrap` (secrets in its environment).
fn rkictl_wrap(kbpk: &str, header: &str, key: &str) -> TestResult<String> {
    let mut cmd = Command::new(binary("rkictl"));
    cmd.env("RKICTL_KBPK", kbpk).env("RKICTL_KEY", key).args(["--json", "key", "tr31-wrap", "--header", header]);
    let v: Value = serde_json::from_str(&run(cmd)?)?;
    v["key_block"].as_str().map(str::to_string).ok_or_else(|| format!("no key_block in {v}").into())
}

/// A key block made by psec (Python), an implementation of TR-31 independent of ours.
fn psec_wrap(kbpk: &str, header: &str, key: &str) -> TestResult<String> {
    const SCRIPT: &str = "import sys, psec\n\
        kbpk, header, key = (bytes.fromhex(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3]))\n\
        print(psec.tr31.wrap(kbpk=kbpk, header=header, key=key))\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT, kbpk, header, key]);
    let out = run(cmd).map_err(|e| format!("python3 with psec is needed (pip install psec): {e}"))?;
    Ok(out.trim().to_string())
}

fn components_file(dir: &Path, components: &[&str]) -> TestResult<String> {
    let text: Vec<String> =
        components.iter().map(|c| Ok(format!("{c} {}", tdes_kcv(c)?))).collect::<TestResult<_>>()?;
    let path = dir.join("kek-components.txt");
    std::fs::write(&path, text.join("\n") + "\n")?;
    Ok(path.display().to_string())
}

fn import_body(name: &str, algorithm: &str, kek: &str, key_block: &str) -> Value {
    json!({"name": name, "algorithm": algorithm, "kek": kek, "key_block": key_block})
}

#[test]
fn bdks_imported_under_a_kek_from_rkictl_and_psec_blocks_give_terminals_the_right_ipek() -> TestResult {
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let dir = temp_dir("kek-import");
    let kek = kek();
    let bdk_kcv = tdes_kcv(TEST_BDK)?;

    // The ceremony: the KEK once, as two components with their KCVs.
    let file = components_file(&dir, &[KEK_COMPONENT_1, KEK_COMPONENT_2])?;
    let created = rkictl(
        &gw,
        &["keks", "create", "--org", "acme", "--name", "zmk-1", "--algorithm", "tdes", "--components-file", &file],
    )?;
    assert!(created.contains(&tdes_kcv(&kek)?), "the KEK's KCV is shown: {created}");
    let listed = rkictl(&gw, &["keks", "list"])?;
    assert!(listed.contains("zmk-1") && listed.contains(&tdes_kcv(&kek)?), "{listed}");
    let (status, v) = gw.key_owner().get("/v1/keks");
    assert_eq!((status, v["keks"][0]["name"].as_str()), (200, Some("zmk-1")), "{v}");
    assert_eq!(v["keks"][0]["org"], "acme");
    let aes_kek = SymmetricKey::aes_from_hex(AES_KEK)?;
    let aes_components = json!([
        {"key": AES_KEK, "kcv": aes_kek.kcv(KcvLen::Three).to_hex()},
        {"key": "0".repeat(64), "kcv": SymmetricKey::aes_from_hex(&"0".repeat(64))?.kcv(KcvLen::Three).to_hex()},
    ]);
    gw.key_owner()
        .ok_post("/v1/orgs/acme/keks", &json!({"name": "zmk-aes", "algorithm": "aes", "components": aes_components}))?;
    // An organization's token cannot see the KEKs.
    assert_eq!(gw.api().get("/v1/keks").0, 403);

    // BDKs as TR-31 blocks under it: one wrapped by rkictl, one by psec.
    let ours = rkictl_wrap(&kek, BDK_HEADER, TEST_BDK)?;
    let theirs = psec_wrap(&kek, BDK_HEADER, TEST_BDK)?;
    assert_ne!(ours, theirs, "two wraps of one key differ (random padding)");
    let imported = rkictl(
        &gw,
        &[
            "key-sources",
            "import",
            "--org",
            "acme",
            "--name",
            "bdk-test",
            "--algorithm",
            "tdes",
            "--kek",
            "zmk-1",
            "--key-block",
            &ours,
        ],
    )?;
    assert!(imported.contains(&bdk_kcv), "the BDK's KCV is shown on import: {imported}");
    let imported = rkictl(
        &gw,
        &[
            "key-sources",
            "import",
            "--org",
            "acme",
            "--name",
            "bdk-psec",
            "--algorithm",
            "tdes",
            "--kek",
            "zmk-1",
            "--key-block",
            &theirs,
            "--kcv",
            &bdk_kcv,
        ],
    )?;
    assert!(imported.contains(&bdk_kcv), "{imported}");
    // An AES BDK in a version D block by psec, under the AES KEK.
    let aes_block = psec_wrap(AES_KEK, "D0000B0AX00N0000", AES_BDK)?;
    let v =
        gw.key_owner().ok_post("/v1/orgs/acme/key-sources", &import_body("bdk-aes", "aes", "zmk-aes", &aes_block))?;
    assert_eq!(
        v["key_source"]["kcv"].as_str(),
        Some(SymmetricKey::aes_from_hex(AES_BDK)?.kcv(KcvLen::Three).to_hex().as_str())
    );
    assert_eq!(v["key_source"]["algorithm"], "aes128");
    let sources = gw.api().ok("/v1/key-sources")?;
    let kcvs: Vec<(&str, &str)> = sources["key_sources"]
        .as_array()
        .map(|a| a.iter().map(|k| (k["name"].as_str().unwrap_or(""), k["kcv"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    assert_eq!(kcvs[..2], [("bdk-test", bdk_kcv.as_str()), ("bdk-psec", bdk_kcv.as_str())], "{sources}");
    let audit = gw.key_owner().ok("/v1/audit?limit=10")?;
    let actions: Vec<&str> =
        audit["audit"].as_array().map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect()).unwrap_or_default();
    assert_eq!(actions.iter().filter(|a| **a == "key_source.import").count(), 3, "{audit}");
    assert_eq!(actions.iter().filter(|a| **a == "kek.create").count(), 2, "{audit}");

    // A push: half the terminals on the rkictl-wrapped key source, half on psec's.
    let devices = sns("KEKIMP", 10);
    let provisioned = provision(&gw, &devices, "imported")?;
    let api = gw.api();
    api.ok_post("/v1/assignments", &json!({"sns": &devices[5..], "key_source": "bdk-psec"}))?;
    let fleet = rt.block_on(common::spawn_fleet(
        common::fleet_config(gw.mqtt_port, &provisioned, Knobs::default())?,
        Duration::from_secs(60),
    ))?;
    let mut records = Vec::new();
    for (half, source) in [(&devices[..5], "bdk-test"), (&devices[5..], "bdk-psec")] {
        let task = create_task(&api, &for_sns(half))?.task.id;
        let done = wait_task_done(&api, task, Duration::from_secs(60))?;
        assert_eq!(done.task.counts.succeeded, 5, "{:?}", done.task);
        assert_eq!(done.task.key_source, source);
        let v = api.ok(&format!("/v1/records?task={task}"))?;
        records.extend(v["records"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!(records.len(), 10);
    for r in &records {
        assert_eq!(r["result"], "succeeded", "{r}");
        let ksn = r["key_id"].as_str().unwrap_or_default();
        assert_eq!(r["kcv"].as_str(), Some(expected_kcv(ksn)?.as_str()), "KCV of {ksn} from {}", r["key_source"]);
    }
    rt.block_on(fleet.wait_keys_installed(10, Duration::from_secs(10))).map_err(|e| format!("{e:?}"))?;
    rt.block_on(fleet.shutdown());

    // Neither the KEKs, their components nor the BDKs appear in the gateway's log, its API
    // answers or its store files, as hex or as raw bytes.
    let secrets = [kek.as_str(), KEK_COMPONENT_1, KEK_COMPONENT_2, TEST_BDK, AES_KEK, AES_BDK];
    let log = std::fs::read_to_string(gw.log_path())?.to_uppercase();
    let answers = format!("{}{}{}", gw.key_owner().get("/v1/keks").1, sources, audit).to_uppercase();
    for secret in secrets {
        assert!(!log.contains(secret), "a secret is in the log");
        assert!(!answers.contains(secret), "a secret is in an API answer");
    }
    let mut store = Vec::new();
    for entry in std::fs::read_dir(gw.data_dir())? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rki.sqlite")) {
            store.extend(std::fs::read(&path)?);
        }
    }
    assert!(store.len() > 4096, "the store files were read");
    let store_upper = String::from_utf8_lossy(&store).to_uppercase();
    for secret in secrets {
        let raw = hex::decode(secret)?;
        assert!(!store.windows(raw.len()).any(|w| w == raw.as_slice()), "a secret's bytes are in the store");
        assert!(!store_upper.contains(secret), "a secret's hex is in the store");
    }
    Ok(())
}

#[test]
fn bad_key_blocks_are_refused_with_their_code_and_change_nothing() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let owner = gw.key_owner();
    let kek = kek();
    let components = json!([
        {"key": KEK_COMPONENT_1, "kcv": tdes_kcv(KEK_COMPONENT_1)?},
        {"key": KEK_COMPONENT_2, "kcv": tdes_kcv(KEK_COMPONENT_2)?},
    ]);
    owner.ok_post("/v1/orgs/acme/keks", &json!({"name": "zmk-1", "algorithm": "tdes", "components": components}))?;
    let (status, v) = gw.upload_devices("acme", "sn\nKEKBAD0001\n");
    assert_eq!(status, 200, "{v}");
    let good = psec_wrap(&kek, BDK_HEADER, TEST_BDK)?;
    let tampered = {
        let mut b = good.clone().into_bytes();
        let at = b.len() - 20;
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b)?
    };
    let cases = [
        ("wrong KEK", psec_wrap(OTHER_KEK, BDK_HEADER, TEST_BDK)?, "key_block_mac_mismatch"),
        ("wrong usage (PIN key)", psec_wrap(&kek, "B0000P0TE00N0000", TEST_BDK)?, "key_block_usage_refused"),
        ("wrong usage (initial key)", rkictl_wrap(&kek, "B0000B1TX00N0000", TEST_BDK)?, "key_block_usage_refused"),
        ("tampered", tampered, "key_block_mac_mismatch"),
        ("exportable", psec_wrap(&kek, "B0000B0TX00E0000", TEST_BDK)?, "key_block_exportability_refused"),
        ("mode of use E", psec_wrap(&kek, "B0000B0TE00N0000", TEST_BDK)?, "key_block_mode_refused"),
        ("version A", psec_wrap(&kek, "A0000B0TX00N0000", TEST_BDK)?, "key_block_version_refused"),
    ];
    let before = (gw.api().ok("/v1/key-sources")?, owner.ok("/v1/audit?limit=100")?);
    for (what, block, code) in &cases {
        let (status, v) = owner.post("/v1/orgs/acme/key-sources", &import_body("bdk-bad", "tdes", "zmk-1", block));
        assert_eq!((status, v["code"].as_str()), (400, Some(*code)), "{what}: {v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {v}");
    }
    // Declared AES, but the block holds a TDES key.
    let (status, v) = owner.post("/v1/orgs/acme/key-sources", &import_body("bdk-bad", "aes", "zmk-1", &good));
    assert_eq!((status, v["code"].as_str()), (400, Some("key_block_algorithm_mismatch")), "{v}");
    // An unknown KEK, and a key-source name that is a KEK's: not found, nothing stored.
    let (status, v) = owner.post("/v1/orgs/acme/key-sources", &import_body("bdk-bad", "tdes", "zmk-2", &good));
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (status, v) = gw.api().post("/v1/assignments", &json!({"sns": ["KEKBAD0001"], "key_source": "zmk-1"}));
    assert_eq!((status, v["detail"].as_str()), (404, Some("key source \"zmk-1\"")), "a KEK is not a key source: {v}");
    // rkictl shows the refusal and fails.
    let refused = rkictl(
        &gw,
        &[
            "key-sources",
            "import",
            "--org",
            "acme",
            "--name",
            "bdk-bad",
            "--algorithm",
            "tdes",
            "--kek",
            "zmk-1",
            "--key-block",
            &cases[0].1,
        ],
    );
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("key_block_mac_mismatch") || message.contains("MAC"), "{message}");
    let after = (gw.api().ok("/v1/key-sources")?, owner.ok("/v1/audit?limit=100")?);
    assert_eq!(before, after, "the key-source list and the audit log are unchanged");
    // The good block still goes in.
    owner.ok_post("/v1/orgs/acme/key-sources", &import_body("bdk-good", "tdes", "zmk-1", &good))?;
    Ok(())
}
