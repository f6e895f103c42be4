//! Getting a fleet ready through the real admin API, as an operator would: the key ceremony (the
//! test BDK, entered as two components) and the upload of the SNs, both the key owner's; then the
//! organization's: the devices into a group, assignment, and one GUDID per terminal. Nothing is written behind the gateway's back.

use std::time::Duration;

use rki_protocol::{KcvLen, SymmetricKey};
use rki_tests::{Api, TEST_BDK};
use serde_json::json;

use crate::Result;

/// The key source every scenario pushes from.
pub const KEY_SOURCE: &str = "bdk-loadtest";
/// The second component of the test BDK; the first is `TEST_BDK` XOR this.
const COMPONENT_2: &str = "0F1E2D3C4B5A69788796A5B4C3D2E1F0";
/// GUDIDs per provisioning request (the API takes at most 1,000).
const GUDIDS_PER_REQUEST: usize = 1000;

/// What the operator set up: the SNs in order, each with its GUDID.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub group: String,
    pub gudids: Vec<(String, String)>,
    /// How long the API calls took, for the record.
    pub seconds: f64,
}

/// SNs `{prefix}000001` … for a fleet of `n`.
pub fn serial_numbers(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:06}")).collect()
}

/// Authorizes the test BDK for `org` as [`KEY_SOURCE`] unless the organization already has it.
pub fn ensure_key_source(api: &Api, key_owner: Option<&Api>, org: &str) -> Result<()> {
    let sources = api.ok("/v1/key-sources")?;
    let present = sources["key_sources"].as_array().is_some_and(|a| a.iter().any(|k| k["name"] == KEY_SOURCE));
    if present {
        return Ok(());
    }
    let key_owner = key_owner.ok_or("the organization has no key source `bdk-loadtest`: pass --key-owner-token")?;
    let bdk = SymmetricKey::tdes_from_hex(TEST_BDK)?;
    let component_2 = SymmetricKey::tdes_from_hex(COMPONENT_2)?;
    let component_1: Vec<u8> =
        hex::decode(TEST_BDK)?.iter().zip(hex::decode(COMPONENT_2)?).map(|(a, b)| a ^ b).collect();
    let component_1_key = SymmetricKey::tdes_from_hex(&hex::encode(&component_1))?;
    let body = json!({
        "name": KEY_SOURCE,
        "algorithm": "tdes",
        "components": [
            {"key": hex::encode_upper(&component_1), "kcv": component_1_key.kcv(KcvLen::Three).to_hex()},
            {"key": COMPONENT_2, "kcv": component_2.kcv(KcvLen::Three).to_hex()},
        ],
        "kcv": bdk.kcv(KcvLen::Three).to_hex(),
    });
    key_owner.ok_post(&format!("/v1/orgs/{org}/key-sources"), &body)?;
    Ok(())
}

/// The key owner uploads `sns` to `org`; the organization adds them to `group`, assigns the test
/// BDK and provisions one GUDID per SN.
pub fn prepare_fleet(api: &Api, key_owner: Option<&Api>, org: &str, sns: &[String], group: &str) -> Result<Prepared> {
    let started = std::time::Instant::now();
    ensure_key_source(api, key_owner, org)?;
    let csv = std::iter::once("sn,model".to_string())
        .chain(sns.iter().map(|sn| format!("{sn},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    // The provider's part: the key owner uploads the SNs to the organization.
    let key_owner = key_owner.ok_or("uploading the fleet's SNs is the key owner's: pass --key-owner-token")?;
    let (status, v) = key_owner.post_csv(&format!("/v1/orgs/{org}/devices/import"), &csv);
    if status != 200 {
        return Err(format!("upload: {status} {v}").into());
    }
    let (status, v) = api.post("/v1/groups", &json!({"name": group}));
    if status != 201 && status != 409 {
        return Err(format!("create group: {status} {v}").into());
    }
    api.ok_post(&format!("/v1/groups/{group}/devices"), &json!({"sns": sns}))?;
    api.ok_post("/v1/assignments", &json!({"group": group, "key_source": KEY_SOURCE}))?;
    let mut gudids = Vec::with_capacity(sns.len());
    for chunk in sns.chunks(GUDIDS_PER_REQUEST) {
        let v = api.ok_post("/v1/gudids", &json!({"sns": chunk}))?;
        for g in v["gudids"].as_array().cloned().unwrap_or_default() {
            let sn = g["sn"].as_str().ok_or("GUDID answer without sn")?.to_string();
            let gudid = g["gudid"].as_str().ok_or("GUDID answer without gudid")?.to_string();
            gudids.push((sn, gudid));
        }
    }
    if gudids.len() != sns.len() {
        return Err(format!("{} GUDIDs for {} SNs", gudids.len(), sns.len()).into());
    }
    Ok(Prepared { group: group.to_string(), gudids, seconds: started.elapsed().as_secs_f64() })
}

/// Creates a download task for `group`; returns its id and the gateway-clock creation time (ms).
pub fn create_task(api: &Api, group: &str) -> Result<(i64, i64)> {
    let v = api.ok_post("/v1/tasks", &json!({"group": group}))?;
    let id = v["task"]["id"].as_i64().ok_or_else(|| format!("no task id in {v}"))?;
    let created_at = v["task"]["created_at"].as_i64().ok_or_else(|| format!("no created_at in {v}"))?;
    Ok((id, created_at))
}

/// A task's execution counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: i64,
    pub queued: i64,
    pub delivered: i64,
    pub succeeded: i64,
    pub failed: i64,
}

impl Counts {
    pub fn ended(&self) -> i64 {
        self.total - self.queued - self.delivered
    }
}

pub fn task_counts(api: &Api, task: i64) -> Result<Counts> {
    // The counts alone: the executions of a fleet-wide task would make every poll cost the
    // gateway a JSON object per device, during the push being measured.
    let v = api.ok(&format!("/v1/tasks/{task}?limit=0"))?;
    let c = &v["task"]["counts"];
    let n = |k: &str| c[k].as_i64().unwrap_or(0);
    Ok(Counts {
        total: n("total"),
        queued: n("queued"),
        delivered: n("delivered"),
        succeeded: n("succeeded"),
        failed: n("failed"),
    })
}

/// One durable record, as the load tester reads it.
#[derive(Debug, Clone)]
pub struct Record {
    pub sn: String,
    pub result: String,
    pub at_ms: i64,
    pub key_id: String,
    pub kcv: String,
}

pub fn task_records(api: &Api, task: i64) -> Result<Vec<Record>> {
    let v = api.ok(&format!("/v1/records?task={task}"))?;
    let records = v["records"].as_array().cloned().unwrap_or_default();
    Ok(records
        .iter()
        .map(|r| Record {
            sn: r["sn"].as_str().unwrap_or_default().to_string(),
            result: r["result"].as_str().unwrap_or_default().to_string(),
            at_ms: r["at"].as_i64().unwrap_or(0),
            key_id: r["key_id"].as_str().unwrap_or_default().to_string(),
            kcv: r["kcv"].as_str().unwrap_or_default().to_string(),
        })
        .collect())
}

/// Reads one sample of the gateway's `/metrics` page (0 if absent).
pub fn metric(url: &str, sample: &str) -> f64 {
    let (_, text) = Api::new(url, "").get_text("/metrics");
    rki_tests::metric_value(&text, sample)
}

/// Polls until the gateway nodes together count `n` devices online (each hello is handled by one
/// node), or `timeout`.
pub fn wait_gateways_online(urls: &[String], n: usize, timeout: Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        if urls.iter().map(|u| metric(u, "rki_devices_connected")).sum::<f64>() as usize >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
