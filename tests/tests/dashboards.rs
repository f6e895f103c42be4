//! The Grafana dashboard and the alert rules ask only for what the gateway exports, in PromQL that
//! parses and evaluates.
//!
//! - Every expression of `deploy/grafana/dashboards/rki-gateway.json` and of
//!   `deploy/prometheus/alerts.yml` parses (`promtool check rules` on a generated file that holds
//!   each one as a recording rule) and names only metrics declared in `gateway/src/metrics.rs`
//!   (histograms with their `_bucket`, `_sum` and `_count` series) or Prometheus's `up`, and only
//!   labels the gateway or Prometheus set.
//! - Against a live Prometheus scraping a real gateway through a small push, every expression
//!   evaluates without error, and every dashboard expression returns data.
//! - The dashboard's structure: provisioned datasource uid, unique panel ids, the `org` variable.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package, installed by `.ci/run`);
//! without them the tests that run them fail. The structure checks need neither.

mod common;
#[path = "support/prometheus.rs"]
mod prometheus_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rki_gateway::api::types::TaskRequest;
use rki_protocol::frame::MacKey;
use rki_protocol::message::{Ack, Message};
use rki_protocol::terminal::{InjectionType, KeySlot};
use rki_protocol::SecretBytes;
use rki_tests::{
    create_task, for_group, mqtt_connect, provision, sns, temp_dir, wait, wait_task, GatewayOptions, GatewayProcess,
    RawDevice, TestResult,
};
use serde_json::{json, Value};

use prometheus_support::{prometheus_tools, Prometheus};

/// Label names an expression may use: the gateway's (see `LABEL_KEYS` in `gateway/src/metrics.rs`),
/// the histogram bucket bound, and the two every scrape adds.
const LABELS: &[&str] = &[
    "org", "state", "status", "result", "kind", "reason", "code", "from", "window", "file", "version", "le", "job",
    "instance",
];
/// PromQL words that are neither metrics nor labels.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
/// Values for Grafana's variables, so that an expression becomes plain PromQL.
const GRAFANA_VARIABLES: &[(&str, &str)] =
    &[("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"), ("$org", ".*")];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard() -> TestResult<Value> {
    let path = repo().join("deploy/grafana/dashboards/rki-gateway.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(where, PromQL)` of every dashboard target, with Grafana's variables substituted.
fn dashboard_expressions() -> TestResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in panels(&dashboard()?) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let mut expr =
                t["expr"].as_str().ok_or_else(|| format!("panel {}: a target without expr", p["title"]))?.to_string();
            for (variable, value) in GRAFANA_VARIABLES {
                expr = expr.replace(variable, value);
            }
            assert!(!expr.contains('$'), "panel {}: unknown Grafana variable in {expr}", p["title"]);
            out.push((format!("panel {} ({})", p["title"], t["refId"]), expr));
        }
    }
    Ok(out)
}

/// `(alert, PromQL)` of every rule in alerts.yml. The file keeps to two forms, which this reads
/// without a YAML library: `expr: ONE LINE`, or `expr: >-` followed by more-indented lines.
fn alert_expressions() -> TestResult<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml"))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = name.trim().to_string();
        } else if let Some(expr) = trimmed.strip_prefix("expr: ") {
            let expr = expr.trim();
            if expr == ">-" || expr == ">" || expr == "|" {
                let indent = line.len() - trimmed.len();
                let body: Vec<&str> = lines[i + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                    .map(|l| l.trim())
                    .collect();
                out.push((alert.clone(), body.join(" ").trim().to_string()));
            } else {
                out.push((alert.clone(), expr.to_string()));
            }
        }
    }
    let alerts = lines.iter().filter(|l| l.trim_start().starts_with("- alert: ")).count();
    assert_eq!(out.len(), alerts, "one expr per alert");
    Ok(out)
}

/// Metric names the gateway exports, from `gateway/src/metrics.rs`: every `pub const … = "rki_…"`,
/// and for histograms their `_bucket`, `_sum` and `_count` series.
fn exported_series() -> TestResult<BTreeSet<String>> {
    let source = std::fs::read_to_string(repo().join("gateway/src/metrics.rs"))?;
    let mut constants = Vec::new();
    for line in source.lines() {
        if let Some((constant, rest)) = line.strip_prefix("pub const ").and_then(|l| l.split_once(": &str = \"")) {
            constants.push((constant.to_string(), rest.split('"').next().unwrap_or_default().to_string()));
        }
    }
    let histograms: Vec<&str> =
        source.split("describe_histogram!(").skip(1).filter_map(|call| call.split(',').next()).map(str::trim).collect();
    let mut out = BTreeSet::from(["up".to_string()]);
    for (constant, name) in constants {
        out.insert(name.clone());
        if histograms.contains(&constant.as_str()) {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    assert!(out.len() > 25, "read only {out:?} from metrics.rs");
    Ok(out)
}

/// The metric names and label names an expression uses. Strings are dropped first; label names
/// are those of `{…}` matchers and of `by`/`without`/`on`/`ignoring`/`group_*` lists; function and
/// aggregation names are identifiers followed by `(`.
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut plain = String::new();
    let mut in_string = false;
    for c in expr.chars() {
        match (in_string, c) {
            (false, '"') => in_string = true,
            (true, '"') => {
                in_string = false;
                plain.push_str("\"\"");
            }
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    let tokens: Vec<(usize, String)> = {
        let mut out = Vec::new();
        let chars: Vec<char> = plain.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                out.push((start, chars[start..i].iter().collect()));
            } else if chars[i].is_ascii_digit() || chars[i] == '.' {
                // Numbers and durations (5m, 1h, 0.99, 1e3).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
        out
    };
    let chars: Vec<char> = plain.chars().collect();
    let next_non_space = |from: usize| chars[from..].iter().find(|c| !c.is_whitespace()).copied();
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut depth_brace = 0usize;
    let mut label_list_depth: Option<usize> = None;
    let mut paren_depth = 0usize;
    let mut pending_label_list = false;
    let mut token_iter = tokens.into_iter().peekable();
    for (i, c) in chars.iter().enumerate() {
        while let Some((start, word)) = token_iter.peek().cloned() {
            if start != i {
                break;
            }
            token_iter.next();
            let after = next_non_space(start + word.len());
            let rest: String = chars[start + word.len()..].iter().collect();
            let next_word: String =
                rest.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if depth_brace > 0 || label_list_depth.is_some() {
                labels.insert(word);
            } else if matches!(word.as_str(), "by" | "without" | "on" | "ignoring" | "group_left" | "group_right") {
                pending_label_list = after == Some('(');
            } else if after == Some('(')
                || matches!(next_word.as_str(), "by" | "without")
                || KEYWORDS.contains(&word.to_lowercase().as_str())
            {
                // A function, an aggregation (`sum (…)`, `sum by (…) (…)`) or an operator.
            } else {
                metrics.insert(word);
            }
        }
        match c {
            '{' => depth_brace += 1,
            '}' => depth_brace = depth_brace.saturating_sub(1),
            '(' => {
                paren_depth += 1;
                if pending_label_list {
                    label_list_depth = Some(paren_depth);
                    pending_label_list = false;
                }
            }
            ')' => {
                if label_list_depth == Some(paren_depth) {
                    label_list_depth = None;
                }
                paren_depth = paren_depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    (metrics, labels)
}

#[test]
fn the_expression_reader_finds_metrics_and_labels() {
    let (metrics, labels) = names_in(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(rki_store_commit_seconds_bucket{from="x y"}[5m]))) > 0.25
           and on (org) rki_devices_connected / (rki_mqtt_connections_max > bool 0) or absent(up{job="rki-gateway"})"#,
    );
    assert_eq!(
        metrics.into_iter().collect::<Vec<_>>(),
        ["rki_devices_connected", "rki_mqtt_connections_max", "rki_store_commit_seconds_bucket", "up"]
    );
    assert_eq!(labels.into_iter().collect::<Vec<_>>(), ["from", "instance", "job", "le", "org"]);
}

#[test]
fn the_dashboard_is_provisioned_against_the_shipped_datasource_with_unique_panels() -> TestResult {
    let d = dashboard()?;
    let datasource = std::fs::read_to_string(repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"))?;
    let provider = std::fs::read_to_string(repo().join("deploy/grafana/provisioning/dashboards/rki.yml"))?;
    assert!(datasource.contains("uid: rki-prometheus"), "the provisioned datasource uid");
    assert!(provider.contains("path: /var/lib/grafana/dashboards/rki"), "where compose mounts the dashboards");
    assert_eq!(d["uid"], "rki-gateway");
    let mut ids = BTreeSet::new();
    let all = panels(&d);
    for p in &all {
        assert!(ids.insert(p["id"].as_i64().ok_or("panel without id")?), "panel id {} twice", p["id"]);
        if p["type"] == "row" {
            continue;
        }
        assert!(!p["title"].as_str().unwrap_or_default().is_empty(), "a panel without a title");
        assert!(!p["description"].as_str().unwrap_or_default().is_empty(), "panel {} says what it shows", p["title"]);
        assert_eq!(p["datasource"]["uid"], "rki-prometheus", "panel {}", p["title"]);
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "rki-prometheus", "panel {}", p["title"]);
        }
    }
    // The sections the issue asks for.
    let rows: Vec<&str> = all.iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Fleet overview",
        "Push progress",
        "Delivery latency",
        "Rejections",
        "Keys injected per organization",
        "Broker",
        "Store",
    ] {
        assert!(rows.contains(&wanted), "no row {wanted:?} in {rows:?}");
    }
    // The organization variable lists what rki_executions carries.
    let org = &d["templating"]["list"][0];
    assert_eq!(org["name"], "org");
    assert_eq!(org["query"]["query"], "label_values(rki_executions, org)");
    assert!(exported_series()?.contains("rki_executions"));
    Ok(())
}

/// Every dashboard and alert expression, each as a recording rule named after its index.
fn rules_file(expressions: &[(String, String)]) -> String {
    let mut out = String::from("groups:\n  - name: dashboard-and-alert-expressions\n    rules:\n");
    for (i, (_, expr)) in expressions.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        out.push_str(&format!("      - record: check:expression_{i}\n        expr: {}\n", json!(expr)));
    }
    out
}

fn all_expressions() -> TestResult<Vec<(String, String)>> {
    let mut all = dashboard_expressions()?;
    all.extend(alert_expressions()?.into_iter().map(|(alert, expr)| (format!("alert {alert}"), expr)));
    assert!(all.len() > 40, "read only {} expressions", all.len());
    Ok(all)
}

#[test]
fn every_dashboard_and_alert_expression_parses_and_names_only_what_the_gateway_exports() -> TestResult {
    let exported = exported_series()?;
    let all = all_expressions()?;
    for (place, expr) in &all {
        let (metrics, labels) = names_in(expr);
        assert!(!metrics.is_empty(), "{place}: no metric in {expr}");
        for m in metrics {
            assert!(exported.contains(&m), "{place}: {m} is not exported by the gateway ({expr})");
        }
        for l in labels {
            assert!(LABELS.contains(&l.as_str()), "{place}: label {l} is not one the gateway sets ({expr})");
        }
    }
    let (_, promtool) = prometheus_tools()?;
    let dir = temp_dir("promql");
    let path = dir.join("expressions.yml");
    std::fs::write(&path, rules_file(&all))?;
    let out = Command::new(promtool).arg("check").arg("rules").arg(&path).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "promtool refused an expression:\n{text}\n(expression_N is the Nth of {all:#?})");
    assert!(text.contains(&format!("SUCCESS: {} rules found", all.len())), "{text}");
    Ok(())
}

#[test]
fn every_dashboard_and_alert_expression_evaluates_against_a_live_prometheus() -> TestResult {
    let (server, _) = prometheus_tools()?;
    let rt = common::runtime();
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let api = gw.api();
    let all = all_expressions()?;
    let dir = temp_dir("dash-rules");
    let generated = dir.join("expressions.yml");
    std::fs::write(&generated, rules_file(&all))?;
    let prometheus = Prometheus::start(
        &server,
        &format!("127.0.0.1:{}", gw.http_port),
        &[repo().join("deploy/prometheus/alerts.yml"), generated],
    )?;

    // A small push that feeds every panel: 3 terminals ack (2 online before the task, 1 whose hello
    // after it triggers the delivery), 1 is never seen, plus one of each refusal the dashboard
    // counts.
    let provisioned = provision(&gw, &sns("DASH", 4), "shop")?;
    let mut devices = Vec::new();
    for (sn, gudid) in &provisioned.gudids {
        devices.push(rt.block_on(RawDevice::initialise(gw.mqtt_port, sn, gudid))?);
    }
    for device in devices.iter_mut().take(2) {
        rt.block_on(device.send(RawDevice::hello(false)))?;
    }
    gw.wait_online(&[&devices[0].sn, &devices[1].sn], true)?;
    let task = create_task(&api, &TaskRequest { expiry_days: Some(3), ..for_group("shop") })?.task.id;
    rt.block_on(devices[2].send(RawDevice::hello(false)))?;
    for device in devices.iter_mut().take(3) {
        let Message::Download(d) = rt.block_on(device.next_down(Duration::from_secs(10)))? else {
            return Err("expected a download".into());
        };
        let ack = Ack {
            execution_id: d.execution_id,
            result: 0,
            slot: d.slot,
            key_id: d.key_id,
            kcv: d.kcv,
            injection: InjectionType::Auto,
        };
        rt.block_on(device.send(Message::Ack(ack)))?;
    }
    wait_task(&api, task, Duration::from_secs(10), |c| c.succeeded == 3)?;
    let forger = MacKey::new(SecretBytes::from_slice(&[7u8; 32]))?;
    let forged = Ack {
        execution_id: 1,
        result: 0,
        slot: KeySlot(1),
        key_id: vec![0; 10],
        kcv: vec![0; 3],
        injection: InjectionType::Auto,
    };
    rt.block_on(devices[0].send_with(&forger, Message::Ack(forged)))?;
    let (sn, used) = provisioned.gudids[0].clone();
    assert!(rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &used)).is_err());
    assert!(rt.block_on(mqtt_connect(gw.mqtt_port, "NOSUCHSN", "x", false)).is_err());
    assert_eq!(api.get("/v1/tasks/999999").0, 404);

    // Rates need two samples of a series inside their window, and the sampler runs every 5 s. Each
    // poll queries every panel: about once a second. A query Prometheus refuses fails at once.
    let panels =
        wait::poll_paced("data in every dashboard panel", Duration::from_secs(40), Duration::from_secs(1), || {
            let mut empty = Vec::new();
            for (place, expr) in all.iter().filter(|(place, _)| place.starts_with("panel")) {
                match prometheus.query(expr) {
                    Ok(result) if result.is_empty() => empty.push(format!("{place}: {expr}")),
                    Ok(_) => {}
                    Err(e) => return Ok(Err(format!("{place}: {e}"))),
                }
            }
            if empty.is_empty() {
                Ok(Ok(()))
            } else {
                Err(format!("dashboard expressions with no data after a push:\n{}", empty.join("\n")))
            }
        });
    panels??;
    // Alert expressions evaluate without error (most are rightly empty: nothing is wrong).
    for (place, expr) in all.iter().filter(|(place, _)| place.starts_with("alert")) {
        prometheus.query(expr).map_err(|e| format!("{place}: {e}"))?;
    }
    // And as rules, on Prometheus's own evaluation loop.
    let rules = prometheus.api("rules", &[])?;
    let mut healthy = 0;
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(rule["health"], "ok", "rule {} failed: {}", rule["name"], rule["lastError"]);
            healthy += 1;
        }
    }
    assert!(healthy >= all.len(), "{healthy} rules evaluated, expected {} and the alerts", all.len());
    // The dashboard's organization variable finds the organization.
    let orgs = prometheus.api("label/org/values", &[("match[]", "rki_executions")])?;
    assert_eq!(orgs, json!(["acme"]));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
