//! The load tester end to end, on small fleets: each scenario runs the real `rki-loadtest` binary,
//! which starts the real gateway (or Mosquitto, or rumqttd alone) and its simulated terminals, and
//! its `--json` summary is checked for what the tool promises: every key verified, nothing lost or
//! injected twice, and the figures it reports present and consistent. A bad argument is refused
//! with a clear message before anything starts.

use std::path::Path;
use std::process::{Command, Output};

use rki_tests::{temp_dir, TestResult};
use serde_json::Value;

/// Small enough for CI on two cores, large enough to spread over several destination addresses.
const DEVICES: u64 = 24;

fn loadtest(args: &[&str]) -> TestResult<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_rki-loadtest")).args(args).output()?)
}

/// Runs a scenario with `--quiet --json` in a work directory of its own; returns the summary.
fn summary(work: &Path, args: &[&str]) -> TestResult<Value> {
    let mut all = vec!["--quiet", "--json"];
    all.extend_from_slice(args);
    let work = work.display().to_string();
    if args[0] != "engine" {
        // A phase that stalls fails the test in two minutes rather than the tool's fifteen.
        all.extend_from_slice(&["--work-dir", &work, "--timeout-s", "120"]);
    }
    let out = loadtest(&all)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("rki-loadtest {args:?} failed ({}): {stderr}", out.status).into());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("not one JSON object ({e}); stderr: {stderr}").into())
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` missing or not a number in {v}"))
}

/// What every terminal scenario must report: all verified, none lost or duplicated, and the
/// gateway's figures read from /proc.
fn assert_every_key_verified(v: &Value, scenario: &str) {
    assert_eq!(v["scenario"], scenario);
    assert_eq!(number(v, "devices"), DEVICES as f64);
    assert_eq!(number(v, "acks_verified"), DEVICES as f64, "{v}");
    assert_eq!((number(v, "lost"), number(v, "duplicates")), (0.0, 0.0), "{v}");
    assert!(number(v, "push_seconds") > 0.0 && number(v, "keys_per_second") > 0.0, "{v}");
    let l = &v["latency_ms"];
    let (p50, p95, p99, max) = (number(l, "p50"), number(l, "p95"), number(l, "p99"), number(l, "max"));
    assert!(0.0 <= p50 && p50 <= p95 && p95 <= p99 && p99 <= max, "latency quantiles out of order: {l}");
    assert!(number(v, "gateway_rss_peak_bytes") > 1e6, "{v}");
    assert!(number(v, "gateway_cpu_seconds") >= 0.0, "{v}");
    // The failed connection attempts by kind are part of all the errors.
    let (refused, timed_out) = (number(&v["extra"], "connects_refused"), number(&v["extra"], "connects_timed_out"));
    assert!(refused + timed_out <= number(v, "errors"), "{v}");
}

#[test]
fn fleet_push_verifies_every_key_and_plots_the_delivery_curve() -> TestResult {
    let work = temp_dir("lt-push");
    let plot = work.join("curve.png");
    let plot_arg = plot.display().to_string();
    let n = DEVICES.to_string();
    let v = summary(&work, &["fleet-push", "--devices", &n, "--addresses", "4", "--plot", &plot_arg])?;
    assert_every_key_verified(&v, "fleet-push");
    assert!(number(&v, "connect_seconds") > 0.0 && number(&v, "bytes_per_device") > 0.0, "{v}");
    assert_eq!(v["extra"]["gateway_saw_every_hello"], true);
    assert_eq!(number(&v["extra"], "rejected"), 0.0, "{v}");
    // The delivery curve ends with every terminal acked, in time order.
    let curve = v["curve"].as_array().ok_or("no curve")?;
    let last = curve.last().ok_or("empty curve")?;
    assert_eq!(last[1].as_f64(), Some(DEVICES as f64));
    assert!(curve.windows(2).all(|w| w[0][0].as_f64() <= w[1][0].as_f64()), "curve not in time order");
    let png = std::fs::read(&plot)?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1_000, "not a PNG: {} bytes", png.len());
    // The gateway's directory is removed without --keep.
    assert!(!work.join(format!("gateway-fleet-push-{DEVICES}")).exists());
    Ok(())
}

#[test]
fn a_reconnect_storm_delivers_every_open_execution_after_a_sigkill() -> TestResult {
    let work = temp_dir("lt-storm");
    let n = DEVICES.to_string();
    let v = summary(&work, &["reconnect-storm", "--devices", &n, "--addresses", "4", "--keep"])?;
    assert_every_key_verified(&v, "reconnect-storm");
    let extra = &v["extra"];
    // Every execution is still open at the kill (the terminals hold their acks until then), and
    // the new process published a download for each of them.
    assert_eq!(number(extra, "open_executions_at_restart"), DEVICES as f64, "{v}");
    assert!(number(extra, "restart_to_all_open_delivered_seconds") > 0.0, "{v}");
    let (healthy, acked) = (number(extra, "restart_to_healthy_seconds"), number(extra, "restart_to_all_acked_seconds"));
    assert!(0.0 < healthy && healthy <= acked, "{v}");
    assert!(number(extra, "restart_to_all_reconnected_seconds") >= healthy, "{v}");
    // --keep leaves the gateway's directory, with one log per start.
    let dir = work.join(format!("gateway-reconnect-storm-{DEVICES}"));
    assert!(dir.join("gateway-1.log").exists() && dir.join("gateway-2.log").exists());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[test]
fn churn_loses_nothing_and_injects_nothing_twice() -> TestResult {
    let work = temp_dir("lt-churn");
    let n = DEVICES.to_string();
    let v = summary(&work, &["churn", "--devices", &n, "--addresses", "4"])?;
    assert_every_key_verified(&v, "churn");
    assert!(number(&v["extra"], "churn_events") > 0.0, "{v}");
    Ok(())
}

#[test]
fn broker_baseline_runs_the_same_fleet_on_mosquitto_and_on_rumqttd_alone() -> TestResult {
    for broker in ["mosquitto", "rumqttd"] {
        let work = temp_dir("lt-baseline");
        let n = DEVICES.to_string();
        let v = summary(&work, &["broker-baseline", "--devices", &n, "--baseline-broker", broker])?;
        assert_eq!(number(&v, "devices"), DEVICES as f64);
        assert_eq!(number(&v, "acks_verified"), DEVICES as f64, "{broker}: {v}");
        assert_eq!((number(&v, "lost"), number(&v, "duplicates")), (0.0, 0.0), "{broker}: {v}");
        assert!(number(&v, "push_seconds") > 0.0 && number(&v, "gateway_rss_peak_bytes") > 0.0, "{broker}: {v}");
    }
    Ok(())
}

#[test]
fn the_engine_scenario_creates_a_task_for_every_device_without_sockets() -> TestResult {
    let work = temp_dir("lt-engine");
    let (cache, build, store) = (work.join("cache"), work.join("build"), work.join("store"));
    let (cache, build, store) = (cache.display().to_string(), build.display().to_string(), store.display().to_string());
    let args = [
        "engine",
        "--devices",
        "1500",
        "--cache-dir",
        &cache,
        "--build-dir",
        &build,
        "--work-dir",
        &store,
        "--rebuild",
    ];
    let v = summary(&work, &args)?;
    assert_eq!(v["scenario"], "engine");
    assert_eq!(number(&v, "devices"), 1500.0);
    let extra = &v["extra"];
    assert!(number(&v, "push_seconds") >= number(extra, "derive_and_wrap_seconds"), "{v}");
    assert!(number(&v, "gateway_rss_peak_bytes") > 0.0 && number(extra, "store_bytes_after") > 0.0, "{v}");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() -> TestResult {
    for (args, expected) in [
        (&["fleet-push", "--devices", "0"][..], "at least 1 device"),
        (&["fleet-push", "--sweep", "100,0"][..], "at least 1 device"),
        (&["fleet-push", "--sweep", "100,many"][..], "not a number of devices"),
        (&["fleet-push", "--addresses", "0"][..], "--addresses"),
        (&["engine", "--devices", "0"][..], "at least 1 device"),
        (&["churn", "--churn-fraction", "1.5"][..], "not a share of the fleet"),
    ] {
        let out = loadtest(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} was not refused as a usage error: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed a summary");
    }
    Ok(())
}
