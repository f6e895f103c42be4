//! `rkictl key …` end to end: the built binary, run against the shared vectors (read from
//! `protocol/tests/vectors`) and against bad input, which must end with a non-zero exit and one
//! line on stderr, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn rkictl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rkictl"))
        .args(args)
        .env_remove("RKICTL_BDK")
        .env_remove("RKICTL_KEY")
        .env_remove("RKICTL_KBPK")
        .output()
        .expect("rkictl runs")
}

/// Runs with `--json` and returns the parsed object; the command must succeed.
fn json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = rkictl(&all);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

/// The command must fail with exit code `code` and exactly one line on stderr.
fn refused(args: &[&str], code: i32) -> String {
    let output = rkictl(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(output.stdout.is_empty(), "{args:?} printed {:?}", output.stdout);
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("rkictl: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn vectors(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/vectors").join(name);
    let text = std::fs::read_to_string(&path).expect("vector file");
    serde_json::from_str::<Value>(&text).expect("JSON").as_array().expect("array").clone()
}

fn s<'a>(row: &'a Value, name: &str) -> &'a str {
    row[name].as_str().unwrap_or_else(|| panic!("{name} in {row}"))
}

#[test]
fn ipek_reproduces_every_tdes_vector() {
    for row in vectors("dukpt_tdes_ipek.json") {
        let out = json(&["key", "ipek", "--bdk", s(&row, "bdk"), "--ksn", s(&row, "ksn")]);
        assert_eq!(out["ipek"], row["ipek"], "{row}");
        assert_eq!(out["kcv"], row["kcv"], "{row}");
    }
}

#[test]
fn aes_initial_key_reproduces_every_aes_vector() {
    for row in vectors("dukpt_aes_initial_key.json") {
        let out =
            json(&["key", "aes-initial-key", "--bdk", s(&row, "bdk"), "--initial-key-id", s(&row, "initial_key_id")]);
        assert_eq!(out["initial_key"], row["initial_key"], "{row}");
        if row.get("kcv").is_some() {
            assert_eq!(out["kcv"], row["kcv"], "{row}");
        }
    }
}

#[test]
fn kcv_reproduces_every_kcv_vector() {
    for row in vectors("kcv.json") {
        let alg = s(&row, "alg").to_lowercase();
        let out = json(&["key", "kcv", "--key", s(&row, "key"), "--alg", &alg]);
        assert_eq!(out["kcv"], row["kcv"], "{row}");
        let five = json(&["key", "kcv", "--key", s(&row, "key"), "--alg", &alg, "--len", "5"]);
        let five = five["kcv"].as_str().expect("kcv");
        assert_eq!(five.len(), 10);
        assert!(five.starts_with(s(&row, "kcv")), "{row}");
    }
}

#[test]
fn tr31_unwrap_reproduces_every_valid_vector_and_refuses_the_invalid_ones() {
    for row in vectors("tr31.json") {
        let args = ["key", "tr31-unwrap", "--kbpk", s(&row, "kbpk"), "--key-block", s(&row, "key_block")];
        if row["valid"].as_bool() == Some(true) {
            let out = json(&args);
            assert_eq!(out["key"], row["key"], "{row}");
            assert_eq!(out["header"]["key_usage"], s(&row, "key_block")[5..7], "{row}");
            if row.get("kcv").is_some() {
                assert_eq!(out["kcv"], row["kcv"], "{row}");
            }
        } else {
            let reason = refused(&args, 1);
            assert!(reason.contains("MAC"), "{reason}");
        }
    }
}

#[test]
fn tr31_wrap_output_unwraps_to_the_same_key() {
    let cases = [
        ("89E88CF7931444F334BD7547FC3F380C", "B0000B1TX00N0000", "6AC292FAA1315B4D858AB3A3D7D5933A"),
        (
            "88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6",
            "D9999B1AX00E0100IK141234567890123456",
            "1273671eA26AC29AFA4D1084127652A1",
        ),
    ];
    for (kbpk, header, key) in cases {
        let wrapped = json(&["key", "tr31-wrap", "--kbpk", kbpk, "--header", header, "--key", key]);
        let block = wrapped["key_block"].as_str().expect("key block");
        assert_eq!(block[1..5].parse::<usize>().ok(), Some(block.len()), "{block}");
        let out = json(&["key", "tr31-unwrap", "--kbpk", &kbpk.to_lowercase(), "--key-block", block]);
        assert_eq!(out["key"].as_str(), Some(key.to_uppercase().as_str()));
    }
}

#[test]
fn readable_output_names_each_field() {
    let output = rkictl(&["key", "ipek", "--bdk", "0123456789abcdeffedcba9876543210", "--ksn", "ffff9876543210e00008"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text, "ipek: 6AC292FAA1315B4D858AB3A3D7D5933A\nkcv: AF8C07\n");
}

#[test]
fn bad_input_is_refused_with_one_line_and_a_non_zero_exit() {
    // The P0 vector of tr31.json with its last MAC digit changed.
    let tampered =
        concat!("B0096P0TE00N0000E32B7D4243FB75BCD0BC4A7BACA9A3F55EF25B25E5CA7AC833FD6E07", "5153B9FCAB699699FD2B4B9D");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["key", "ipek", "--bdk", "0123456789ABCDEFFEDCBA987654321", "--ksn", "FFFF9876543210E00000"], 1, "odd"),
        (&["key", "ipek", "--bdk", "0123456789ABCDEF", "--ksn", "FFFF9876543210E00000"], 1, "16 or 24 bytes"),
        (&["key", "ipek", "--bdk", "0123456789ABCDEFFEDCBA9876543210", "--ksn", "FFFF98765432"], 1, "--ksn"),
        (&["key", "ipek", "--bdk", "0123456789ABCDEFFEDCBA98765432XY", "--ksn", "FFFF9876543210E00000"], 1, "hex"),
        (
            &[
                "key",
                "aes-initial-key",
                "--bdk",
                "0123456789ABCDEFFEDCBA9876543210AB",
                "--initial-key-id",
                "1234567890123456",
            ],
            1,
            "AES key",
        ),
        (
            &["key", "aes-initial-key", "--bdk", "FEDCBA9876543210F1F1F1F1F1F1F1F1", "--initial-key-id", "12345678"],
            1,
            "--initial-key-id",
        ),
        (&["key", "kcv", "--key", "0123", "--alg", "tdes"], 1, "--key"),
        (&["key", "kcv", "--key", "0123456789ABCDEFFEDCBA9876543210", "--alg", "tdes", "--len", "4"], 1, "--len"),
        (&["key", "tr31-unwrap", "--kbpk", "DBAD4D186CD73E808E3454EC5682C864", "--key-block", tampered], 1, "MAC"),
        (
            &["key", "tr31-unwrap", "--kbpk", "DBAD4D186CD73E808E3454EC5682C864", "--key-block", &tampered[..90]],
            1,
            "length",
        ),
        (&["key", "tr31-unwrap", "--kbpk", "DBAD4D186CD73E808E3454EC5682C864", "--key-block", "X0016"], 1, "version"),
        (
            &[
                "key",
                "tr31-wrap",
                "--kbpk",
                "DBAD4D186CD73E808E3454EC5682C864",
                "--header",
                "B0000P0TX00N0000",
                "--key",
                "00112233445566778899AABBCCDDEEFF",
            ],
            1,
            "mode of use",
        ),
        (
            &[
                "key",
                "tr31-wrap",
                "--kbpk",
                "DBAD4D186CD73E808E3454EC5682C86400000000",
                "--header",
                "D0000P0AE00N0000",
                "--key",
                "00112233445566778899AABBCCDDEEFF",
            ],
            1,
            "AES key",
        ),
        (
            &[
                "key",
                "tr31-wrap",
                "--kbpk",
                "DBAD4D186CD73E808E3454EC5682C864",
                "--header",
                "B0000P0TE00N0000",
                "--key",
                "0011",
            ],
            1,
            "algorithm",
        ),
        (
            &[
                "key",
                "tr31-wrap",
                "--kbpk",
                "DBAD4D186CD73E808E3454EC5682C864",
                "--header",
                "A0000P0TE00N0000",
                "--key",
                "00112233445566778899AABBCCDDEEFF",
            ],
            1,
            "unwrapped only",
        ),
        (&["key", "ipek", "--ksn", "FFFF9876543210E00000"], 2, "--bdk"),
        (&["key", "kcv", "--key", "00", "--alg", "des"], 2, "des"),
        (&["key", "no-such-command"], 2, "no-such-command"),
    ];
    for (args, code, needle) in cases {
        let reason = refused(args, *code);
        assert!(reason.contains(needle), "{args:?}: {reason:?} lacks {needle:?}");
    }
}
