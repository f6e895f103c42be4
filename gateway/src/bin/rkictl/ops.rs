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
        serde_json::from_str(&text).map_err(|e| format!("bad JSON from the gateway: {e}"))
    }

    /// A GET whose answer is one of the API's typed answers ([`rki_gateway::api::types`]).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let text = Self::answer(self.request("GET", path)?.call())?;
        serde_json::from_str(&text).map_err(|e| format!("unexpected answer from the gateway: {e}"))
    }

    /// A POST of a typed request whose answer is typed.
    pub fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, String> {
        let body = serde_json::to_value(body).map_err(|e| e.to_string())?;
        let text = Self::answer(self.request("POST", path)?.send_json(body))?;
        serde_json::from_str(&text).map_err(|e| format!("unexpected answer from the gateway: {e}"))
    }

    pub fn get_text(&self, path: &str) -> Result<String, String> {
        Self::answer(self.request("GET", path)?.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let text = Self::answer(self.request("POST", path)?.send_json(body.clone()))?;
        serde_json::from_str(&text).map_err(|e| format!("bad JSON from the gateway: {e}"))
    }

    /// Posts a JSON body that holds clear components, from its zeroizing buffer (ureq's own
    /// write buffer is beyond our reach).
    pub fn post_secret(&self, path: &str, body: &Zeroizing<String>) -> Result<Value, String> {
        let request = self.request("POST", path)?.set("Content-Type", "application/json");
        let text = Self::answer(request.send_string(body))?;
        serde_json::from_str(&text).map_err(|e| format!("bad JSON from the gateway: {e}"))
    }

    pub fn post_text(&self, path: &str, body: &str) -> Result<Value, String> {
        let text = Self::answer(self.request("POST", path)?.set("Content-Type", "text/csv").send_string(body))?;
        serde_json::from_str(&text).map_err(|e| format!("bad JSON from the gateway: {e}"))
    }
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

pub fn devices(c: &Client, cmd: DevicesCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        DevicesCommand::Import { org, file, dry_run } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let path = format!("/v1/orgs/{}/devices/import?dry_run={dry_run}", enc(&org));
            let v = c.post_text(&path, &text)?;
            Ok(if json_out {
                Output::Json(v)
            } else if dry_run {
                Output::Text(format!(
                    "{} valid, {} new, {} already registered to {org}; nothing uploaded (dry run)",
                    s(&v["valid"]),
                    s(&v["new"]),
                    s(&v["already_registered"]),
                ))
            } else {
                Output::Text(format!(
                    "{} valid, {} uploaded to {org}, {} already registered",
                    s(&v["valid"]),
                    s(&v["imported"]),
                    s(&v["already_registered"]),
                ))
            })
        }
        DevicesCommand::List { sn, group, limit } => {
            // Pages of at most 1,000 (the API's largest), following next_cursor up to `limit`.
            let mut devices: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            let mut total = Value::Null;
            while (devices.len() as i64) < limit {
                let page = (limit - devices.len() as i64).min(1000);
                let mut path = format!("/v1/devices?limit={page}");
                if let Some(sn) = &sn {
                    path.push_str(&format!("&sn={}", enc(sn)));
                }
                if let Some(g) = &group {
                    path.push_str(&format!("&group={}", enc(g)));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={}", enc(c)));
                }
                let v = c.get(&path)?;
                devices.extend(v["devices"].as_array().cloned().unwrap_or_default());
                total = v["total"].clone();
                match v["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => break,
                }
            }
            let v = json!({ "devices": devices, "total": total });
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["devices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| {
                            vec![
                                s(&d["sn"]),
                                s(&d["model"]),
                                s(&d["rom_version"]),
                                s(&d["app_version"]),
                                if d["online"].as_bool() == Some(true) { "online".into() } else { "offline".into() },
                                time(&d["last_seen"]),
                                s(&d["lock"]),
                                d["assigned_key_source"]
                                    .as_str()
                                    .map(|k| format!("assigned ({k})"))
                                    .unwrap_or("unassigned".into()),
                                s(&d["task"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out =
                table(&["SN", "MODEL", "ROM", "APP", "CONNECTION", "LAST SEEN", "LOCK", "ASSIGNMENT", "TASK"], rows);
            out.push_str(&format!("{} device(s) in the organization", s(&v["total"])));
            Ok(Output::Text(out))
        }
        DevicesCommand::Show { sn } => {
            let v = c.get(&format!("/v1/devices/{}", enc(&sn)))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let d = &v["device"];
            let mut out = String::new();
            for k in [
                "sn",
                "model",
                "rom_version",
                "app_version",
                "region",
                "online",
                "lock",
                "unlock_pending",
                "debug_mode",
                "initialised",
                "task",
            ] {
                out.push_str(&format!("{k:<16} {}\n", s(&d[k])));
            }
            out.push_str(&format!("{:<16} {}\n", "last_seen", time(&d["last_seen"])));
            if d["last_unlock_refusal"].is_object() {
                let r = &d["last_unlock_refusal"];
                out.push_str(&format!(
                    "{:<16} {} at {}: {}\n",
                    "unlock_refused",
                    s(&r["code"]),
                    time(&r["at"]),
                    s(&r["meaning"])
                ));
            }
            let slots: Vec<Vec<String>> = d["slots"]
                .as_array()
                .map(|a| {
                    a.iter().map(|x| vec![s(&x["slot"]), s(&x["key_type"]), s(&x["key_id"]), s(&x["kcv"])]).collect()
                })
                .unwrap_or_default();
            out.push_str("\nkey slots (as the device last reported them)\n");
            out.push_str(&table(&["INDEX", "KEY TYPE", "KSN / KEY ID", "KCV"], slots));
            Ok(Output::Text(out))
        }
        DevicesCommand::Unlock { sn } => {
            let v = c.post(&format!("/v1/devices/{}/unlock", enc(&sn)), &json!({}))?;
            Ok(if json_out { Output::Json(v) } else { Output::Text(format!("unlock for {sn}: {}", s(&v["unlock"]))) })
        }
    }
}

pub fn groups(c: &Client, cmd: GroupsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        GroupsCommand::Create { name, description } => {
            let v = c.post("/v1/groups", &json!({"name": name, "description": description}))?;
            Ok(if json_out { Output::Json(v) } else { Output::Text(format!("group {name} created")) })
        }
        GroupsCommand::List => {
            let v = c.get("/v1/groups")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["groups"]
                .as_array()
                .map(|a| a.iter().map(|g| vec![s(&g["name"]), s(&g["members"]), s(&g["description"])]).collect())
                .unwrap_or_default();
            Ok(Output::Text(table(&["GROUP", "DEVICES", "DESCRIPTION"], rows)))
        }
        GroupsCommand::Add { name, sns } => {
            let v = c.post(&format!("/v1/groups/{}/devices", enc(&name)), &json!({"sns": sns}))?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                Output::Text(format!("{} device(s) added to {name}", s(&v["added"])))
            })
        }
    }
}

pub fn assign(c: &Client, key_source: Option<String>, target: TargetArgs, json_out: bool) -> Result<Output, String> {
    let body = target.into_json(json!({"key_source": key_source}))?;
    let v = c.post("/v1/assignments", &body)?;
    Ok(if json_out {
        Output::Json(v)
    } else {
        Output::Text(format!(
            "{} device(s) assigned to {}",
            s(&v["assigned"]),
            key_source.unwrap_or("nothing (unassigned)".into())
        ))
    })
}

fn preview_text(p: &Preview) -> String {
    let mut out = format!(
        "key source {}, slot {}, expires after {} days\nready: {}\n",
        p.key_source.as_deref().unwrap_or("-"),
        p.slot,
        p.expiry_days,
        p.ready.len()
    );
    if !p.never_seen.is_empty() {
        out.push_str(&format!("  of which never seen online (firmware unknown): {}\n", p.never_seen.len()));
    }
    out.push_str(&format!("not ready: {}\n", p.not_ready.len()));
    for d in p.not_ready.iter().take(50) {
        out.push_str(&format!("  {:<20} {}\n", d.sn, d.reasons.join(", ")));
    }
    if p.not_ready.len() > 50 {
        out.push_str(&format!("  … and {} more (use --json for all)\n", p.not_ready.len() - 50));
    }
    out
}

fn task_line(t: &Task) -> Vec<String> {
    let c = &t.counts;
    vec![
        t.id.to_string(),
        t.key_source.clone(),
        t.slot.to_string(),
        t.status.clone(),
        t.outcome.clone(),
        format!("{}/{}", c.succeeded, c.total),
        c.failed.to_string(),
        c.expired.to_string(),
        c.terminated.to_string(),
        t.open().to_string(),
        time(&json!(t.created_at)),
        time(&json!(t.expires_at)),
    ]
}

const TASK_HEADERS: [&str; 12] = [
    "TASK",
    "KEY SOURCE",
    "SLOT",
    "STATUS",
    "OUTCOME",
    "SUCCEEDED",
    "FAILED",
    "EXPIRED",
    "TERMINATED",
    "OPEN",
    "CREATED",
    "EXPIRES",
];

pub fn tasks(c: &Client, cmd: TasksCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        TasksCommand::Preview(args) => {
            let v: PreviewAnswer = c.post_as("/v1/tasks/preview", &args.into_json()?)?;
            Ok(if json_out { Output::Json(to_json(&v)?) } else { Output::Text(preview_text(&v.preview)) })
        }
        TasksCommand::Create(args) => {
            let v: TaskCreated = c.post_as("/v1/tasks", &args.into_json()?)?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let mut out = preview_text(&v.preview);
            out.push_str(&format!("task {} created with {} execution(s)", v.task.id, v.task.counts.total));
            Ok(Output::Text(out))
        }
        TasksCommand::List { status } => {
            let v: TaskList = c.get_as(&format!("/v1/tasks?status={status}"))?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let sm = &v.summary;
            let mut out = format!(
                "unfinished {}  done {}  |  succeeded {}  failed {}  expired {}  terminated {}  open {}\n\n",
                sm.unfinished, sm.done, sm.succeeded, sm.failed, sm.expired, sm.terminated, sm.open
            );
            let rows = v.tasks.iter().map(task_line).collect();
            out.push_str(&table(&TASK_HEADERS, rows));
            Ok(Output::Text(out))
        }
        TasksCommand::Show { id } => {
            let v: TaskDetail = c.get_as(&format!("/v1/tasks/{id}"))?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let mut out = table(&TASK_HEADERS, vec![task_line(&v.task)]);
            out.push('\n');
            let rows = v
                .executions
                .iter()
                .map(|e| {
                    vec![
                        e.sn.clone(),
                        e.state.clone(),
                        e.result
                            .filter(|r| *r != 0)
                            .map(|r| format!("{r} ({})", e.result_meaning.as_deref().unwrap_or("")))
                            .unwrap_or_default(),
                        if e.online { "online".into() } else { "offline".into() },
                        e.delivery_count.to_string(),
                        e.key_id.clone(),
                        e.kcv.clone(),
                        time(&json!(e.deadline)),
                        // A delivery the terminal refuses, and why.
                        e.last_refusal
                            .as_ref()
                            .map(|r| format!("{} at {}", r.code, time(&json!(r.at))))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["SN", "STATE", "ERROR", "CONNECTION", "SENT", "KSN / KEY ID", "KCV", "EXPIRES", "REFUSED"],
                rows,
            ));
            Ok(Output::Text(out))
        }
        TasksCommand::Stop { id, yes } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err("refusing to stop without confirmation: pass --yes".into());
                }
                eprint!("stop task {id}? its open executions end as manually terminated [y/N] ");
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer).map_err(|e| e.to_string())?;
                if !answer.trim().eq_ignore_ascii_case("y") {
                    return Err("not stopped".into());
                }
            }
            let v: TaskStopped = c.post_as(&format!("/v1/tasks/{id}/stop"), &json!({}))?;
            Ok(if json_out {
                Output::Json(to_json(&v)?)
            } else {
                Output::Text(format!("task {id}: {} execution(s) terminated; {}", v.terminated, v.task.outcome))
            })
        }
        TasksCommand::Watch { id, timeout_seconds } => {
            let started = Instant::now();
            loop {
                // The task and its counts alone: a fleet-wide task has thousands of executions.
                let v: TaskDetail = c.get_as(&format!("/v1/tasks/{id}?limit=0"))?;
                let (t, cn) = (&v.task, &v.task.counts);
                let open = t.open();
                eprint!(
                    "\rtask {id}: {}/{} succeeded, {} failed, {} expired, {} terminated, {} open ({:.0}s)   ",
                    cn.succeeded,
                    cn.total,
                    cn.failed,
                    cn.expired,
                    cn.terminated,
                    open,
                    started.elapsed().as_secs_f64()
                );
                if open == 0 {
                    eprintln!();
                    return Ok(if json_out {
                        // Done: the whole task, every execution.
                        Output::Json(to_json(&c.get_as::<TaskDetail>(&format!("/v1/tasks/{id}"))?)?)
                    } else {
                        Output::Text(format!("task {id} done: {}", t.outcome))
                    });
                }
                if timeout_seconds > 0 && started.elapsed() > Duration::from_secs(timeout_seconds) {
                    eprintln!();
                    return Err(format!("task {id} still has {open} open execution(s) after {timeout_seconds}s"));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

pub fn records(
    c: &Client,
    sn: Option<String>,
    task: Option<i64>,
    format: &str,
    json_out: bool,
) -> Result<Output, String> {
    let mut path = String::from("/v1/records?");
    if let Some(sn) = sn {
        path.push_str(&format!("sn={}&", enc(&sn)));
    }
    if let Some(t) = task {
        path.push_str(&format!("task={t}&"));
    }
    if format == "csv" && !json_out {
        return c.get_text(&format!("{path}format=csv")).map(|t| Output::Text(t.trim_end().to_string()));
    }
    let v = c.get(&path)?;
    if json_out || format == "json" {
        return Ok(Output::Json(v));
    }
    let rows = v["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    vec![
                        s(&r["sn"]),
                        s(&r["key_source"]),
                        s(&r["key_type"]),
                        s(&r["injection"]),
                        s(&r["result"]),
                        r["error_code"]
                            .as_i64()
                            .map(|e| format!("{e} ({})", s(&r["error_meaning"])))
                            .unwrap_or_default(),
                        time(&r["at"]),
                        s(&r["key_id"]),
                        s(&r["kcv"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Output::Text(table(
        &["SN", "KEY SOURCE", "KEY TYPE", "INJECTION", "RESULT", "ERROR", "TIME", "KSN / KEY ID", "KCV"],
        rows,
    )))
}

pub fn billing(c: &Client, json_out: bool) -> Result<Output, String> {
    let v = c.get("/v1/billing")?;
    if json_out {
        return Ok(Output::Json(v));
    }
    let rows = v["billing"]
        .as_array()
        .map(|a| a.iter().map(|b| vec![s(&b["month"]), s(&b["key_source"]), s(&b["keys"])]).collect())
        .unwrap_or_default();
    Ok(Output::Text(table(&["MONTH", "KEY SOURCE", "KEYS INJECTED"], rows)))
}

pub fn gudids(c: &Client, cmd: GudidsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        GudidsCommand::Provision { sns } => {
            let v = c.post("/v1/gudids", &json!({"sns": sns}))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["gudids"]
                .as_array()
                .map(|a| a.iter().map(|g| vec![s(&g["sn"]), s(&g["gudid"]), time(&g["expires_at"])]).collect())
                .unwrap_or_default();
            let mut out = table(&["SN", "GUDID (shown once)", "EXPIRES"], rows);
            let replaced = v["gudids"]
                .as_array()
                .map(|a| a.iter().filter(|g| g["revoked"].as_array().is_some_and(|r| !r.is_empty())).count())
                .unwrap_or(0);
            if replaced > 0 {
                out.push_str(&format!("revoked the earlier live GUDID of {replaced} SN(s): only the new one works\n"));
            }
            out.push_str("type each GUDID into its terminal; each works once, within 72 hours");
            Ok(Output::Text(out))
        }
        GudidsCommand::List { sn, live } => {
            let mut query = Vec::new();
            if let Some(sn) = sn {
                query.push(format!("sn={}", enc(&sn)));
            }
            if live {
                query.push("live=true".to_string());
            }
            let path =
                if query.is_empty() { "/v1/gudids".to_string() } else { format!("/v1/gudids?{}", query.join("&")) };
            let v = c.get(&path)?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["gudids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|g| {
                            vec![
                                s(&g["id"]),
                                s(&g["sn"]),
                                s(&g["status"]),
                                s(&g["provisioned_by"]),
                                time(&g["provisioned_at"]),
                                time(&g["expires_at"]),
                                time(&g["used_at"]),
                                time(&g["revoked_at"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(
                &["ID", "SN", "STATUS", "PROVISIONED BY", "PROVISIONED", "EXPIRES", "USED", "REVOKED"],
                rows,
            )))
        }
        GudidsCommand::Revoke { id } => {
            let v = c.post(&format!("/v1/gudids/{id}/revoke"), &json!({}))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let g = &v["gudid"];
            Ok(Output::Text(format!(
                "GUDID {} of {} revoked: it no longer initialises the terminal",
                s(&g["id"]),
                s(&g["sn"])
            )))
        }
    }
}

pub fn orgs(c: &Client, cmd: OrgsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        OrgsCommand::Create { name } => {
            let v = c.post("/v1/orgs", &json!({"name": name}))?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                Output::Text(format!(
                    "organization {name} created\nadmin token (shown once; keep it secret): {}",
                    s(&v["admin_token"])
                ))
            })
        }
        OrgsCommand::List => {
            let v = c.get("/v1/orgs")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["orgs"]
                .as_array()
                .map(|a| a.iter().map(|o| vec![s(&o["id"]), s(&o["name"]), time(&o["created_at"])]).collect())
                .unwrap_or_default();
            Ok(Output::Text(table(&["ID", "NAME", "CREATED"], rows)))
        }
    }
}

/// Reads components: from the file, or typed at a prompt with echo off. Each is `(key, KCV)`, the
/// key's hex in a zeroizing buffer, as is the file's text.
fn read_components(file: Option<PathBuf>) -> Result<Vec<(Zeroizing<String>, String)>, String> {
    let text: Zeroizing<String> = match file {
        Some(path) => Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?),
        None => {
            if !std::io::stdin().is_terminal() {
                return Err("components come from --components-file or a terminal prompt".into());
            }
            let mut text = Zeroizing::new(String::with_capacity(512));
            for i in 1..=3 {
                eprint!("component {i} as `HEXKEY KCV` (empty line to finish after 2): ");
                let _ = std::io::stderr().flush();
                let line = read_hidden()?;
                eprintln!();
                if line.trim().is_empty() {
                    break;
                }
                text.push_str(line.trim());
                text.push('\n');
            }
            text
        }
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, l)| {
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(key), Some(kcv), None) if hex(key) && hex(kcv) => {
                    Ok((Zeroizing::new(key.to_string()), kcv.into()))
                }
                _ => Err(format!("component {}: expected `HEXKEY KCV`, both in hex", i + 1)),
            }
        })
        .collect()
}

/// The JSON body of a ceremony request: `fields` (public) and the components, written into one
/// zeroizing buffer (sized up front, so it never reallocates and leaves a copy behind). Keys and
/// KCVs are hex, checked by [`read_components`], so they need no escaping.
fn ceremony_body(fields: &Value, components: &[(Zeroizing<String>, String)]) -> Result<Zeroizing<String>, String> {
    let fields = serde_json::to_string(fields).map_err(|e| e.to_string())?;
    let head = fields.strip_suffix('}').ok_or("request fields are not a JSON object")?;
    let size = head.len() + 32 + components.iter().map(|(k, c)| k.len() + c.len() + 32).sum::<usize>();
    let mut body = Zeroizing::new(String::with_capacity(size));
    body.push_str(head);
    body.push_str(if head.len() > 1 { ",\"components\":[" } else { "\"components\":[" });
    for (i, (key, kcv)) in components.iter().enumerate() {
        body.push_str(if i == 0 { "{\"key\":\"" } else { ",{\"key\":\"" });
        body.push_str(key);
        body.push_str("\",\"kcv\":\"");
        body.push_str(kcv);
        body.push_str("\"}");
    }
    body.push_str("]}");
    Ok(body)
}

/// Reads one line from the terminal without echo (stty), so a component is not shown.
fn read_hidden() -> Result<Zeroizing<String>, String> {
    let stty = |arg: &str| std::process::Command::new("stty").arg(arg).stdin(std::process::Stdio::inherit()).status();
    let echo_off = stty("-echo").map(|s| s.success()).unwrap_or(false);
    let mut line = Zeroizing::new(String::with_capacity(256));
    let read = std::io::stdin().lock().read_line(&mut line);
    if echo_off {
        let _ = stty("echo");
    }
    read.map_err(|e| e.to_string())?;
    Ok(line)
}

pub fn key_sources(c: &Client, cmd: KeySourcesCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        KeySourcesCommand::Authorize { org, name, algorithm, components_file, kcv } => {
            let components = read_components(components_file)?;
            let mut fields = json!({"name": name, "algorithm": algorithm});
            if let Some(k) = kcv {
                fields["kcv"] = json!(k);
            }
            let body = ceremony_body(&fields, &components)?;
            let v = c.post_secret(&format!("/v1/orgs/{}/key-sources", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["key_source"];
                Output::Text(format!(
                    "key source {} authorized for {org}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeySourcesCommand::Import { org, name, algorithm, kek, key_block, kcv } => {
            let mut body = json!({"name": name, "algorithm": algorithm, "kek": kek, "key_block": key_block});
            if let Some(k) = kcv {
                body["kcv"] = json!(k);
            }
            let v = c.post(&format!("/v1/orgs/{}/key-sources", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["key_source"];
                Output::Text(format!(
                    "key source {} imported for {org} under KEK {kek}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeySourcesCommand::List => {
            let v = c.get("/v1/key-sources")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["key_sources"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| vec![s(&k["name"]), s(&k["algorithm"]), s(&k["kcv"]), time(&k["created_at"])])
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(&["KEY SOURCE", "ALGORITHM", "KCV", "AUTHORIZED"], rows)))
        }
    }
}

pub fn keks(c: &Client, cmd: KeksCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        KeksCommand::Create { org, name, algorithm, components_file, kcv } => {
            let components = read_components(components_file)?;
            let mut fields = json!({"name": name, "algorithm": algorithm});
            if let Some(k) = kcv {
                fields["kcv"] = json!(k);
            }
            let body = ceremony_body(&fields, &components)?;
            let v = c.post_secret(&format!("/v1/orgs/{}/keks", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["kek"];
                Output::Text(format!(
                    "KEK {} entered for {org}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeksCommand::List => {
            let v = c.get("/v1/keks")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["keks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| {
                            vec![s(&k["org"]), s(&k["name"]), s(&k["algorithm"]), s(&k["kcv"]), time(&k["created_at"])]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(&["ORG", "KEK", "ALGORITHM", "KCV", "CREATED"], rows)))
        }
    }
}

pub fn audit(c: &Client, limit: i64, json_out: bool) -> Result<Output, String> {
    let v = c.get(&format!("/v1/audit?limit={limit}"))?;
    if json_out {
        return Ok(Output::Json(v));
    }
    let rows = v["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    vec![
                        time(&e["at"]),
                        s(&e["actor"]),
                        s(&e["token_id"]),
                        s(&e["action"]),
                        s(&e["object"]),
                        e["details"].to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Output::Text(table(&["TIME", "WHO", "TOKEN", "ACTION", "OBJECT", "DETAILS"], rows)))
}

pub fn clock(c: &Client, cmd: ClockCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        ClockCommand::Advance { seconds } => clock_step(c, i64::from(seconds), json_out),
        ClockCommand::Step { seconds } => clock_step(c, seconds, json_out),
    }
}

fn clock_step(c: &Client, seconds: i64, json_out: bool) -> Result<Output, String> {
    let v = c.post("/v1/admin/clock", &json!({"advance_seconds": seconds}))?;
    Ok(if json_out {
        Output::Json(v)
    } else {
        Output::Text(format!(
            "clock now {} (offset {} ms); {} execution(s) expired",
            time(&v["now"]),
            s(&v["offset_ms"]),
            s(&v["expired"])
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ceremony_body_is_the_json_of_its_fields_and_components() {
        let dir = std::env::temp_dir().join(format!("rkictl-components-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("components.txt");
        std::fs::write(&file, "# custodians A and B\n0123456789ABCDEFFEDCBA9876543210 08D7B4\n\n 00000000000000000000000000000000  8CA64D \n")
            .expect("write");
        let components = read_components(Some(file.clone())).expect("components");
        let body = ceremony_body(&json!({"name": "bdk \"1\"", "kcv": "08D7B4"}), &components).expect("body");
        let parsed: Value = serde_json::from_str(&body).expect("JSON");
        let expected = json!({"name": "bdk \"1\"", "kcv": "08D7B4", "components": [
            {"key": "0123456789ABCDEFFEDCBA9876543210", "kcv": "08D7B4"},
            {"key": "00000000000000000000000000000000", "kcv": "8CA64D"},
        ]});
        assert_eq!(parsed, expected);
        for bad in ["0123\"456 08D7B4\n", "0123456789ABCDEF\n", "01 02 03\n"] {
            std::fs::write(&file, bad).expect("write");
            assert!(read_components(Some(file.clone())).is_err(), "{bad:?} accepted");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(time(&json!(1_795_604_341_670_i64)), "2026-11-25 10:59:01");
    }
}
