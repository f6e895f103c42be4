//! The admin HTTP port under abuse, on the real binary and bounded: slow and idle connections are
//! closed at their deadlines, a flood of idle connections at a low open-file limit leaves MQTT
//! serving, huge pages are refused with memory unchanged, and every malformed request gets
//! problem+json with `no-store` and `nosniff`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rki_gateway::api::types::TaskList;
use rki_tests::{
    create_task, for_group, for_sns, provision, sns, stop_task, task_detail, wait, GatewayOptions, GatewayProcess,
    RawDevice, TestResult,
};
use serde_json::{json, Value};

/// Whether the server has closed `stream` (EOF or reset), waiting at most `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(within));
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or an error page before the close counts too: read on to the close.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn rss_kib(pid: u32) -> TestResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        .ok_or_else(|| "no VmRSS".into())
}

#[test]
fn slow_headers_idle_connections_and_slow_bodies_are_closed_at_their_deadlines() -> TestResult {
    let _ = rki_device_sim::raise_fd_limit();
    let gw = GatewayProcess::start(GatewayOptions {
        env: vec![
            ("RKI_HTTP_HEADER_TIMEOUT_SECONDS".into(), "2".into()),
            ("RKI_HTTP_BODY_TIMEOUT_SECONDS".into(), "2".into()),
        ],
        ..GatewayOptions::default()
    })?;
    let addr = format!("127.0.0.1:{}", gw.http_port);
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&addr)?;
        match i % 3 {
            // Slow headers: a request line and one header, never the blank line.
            0 => s.write_all(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\n")?,
            // Idle: connected, nothing sent.
            1 => {}
            // A partial body: headers promise 1,000 bytes, 10 arrive.
            _ => s.write_all(
                format!(
                    "POST /v1/groups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\":\"",
                    gw.org_token
                )
                .as_bytes(),
            )?,
        }
        slow.push(s);
    }
    let started = Instant::now();
    // One deadline for all: 2 s of timeout, and 6 s of slack on a loaded machine.
    let deadline = started + Duration::from_secs(8);
    let mut open_after = 0;
    for s in slow.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        if !closed_within(s, left) {
            open_after += 1;
        }
    }
    assert_eq!(open_after, 0, "{open_after} of 300 slow connections still open after {:?}", started.elapsed());
    // An honest client is served all along.
    let (status, _) = gw.api().get("/v1/whoami");
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn a_flood_of_idle_http_connections_at_a_low_file_limit_leaves_mqtt_serving() -> TestResult {
    let _ = rki_device_sim::raise_fd_limit();
    let rt = common::runtime();
    // The gateway's hard limit: 1,024 descriptors (its MQTT share is what rumqttd's limit takes).
    let gw = GatewayProcess::start(GatewayOptions { nofile_limit: Some(1024), ..GatewayOptions::default() })?;
    let provisioned = provision(&gw, &sns("FLOOD", 1), "fleet")?;
    let addr = format!("127.0.0.1:{}", gw.http_port);
    let mut flood = Vec::new();
    // Up to 1,500 connections within 15 s; the accept loop takes its share, the backlog the rest,
    // and a connect that times out (backlog full) is tried again until 20 in a row fail.
    let (started, mut failures) = (Instant::now(), 0);
    while flood.len() < 1500 && failures < 20 && started.elapsed() < Duration::from_secs(15) {
        match TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(200)) {
            Ok(s) => {
                flood.push(s);
                failures = 0;
            }
            Err(_) => failures += 1,
        }
    }
    // More than the admin port's cap at this limit (1,024 - 724 for MQTT - 64 = 236): the rest wait in the backlog.
    assert!(flood.len() > 236, "only {} flood connections opened", flood.len());
    // MQTT still accepts and serves a terminal's initialisation.
    let (sn, gudid) = provisioned.gudids[0].clone();
    let device = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), RawDevice::initialise(gw.mqtt_port, &sn, &gudid)).await
    });
    assert!(matches!(device, Ok(Ok(_))), "MQTT did not serve during the HTTP flood");
    drop(flood);
    // Once the flood ends, the admin port serves again.
    wait::until("the admin port to serve again after the flood", Duration::from_secs(30), || {
        gw.api().get("/v1/whoami").0 == 200
    })?;
    Ok(())
}

#[test]
fn huge_pages_are_refused_and_memory_stays_bounded() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let csv = std::iter::once("sn,model".to_string())
        .chain((0..20_000).map(|i| format!("PAGE{i:06},P3")))
        .collect::<Vec<_>>()
        .join("\n");
    let (status, v) = gw.upload_devices("acme", &csv);
    assert_eq!(status, 200, "{v}");
    let pid = gw.pid().ok_or("no pid")?;
    let before = rss_kib(pid)?;
    for _ in 0..4 {
        let (status, v) = gw.api().get("/v1/devices?limit=100000");
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["code"], "bad_limit");
    }
    // The whole fleet, page by page through the cursor.
    let mut seen = 0;
    let mut cursor: Option<String> = None;
    for _ in 0..30 {
        let path = match &cursor {
            Some(c) => format!("/v1/devices?limit=1000&cursor={c}"),
            None => "/v1/devices?limit=1000".to_string(),
        };
        let v = gw.api().ok(&path)?;
        seen += v["devices"].as_array().map_or(0, Vec::len);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, 20_000);
    let after = rss_kib(pid)?;
    assert!(after < before + 64 * 1024, "RSS grew from {before} to {after} KiB");
    Ok(())
}

#[test]
fn every_malformed_request_gets_problem_json_and_no_answer_is_cached_or_sniffed() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let url = gw.url();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let auth = format!("Bearer {}", gw.org_token);
    let cases: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("GET", "/v1/no-such-thing", None, 404),
        ("DELETE", "/v1/devices", None, 405),
        ("GET", "/v1/devices?limit=abc", None, 400),
        ("GET", "/v1/devices?limit=0", None, 400),
        ("POST", "/v1/groups", Some("{not json"), 400),
        ("GET", "/v1/records?format=xml", None, 400),
        ("GET", "/v1/devices?cursor=zz", None, 400),
    ];
    for (method, path, body, expected) in cases {
        let request = agent.request(method, &format!("{url}{path}")).set("Authorization", &auth);
        let result = match body {
            Some(b) => request.set("Content-Type", "application/json").send_string(b),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("{method} {path}: {e}").into()),
        };
        assert_eq!(response.status(), expected, "{method} {path}");
        assert_eq!(response.header("content-type"), Some("application/problem+json"), "{method} {path}");
        assert_eq!(response.header("cache-control"), Some("no-store"), "{method} {path}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{method} {path}");
        let v: Value = serde_json::from_str(&response.into_string()?)?;
        assert!(v["code"].is_string() && v["detail"].is_string(), "{method} {path}: {v}");
    }
    // A body over the limit: answered 413 from its Content-Length, before it is sent (a client
    // library writing the whole body meets the closed connection, so this one speaks raw HTTP).
    let mut raw = TcpStream::connect(format!("127.0.0.1:{}", gw.http_port))?;
    raw.set_read_timeout(Some(Duration::from_secs(10)))?;
    raw.write_all(
        format!(
            "POST /v1/groups HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(answer.contains("content-type: application/problem+json") && answer.contains("no-store"), "{answer}");
    // A success carries the headers too; no token, no entry.
    let ok = agent.get(&format!("{url}/v1/whoami")).set("Authorization", &auth).call()?;
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    let (status, v) = rki_tests::Api::new(&url, "").get("/v1/devices");
    assert_eq!(status, 401, "{v}");
    Ok(())
}

#[test]
fn names_that_cannot_be_addressed_or_read_as_another_are_refused() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    for bad in ["..", ".", "a/b", " padded", "shop\u{202E}evil", "zero\u{200B}width"] {
        let (status, v) = gw.api().post("/v1/groups", &json!({"name": bad}));
        assert_eq!(status, 400, "{bad:?}: {v}");
        assert_eq!(v["code"], "invalid_name", "{bad:?}: {v}");
    }
    let (status, groups) = gw.api().get("/v1/groups");
    assert_eq!(status, 200);
    assert_eq!(groups["groups"].as_array().map(Vec::len), Some(0), "{groups}");
    Ok(())
}

/// Task ids are numbered per organization: neither organization can count the other's tasks, or
/// reach them by their number; task and audit lists page with a cursor.
#[test]
fn task_ids_are_numbered_per_organization_and_lists_page_with_a_cursor() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let acme = gw.api();
    let rt = common::runtime();
    let provisioned = provision(&gw, &sns("TASKNO", 1), "g")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let _acme_device = rt.block_on(RawDevice::initialise(gw.mqtt_port, &sn, &gudid))?;
    let mut acme_tasks = Vec::new();
    for _ in 0..3 {
        let task = create_task(&acme, &for_group("g"))?.task.id;
        stop_task(&acme, task)?;
        acme_tasks.push(task);
    }
    assert_eq!(acme_tasks, [1, 2, 3]);
    let globex = rki_tests::Api::new(&gw.url(), &gw.init_org("globex")?);
    rki_tests::authorize_test_bdk(&gw, "globex", "bdk-globex")?;
    let (status, v) = gw.upload_devices("globex", "sn,model\nGLOBEX-1,P3");
    assert_eq!(status, 200, "{v}");
    globex.ok_post("/v1/assignments", &json!({"sns": ["GLOBEX-1"], "key_source": "bdk-globex"}))?;
    let gudid = globex.ok_post("/v1/gudids", &json!({"sns": ["GLOBEX-1"]}))?["gudids"][0]["gudid"]
        .as_str()
        .ok_or("no GUDID")?
        .to_string();
    let _globex_device = rt.block_on(RawDevice::initialise(gw.mqtt_port, "GLOBEX-1", &gudid))?;
    let theirs = create_task(&globex, &for_sns(&["GLOBEX-1"]))?.task.id;
    assert_eq!(theirs, 1, "globex's first task is its number 1, whatever acme did before");
    // Number 2 exists only in acme: globex gets the answer of a task that never existed.
    let (status, v) = globex.get("/v1/tasks/2");
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (status, _) = globex.post("/v1/tasks/2/stop", &json!({}));
    assert_eq!(status, 404);
    let (status, _) = globex.get("/v1/records?task=2");
    assert_eq!(status, 404);
    let task = task_detail(&globex, 1)?;
    assert_eq!(task.task.id, 1);
    assert_eq!(task.executions.first().map(|e| e.task_id), Some(1), "{task:?}");
    // Pages: newest first, then below the cursor.
    let first: TaskList = acme.ok_as("/v1/tasks?limit=2")?;
    let ids = |list: &TaskList| -> Vec<i64> { list.tasks.iter().map(|t| t.id).collect() };
    assert_eq!(ids(&first), [3, 2]);
    let cursor = first.next_cursor.ok_or("no next_cursor")?;
    let second: TaskList = acme.ok_as(&format!("/v1/tasks?limit=2&cursor={cursor}"))?;
    assert_eq!(ids(&second), [1]);
    assert!(second.next_cursor.is_none(), "{second:?}");
    let (status, v) = acme.get("/v1/tasks?limit=1001");
    assert_eq!((status, v["code"].as_str()), (400, Some("bad_limit")), "{v}");
    let audit = acme.ok("/v1/audit?limit=2")?;
    let entries = audit["audit"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 2);
    let cursor = audit["next_cursor"].as_i64().ok_or("no audit cursor")?;
    let older = acme.ok(&format!("/v1/audit?limit=1000&cursor={cursor}"))?;
    let older = older["audit"].as_array().cloned().unwrap_or_default();
    assert!(!older.is_empty() && older.iter().all(|e| e["id"].as_i64() < Some(cursor)), "{older:?}");
    assert!(entries.iter().any(|e| e["object"] == "task:3"), "the audit names the organization's number: {entries:?}");
    Ok(())
}

/// One answer read from a raw HTTP/1.1 connection: its status line and body.
fn read_answer(stream: &mut TcpStream) -> TestResult<(String, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(format!("a head of over 16 KiB: {:?}", String::from_utf8_lossy(&head)).into());
        }
        match stream.read(&mut byte)? {
            0 => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)).into()),
            _ => head.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| format!("no content-length: {head}"))?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok((head.lines().next().unwrap_or_default().to_string(), String::from_utf8_lossy(&body).into_owned()))
}

/// A refusal answered before the request's body has arrived (a wrong token, a route that refuses
/// whatever it is sent, no such route) leaves the connection open for the next request: the body
/// is read first. Otherwise the server closes a kept-alive connection that the client's pool
/// hands to its next POST, which fails with a network error.
#[test]
fn a_refusal_before_the_body_arrives_keeps_the_connection_for_the_next_request() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let auth = format!("Bearer {}", gw.org_token);
    let body = "sn\nCLAIM0001\n";
    let cases = [
        ("/v1/devices/import", auth.as_str(), "403"),
        ("/v1/devices/import", "Bearer wrong", "401"),
        ("/v1/no/such/route", auth.as_str(), "404"),
        ("/v1/groups", auth.as_str(), "400"),
    ];
    for (path, token, status) in cases {
        let mut raw = TcpStream::connect(format!("127.0.0.1:{}", gw.http_port))?;
        raw.set_read_timeout(Some(Duration::from_secs(10)))?;
        raw.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Type: text/csv\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )?;
        // The body follows the head late, as from a client that writes them apart.
        std::thread::sleep(Duration::from_millis(300));
        raw.write_all(body.as_bytes())?;
        let (line, answer) = read_answer(&mut raw)?;
        assert!(line.starts_with(&format!("http/1.1 {status}")), "{path}: {line} {answer}");
        raw.write_all(format!("GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").as_bytes())?;
        let (line, answer) = read_answer(&mut raw).map_err(|e| format!("{path}: the next request: {e}"))?;
        assert!(line.starts_with("http/1.1 200"), "{path}: the next request: {line} {answer}");
    }
    Ok(())
}
