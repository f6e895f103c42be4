//! `rkictl` subcommands over the admin API: every flow an operator or the key owner drives.
//! Each prints a readable table by default and the API's JSON with `--json`; every error is one
//! line on stderr and a non-zero exit.

use std::io::{BufRead, IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rki_gateway::api::types::{Preview, PreviewAnswer, Task, TaskCreated, TaskDetail, TaskList, TaskStopped};
use serde_json::{json, Value};
use zeroize::Zeroizing;

mod admin;
mod fleet;
mod keys;
mod records;
mod tasks;

pub use admin::{audit, clock};
pub use fleet::{assign, devices, groups};
pub use keys::{keks, key_sources, orgs};
pub use records::{billing, gudids, records};
pub use tasks::tasks;

/// Where the API is and who is calling.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Admin API base URL.
    #[arg(long, global = true, env = "RKI_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token: an organization's admin token, or the key owner's.
    #[arg(long, global = true, env = "RKI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Upload an organization's devices from a CSV (`sn[,model]` per line), with the key owner's
    /// token. All or nothing: every bad line, and every SN another organization holds, is reported
    /// and nothing is stored. The organization then groups, assigns and pushes them itself.
    Import {
        /// The organization the devices are for.
        #[arg(long)]
        org: String,
        file: PathBuf,
        /// Check only: report what the upload would do, store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List devices with their states (online, lock, assignment, task).
    List {
        /// Only SNs containing this text.
        #[arg(long)]
        sn: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Show one device, with its key slots.
    Show { sn: String },
    /// Send a signed unlock so another key can go on.
    Unlock { sn: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupsCommand {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    /// Add devices to a group by SN.
    Add {
        name: String,
        #[arg(required = true)]
        sns: Vec<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Target a group.
    #[arg(long, conflicts_with = "sn")]
    pub group: Option<String>,
    /// Target devices by SN (repeatable).
    #[arg(long)]
    pub sn: Vec<String>,
}

impl TargetArgs {
    fn into_json(self, mut body: Value) -> Result<Value, String> {
        match (self.group, self.sn.is_empty()) {
            (Some(g), true) => body["group"] = json!(g),
            (None, false) => body["sns"] = json!(self.sn),
            _ => return Err("name a target: --group NAME or --sn SN (repeatable)".into()),
        }
        Ok(body)
    }
}

#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Key source; defaults to the one assigned to the devices.
    #[arg(long)]
    pub key_source: Option<String>,
    /// Key slot: 1 production (default), 4 development, 8 debug.
    #[arg(long, default_value_t = 1)]
    pub slot: u16,
    /// Days until unacknowledged executions expire (1 to 180; default 30).
    #[arg(long)]
    pub expiry_days: Option<u16>,
}

impl TaskArgs {
    fn into_json(self) -> Result<Value, String> {
        let mut body = json!({"slot": self.slot});
        if let Some(k) = self.key_source {
            body["key_source"] = json!(k);
        }
        if let Some(d) = self.expiry_days {
            body["expiry_days"] = json!(d);
        }
        self.target.into_json(body)
    }
}

#[derive(Subcommand, Debug)]
pub enum TasksCommand {
    /// Which devices are ready, and why the others are not.
    Preview(TaskArgs),
    /// Create a download task for the ready devices.
    Create(TaskArgs),
    /// List tasks: unfinished, done, or all; with the compact dashboard.
    List {
        #[arg(long, default_value = "all", value_parser = ["unfinished", "done", "all"])]
        status: String,
    },
    /// Show a task with each device's state and error code.
    Show { id: i64 },
    /// Stop a task: its open executions end as manually terminated.
    Stop {
        id: i64,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Follow a task's progress until it is done (or the timeout).
    Watch {
        id: i64,
        #[arg(long, default_value_t = 0)]
        timeout_seconds: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum GudidsCommand {
    /// Provision one GUDID per SN (shown once; expires after 72 h; single use), all or nothing,
    /// at most 1000 SNs per call. A new GUDID revokes the SN's live one.
    Provision {
        #[arg(required = true)]
        sns: Vec<String>,
    },
    /// List GUDIDs (newest first, at most 1000) as unused, used, revoked or expired.
    List {
        #[arg(long)]
        sn: Option<String>,
        /// Only the live ones: unused, unrevoked, unexpired.
        #[arg(long)]
        live: bool,
    },
    /// Revoke a live GUDID by its ID (the first column of `list`): it no longer initialises.
    Revoke { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum OrgsCommand {
    /// Create an organization (key owner token); prints its admin token once.
    Create {
        name: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum KeySourcesCommand {
    /// Authorize a BDK for an organization (key owner token), entered as 2 or 3 clear components
    /// with their KCVs. Components come from a file (`KEY KCV` per line) or are typed at a prompt;
    /// never from the command line.
    Authorize {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["tdes", "aes"])]
        algorithm: String,
        /// File with one component per line: `HEXKEY KCV`.
        #[arg(long)]
        components_file: Option<PathBuf>,
        /// KCV the combined key must have.
        #[arg(long)]
        kcv: Option<String>,
    },
    /// Import a BDK for an organization (key owner token) as a TR-31 key block under one of the
    /// organization's KEKs (see `rkictl keks create`). The block must say usage B0, mode of use X
    /// or N, exportability N, version B (TDES KEK) or D (AES KEK). Prints the BDK's KCV.
    Import {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        /// The BDK's family, which the block's algorithm must match.
        #[arg(long, value_parser = ["tdes", "aes"])]
        algorithm: String,
        /// The KEK the block is wrapped under, by name.
        #[arg(long)]
        kek: String,
        /// The TR-31 key block (encrypted under the KEK; it holds no clear key).
        #[arg(long)]
        key_block: String,
        /// KCV the BDK must have.
        #[arg(long)]
        kcv: Option<String>,
    },
    /// Key sources authorized for the organization: name, algorithm, KCV.
    List,
}

#[derive(Subcommand, Debug)]
pub enum KeksCommand {
    /// Enter a key-encryption key (the key owner's ZMK) for an organization, once, as 2 or 3
    /// clear components with their KCVs, from a file (`HEXKEY KCV` per line) or typed at a
    /// prompt. BDKs then come as TR-31 blocks under it (`key-sources import`).
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["tdes", "aes"])]
        algorithm: String,
        /// File with one component per line: `HEXKEY KCV`.
        #[arg(long)]
        components_file: Option<PathBuf>,
        /// KCV the combined KEK must have.
        #[arg(long)]
        kcv: Option<String>,
    },
    /// Every organization's KEKs (key owner token): organization, name, algorithm, KCV.
    List,
}

#[derive(Subcommand, Debug)]
pub enum ClockCommand {
    /// Test only: move the gateway's adjustable clock forward, then expire what is due.
    Advance { seconds: u32 },
    /// Test only: step the gateway's adjustable clock by SECONDS, back when negative (the wall
    /// reading then holds until the stepped time catches up); the offset survives a restart.
    Step {
        #[arg(allow_negative_numbers = true)]
        seconds: i64,
    },
}

pub struct Client {
    url: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(api: &ApiArgs) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build();
        Self { url: api.url.trim_end_matches('/').to_string(), token: api.token.clone(), agent }
    }

    fn request(&self, method: &str, path: &str) -> Result<ureq::Request, String> {
        let token = self.token.as_ref().ok_or("no token: pass --token or set RKI_TOKEN")?;
        Ok(self.agent.request(method, &format!("{}{path}", self.url)).set("Authorization", &format!("Bearer {token}")))
    }

    fn answer(result: Result<ureq::Response, ureq::Error>) -> Result<String, String> {
        match result {
            Ok(r) => r.into_string().map_err(|e| format!("reading the answer: {e}")),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let detail = v["detail"].as_str().unwrap_or(text.trim());
                let mut line = format!("{code} {}: {detail}", v["code"].as_str().unwrap_or("error"));
                if let Some(errors) = v["errors"].as_array() {
                    for e in errors {
                        let at = e["line"].as_i64().map(|l| format!("line {l}: ")).unwrap_or_default();
                        line.push_str(&format!("\n  {at}{}", e["reason"].as_str().unwrap_or("")));
                    }
                }
                Err(line)
            }
            Err(e) => Err(format!("cannot reach the gateway: {e}")),
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, String> {
        let text = Self::answer(self.request("GET", path)?.call())?;
        decode(&text)
    }

    /// A GET whose answer is one of the API's typed answers ([`rki_gateway::api::types`]).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let text = Self::answer(self.request("GET", path)?.call())?;
        decode(&text)
    }

    /// A POST of a typed request whose answer is typed.
    pub fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, String> {
        let body = serde_json::to_value(body).map_err(|e| e.to_string())?;
        let text = Self::answer(self.request("POST", path)?.send_json(body))?;
        decode(&text)
    }

    pub fn get_text(&self, path: &str) -> Result<String, String> {
        Self::answer(self.request("GET", path)?.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let text = Self::answer(self.request("POST", path)?.send_json(body.clone()))?;
        decode(&text)
    }

    /// Posts a JSON body that holds clear components, from its zeroizing buffer (ureq's own
    /// write buffer is beyond our reach).
    pub fn post_secret(&self, path: &str, body: &Zeroizing<String>) -> Result<Value, String> {
        let request = self.request("POST", path)?.set("Content-Type", "application/json");
        let text = Self::answer(request.send_string(body))?;
        decode(&text)
    }

    pub fn post_text(&self, path: &str, body: &str) -> Result<Value, String> {
        let text = Self::answer(self.request("POST", path)?.set("Content-Type", "text/csv").send_string(body))?;
        decode(&text)
    }
}

/// An answer's body as JSON, or as one of the API's typed answers.
fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("unexpected answer from the gateway: {e}"))
}

fn to_json(v: &impl serde::Serialize) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Output: the JSON value with `--json`, else a human rendering.
pub enum Output {
    Json(Value),
    Text(String),
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for row in rows {
        line(row, &mut out);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn time(v: &Value) -> String {
    match v.as_i64() {
        Some(ms) => {
            let secs = ms / 1000;
            let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, m, d) = civil_from_days(days);
            format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
        }
        None => "-".into(),
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(time(&json!(1_795_604_341_670_i64)), "2026-11-25 10:59:01");
    }
}
