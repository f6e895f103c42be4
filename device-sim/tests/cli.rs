//! The `rki-device-sim` binary: a technician's session on a stored terminal (key query, slot reset,
//! manual injection), a fleet run from a CSV file, and the one-line reasons for bad input.

mod common;

use std::process::Output;

use common::{temporary_state_dir, Tag, TestNet, WAIT};
use rki_device_sim::{DeviceConfig, StateStore};
use rki_protocol::message::Message;
use rki_protocol::terminal::{InjectionType, KeySlot};

/// Runs the binary with `args` off the async runtime, so the fake gateway keeps working.
async fn sim(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rki-device-sim")).args(&args).output().expect("run binary")
    })
    .await
    .expect("join")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failure with exactly one line of reason on stderr, containing `needle`.
fn assert_refused(output: &Output, needle: &str) {
    assert!(!output.status.success(), "should fail: {}", stdout(output));
    let text = stderr(output);
    assert_eq!(text.trim_end().lines().count(), 1, "one line of reason: {text:?}");
    assert!(text.contains(needle), "{needle:?} not in {text:?}");
}

#[tokio::test]
async fn a_technician_queries_resets_the_debug_slot_and_forces_the_refused_key_from_the_cli() {
    let net = TestNet::start().await;
    let sn = "CLI0001";
    let dir = temporary_state_dir("cli-technician");
    let state_dir = dir.to_str().expect("utf-8 path");
    let profile = TestNet::profile(sn).with_debug_key(true);
    let config = DeviceConfig::new(profile, net.broker.addr.clone(), StateStore::directory(&dir));
    let device = net.initialised_device(config).await;
    net.gateway.send(sn, Message::Download(net.gateway.tdes_download(sn, 1, KeySlot::PRODUCTION)), Tag::Device);
    assert_eq!(net.gateway.wait_ack(sn, 1, 1).await.result, -3000);
    device.wait_for("ack confirmed", WAIT, |s| s.unconfirmed_acks == 0).await.expect("confirmed");
    device.shutdown().await;

    let query = sim(&["key-query", "--state-dir", state_dir, "--sn", sn]).await;
    assert!(query.status.success(), "{}", stderr(&query));
    let screen = stdout(&query);
    assert!(screen.lines().any(|l| l.starts_with("8 ") && l.contains("08D7B4")), "{screen}");
    assert!(screen.lines().any(|l| l.starts_with("1 ") && l.contains("null")), "{screen}");
    assert!(screen.contains("kept refused download: execution 1"), "{screen}");

    let broker = net.broker.addr.to_string();
    let refused = sim(&["force-manual", "--state-dir", state_dir, "--sn", sn, "--broker", &broker]).await;
    assert_refused(&refused, "-3000");

    let reset = sim(&["reset-slot", "--state-dir", state_dir, "--sn", sn, "--slot", "8"]).await;
    assert!(reset.status.success(), "{}", stderr(&reset));
    assert!(stdout(&reset).contains("slot 8 emptied"));

    let forced = sim(&["force-manual", "--state-dir", state_dir, "--sn", sn, "--broker", &broker, "--json"]).await;
    assert!(forced.status.success(), "{}", stderr(&forced));
    let manual = net.gateway.wait_ack(sn, 1, 2).await;
    assert_eq!((manual.result, manual.injection), (0, InjectionType::Manual));
    assert_eq!(Some(manual.kcv.clone()), net.gateway.expected_kcv(1));
    let printed: serde_json::Value = serde_json::from_str(stdout(&forced).trim()).expect("json");
    assert_eq!(printed["injection"], "manual");

    let query = sim(&["key-query", "--state-dir", state_dir, "--sn", sn, "--json"]).await;
    let slots: serde_json::Value = serde_json::from_str(stdout(&query).trim()).expect("json");
    assert_eq!(slots["locked"], true);
    assert_eq!(slots["slots"][0]["index"], 1);
    assert_eq!(slots["slots"][0]["kcv"], hex::encode_upper(&manual.kcv));

    let again = sim(&["force-manual", "--state-dir", state_dir, "--sn", sn, "--broker", &broker]).await;
    assert_refused(&again, "nothing to force");
    net.gateway.assert_clean_up_channel(sn);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_fleet_from_a_csv_file_initialises_and_connects_then_stops_after_its_duration() {
    let net = TestNet::start().await;
    let dir = temporary_state_dir("cli-run");
    let mut csv = String::from("sn,gudid,model,rom,app,region\n");
    for n in 1..=5 {
        let sn = format!("CSV{n:03}");
        csv.push_str(&format!("{sn},{},P3H,3.0.4,1.0.0,CN\n", net.gateway.provision(&sn)));
    }
    let csv_path = dir.join("fleet.csv");
    std::fs::write(&csv_path, csv).expect("csv");
    let broker = net.broker.addr.to_string();
    let output = sim(&[
        "run",
        "--csv",
        csv_path.to_str().expect("path"),
        "--broker",
        &broker,
        "--state-dir",
        dir.join("state").to_str().expect("path"),
        "--duration-s",
        "3",
        "--json",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(stdout(&output).trim()).expect("json");
    assert_eq!(summary["terminals"], 5);
    assert_eq!(summary["initialised"], 5);
    assert_eq!(summary["connected"], 5);
    assert!(stderr(&output).contains("connected 5"), "live status line: {}", stderr(&output));
    let hello = net.gateway.wait_hellos("CSV003", 1).await;
    assert_eq!((hello.model.as_str(), hello.app_version.as_str()), ("P3H", "1.0.0"));
    assert!(dir.join("state").join("CSV003.state.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn every_bad_input_exits_non_zero_with_a_one_line_reason() {
    let dir = temporary_state_dir("cli-bad");
    let state_dir = dir.to_str().expect("path");
    let missing = dir.join("missing");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["key-query", "--state-dir", missing.to_str().expect("path"), "--sn", "X1"], "does not exist"),
        (vec!["key-query", "--state-dir", state_dir, "--sn", "NOBODY"], "no state for NOBODY"),
        (vec!["key-query", "--state-dir", state_dir, "--sn", "a/b"], "serial number"),
        (vec!["reset-slot", "--state-dir", state_dir, "--sn", "X1", "--slot", "eight"], "invalid value"),
        (vec!["force-manual", "--state-dir", state_dir, "--sn", "X1", "--broker", "nowhere"], "HOST:PORT"),
        (vec!["run", "--count", "3"], "--broker"),
        (vec!["run", "--count", "3", "--broker", "localhost"], "HOST:PORT"),
        (vec!["run", "--count", "0", "--broker", "127.0.0.1:1883"], "at least 1"),
        (vec!["run", "--count", "3", "--broker-range", "127.0.0.9-127.0.0.1:1883"], "range"),
        (vec!["run", "--count", "3", "--broker", "127.0.0.1:1883", "--pattern", "SIM"], "placeholder"),
        (vec!["run", "--count", "3", "--broker", "127.0.0.1:1883", "--model", "P9"], "unknown model"),
        (vec!["run", "--count", "3", "--broker", "127.0.0.1:1883", "--region", "US"], "unknown region"),
        (
            vec!["run", "--count", "3", "--broker", "127.0.0.1:1883", "--fail-fraction", "0.1", "--fail-code", "12"],
            "not a terminal error code",
        ),
        (vec!["run", "--count", "3", "--broker", "127.0.0.1:1883", "--fail-fraction", "2"], "0..=1"),
        (vec!["run", "--sn", "A1", "--gudid", "1234", "--broker", "127.0.0.1:1883"], "32 hex digits"),
        (vec!["run", "--csv", "/nonexistent/fleet.csv", "--broker", "127.0.0.1:1883"], "/nonexistent/fleet.csv"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, needle) in cases {
        let output = sim(&args).await;
        assert!(!output.status.success(), "{args:?} should fail");
        let text = stderr(&output);
        assert_eq!(text.trim_end().lines().count(), 1, "{args:?}: {text:?}");
        assert!(text.contains(needle), "{args:?}: {needle:?} not in {text:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
