//! The MQTT endpoint against clients that share no code with the gateway: paho-mqtt for Python
//! (MQTT 3.1.1 and 5.0, driven by tests/python/paho_endpoint.py) and Debian's mosquitto_pub and
//! mosquitto_sub (libmosquitto). Each gets the CONNACK codes, SUBACK codes, PUBACKs and closes
//! that docs/PROTOCOL.md §2 promises, and a terminal reads its own download with mosquitto_sub.
//! Neither client is optional: without them these tests fail, naming what to install.

use std::process::Command;
use std::time::Duration;

use rki_protocol::message::Message;
use rki_protocol::topic;
use rki_tests::mqtt::{device_online, mosquitto_client, paho, run_bounded, wait_for, Raw, Terminal};
use rki_tests::{
    create_task, for_sns, provision, sns, wait_task, GatewayOptions, GatewayProcess, RawDevice, TestResult,
};
use rumqttc::mqttbytes::{v4, QoS};
use serde_json::{json, Value};

/// One paho step as the driver script reads it.
fn step(kind: &str, port: u16, version: u8, client_id: &str, login: Option<(&str, &str)>) -> Value {
    json!({
        "kind": kind,
        "port": port,
        "version": version,
        "client_id": client_id,
        "username": login.map(|l| l.0),
        "password": login.map(|l| l.1),
    })
}

#[test]
fn paho_mqtt_gets_every_refusal_code_and_access_rule_in_both_versions() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let port = gw.mqtt_port;
    let provisioned = provision(&gw, &sns("PAHO", 2), "paho")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    // Registered, with a live GUDID, but not initialised: it may not connect as a device.
    let uninitialised = provisioned.sns[1].clone();
    let mut terminal = Terminal::initialise(port, &sn, &gudid)?;
    let hello_hex = hex::encode(terminal.hello()?);
    let login = Some((sn.as_str(), terminal.password.as_str()));

    // (version, client id, login, expected CONNACK code)
    type Connect<'a> = (u8, &'a str, Option<(&'a str, &'a str)>, i64);
    let connects: Vec<Connect> = vec![
        (4, "NOSUCHSN", Some(("NOSUCHSN", "x")), 4),
        (4, &sn, Some((&sn, "wrong")), 4),
        (4, &sn, Some(("OTHER", &terminal.password)), 5),
        (4, &uninitialised, Some((&uninitialised, "x")), 5),
        (4, "a/b", Some(("a/b", "x")), 2),
        (4, &sn, login, 0),
        (5, "NOSUCHSN", Some(("NOSUCHSN", "x")), 0x86),
        (5, &sn, Some((&sn, "wrong")), 0x86),
        (5, &sn, None, 0x86),
        (5, &sn, Some(("OTHER", &terminal.password)), 0x87),
        (5, &uninitialised, Some((&uninitialised, "x")), 0x87),
        (5, "a/b", Some(("a/b", "x")), 0x85),
        (5, "#", Some(("#", "x")), 0x85),
        (5, &sn, login, 0),
    ];
    let mut steps: Vec<Value> = connects.iter().map(|(v, id, l, _)| step("connect", port, *v, id, *l)).collect();

    // Subscriptions: `#`, a wildcard and another terminal's topic are refused, its own is granted
    // (at QoS 1 at most).
    let own_down = topic::device_down(&sn);
    let other_down = topic::device_down(&uninitialised);
    let filters = json!([["#", 1], ["+/rki/v1/down", 1], [other_down, 1], [own_down, 2]]);
    for version in [4, 5] {
        let mut s = step("subscribe", port, version, &sn, login);
        s["filters"] = filters.clone();
        steps.push(s);
        let mut s = step("subscribe", port, version, &sn, login);
        s["filters"] = json!([["#", 0]]);
        steps.push(s);
    }

    // Publications: (version, topic, qos, retain, payload)
    let other_up = topic::device_up(&uninitialised);
    let own_up = topic::device_up(&sn);
    let publishes: Vec<(u8, &str, u8, bool, &str)> = vec![
        (4, &other_up, 1, false, "01"),
        (5, &other_up, 1, false, "01"),
        (4, &own_up, 1, true, &hello_hex),
        (5, &own_up, 1, true, &hello_hex),
        (4, &own_up, 2, false, &hello_hex),
        (5, &own_up, 2, false, &hello_hex),
        (5, &own_up, 1, false, &hello_hex),
    ];
    for (version, topic_name, qos, retain, payload) in &publishes {
        let mut s = step("publish", port, *version, &sn, login);
        s["topic"] = json!(topic_name);
        s["qos"] = json!(qos);
        s["retain"] = json!(retain);
        s["payload_hex"] = json!(payload);
        s["then_subscribe"] = json!(own_down);
        steps.push(s);
    }

    let results = paho(&Value::Array(steps))?;
    let mut results = results.iter();
    let mut next = || results.next().cloned().ok_or("paho_endpoint.py gave fewer results than steps");

    for (version, client_id, login, code) in &connects {
        let r = next()?;
        let user = login.map(|l| l.0);
        assert_eq!(r["connack"], json!(code), "paho {version}: CONNECT as {client_id} (user {user:?}): {r}");
    }

    // 3.1.1: 0x80 for each refused filter; 5.0: 0x87 not authorised. Its own: QoS 1.
    for (version, refused) in [(4, 0x80), (5, 0x87)] {
        let r = next()?;
        assert_eq!(r["granted"], json!([refused, refused, refused, 1]), "paho {version} SUBACK: {r}");
        let r = next()?;
        assert_eq!(r["granted"], json!([refused]), "paho {version} SUBACK for `#` alone: {r}");
    }

    // A foreign publish: 3.1.1 closes the connection (no PUBACK); 5.0 PUBACK 0x87, and the
    // connection still serves.
    let r = next()?;
    assert!(r["closed"] == true && r["puback"].is_null(), "paho 3.1.1 foreign publish: {r}");
    let r = next()?;
    assert_eq!((r["puback"].clone(), r["closed"].clone()), (json!(0x87), json!(false)), "paho 5.0 foreign: {r}");
    assert_eq!(r["then_granted"], json!([1]), "paho 5.0: the connection no longer served after a refusal: {r}");
    // A retained publish: 3.1.1 ignores the flag (PUBACK, still serving); 5.0 DISCONNECT 0x9A.
    let r = next()?;
    assert!(r["puback"] == 0 && r["closed"] == false && r["then_granted"] == json!([1]), "paho 3.1.1 retained: {r}");
    let r = next()?;
    assert!(r["disconnect"] == 0x9A && r["closed"] == true && r["puback"].is_null(), "paho 5.0 retained: {r}");
    // QoS 2: 3.1.1 closes; 5.0 DISCONNECT 0x9B.
    let r = next()?;
    assert!(r["closed"] == true && r["puback"].is_null(), "paho 3.1.1 QoS 2: {r}");
    let r = next()?;
    assert!(r["disconnect"] == 0x9B && r["closed"] == true, "paho 5.0 QoS 2: {r}");
    // Its own uplink at QoS 1: PUBACK success.
    let r = next()?;
    assert!(r["puback"] == 0 && r["closed"] == false, "paho 5.0 hello: {r}");
    assert!(next().is_err(), "more results than steps");

    // The gateway counted what it refused.
    for (reason, at_least) in [("foreign_publish", 2.0), ("retain", 2.0), ("qos2", 2.0), ("wildcard_subscribe", 6.0)] {
        let seen = gw.metric(&format!("rki_mqtt_refusals_total{{reason=\"{reason}\"}}"));
        assert!(seen >= at_least, "rki_mqtt_refusals_total{{reason={reason}}} = {seen}, expected ≥ {at_least}");
    }
    Ok(())
}

/// `mosquitto_sub` or `mosquitto_pub` on the endpoint, as `client_id` with `password`.
fn mosquitto(name: &str, port: u16, version: &str, client_id: &str, password: &str) -> TestResult<Command> {
    let mut cmd = Command::new(mosquitto_client(name)?);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version, "-i", client_id, "-u", client_id]);
    cmd.args(["-P", password]);
    Ok(cmd)
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn mosquitto_clients_are_refused_with_their_code_and_a_terminal_reads_and_acks_its_own_download() -> TestResult {
    let gw = GatewayProcess::start(GatewayOptions::default())?;
    let port = gw.mqtt_port;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("MOSQ", 1), "mosq")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let mut terminal = Terminal::initialise(port, &sn, &gudid)?;
    let down = terminal.down();
    let wait = Duration::from_secs(15);

    // Refused CONNECTs, with the code libmosquitto names: a wrong password (3.1.1: 4; 5.0: 0x86)
    // and a user name that is not the client id (3.1.1: 5).
    for version in ["mqttv311", "mqttv5"] {
        let mut cmd = mosquitto("mosquitto_sub", port, version, &sn, "wrong")?;
        cmd.args(["-t", &down, "-C", "1", "-W", "5"]);
        let out = run_bounded(cmd, wait)?;
        assert!(!out.status.success(), "mosquitto_sub {version} with a wrong password: {}", text(&out));
        assert!(
            text(&out).to_lowercase().contains("bad user name or password"),
            "mosquitto_sub {version} with a wrong password: {}",
            text(&out)
        );
    }
    let mut cmd = mosquitto("mosquitto_pub", port, "mqttv311", &sn, &terminal.password)?;
    cmd.args(["-u", "OTHER", "-t", &terminal.up(), "-m", "x", "-q", "1"]);
    let out = run_bounded(cmd, wait)?;
    assert!(!out.status.success(), "mosquitto_pub as another user: {}", text(&out));
    assert!(text(&out).to_lowercase().contains("not authori"), "mosquitto_pub as another user: {}", text(&out));
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"bad_password\"}") >= 2.0);
    assert!(gw.metric("rki_mqtt_connects_refused_total{reason=\"client_id_mismatch\"}") >= 1.0);

    // `#` is refused to the device identity itself: every subscription denied.
    for version in ["mqttv311", "mqttv5"] {
        let mut cmd = mosquitto("mosquitto_sub", port, version, &sn, &terminal.password)?;
        cmd.args(["-t", "#", "-q", "1", "-E", "-W", "5"]);
        let out = run_bounded(cmd, wait)?;
        // mosquitto_sub 2.0 exits 0 here (3.1.1) or 1 (5.0): its message is what tells.
        assert!(text(&out).contains("denied"), "mosquitto_sub {version} `#`: {}", text(&out));
    }
    // Its own down topic is granted (-E: exit once subscribed).
    let mut cmd = mosquitto("mosquitto_sub", port, "mqttv311", &sn, &terminal.password)?;
    cmd.args(["-t", &down, "-q", "1", "-E", "-W", "5"]);
    let out = run_bounded(cmd, wait)?;
    assert!(out.status.success(), "mosquitto_sub on its own down topic: {}", text(&out));

    // The terminal says hello on a persistent session (so that it is online and subscribed),
    // then mosquitto_sub takes the session over with the same identity and reads the download.
    let mut raw = Raw::open(port)?;
    raw.connect_v4(&sn, Some(terminal.login()), false)?;
    assert_eq!(raw.connack_v4()?.code, v4::ConnectReturnCode::Success);
    raw.subscribe_v4_granted(1, &down)?;
    raw.publish_v4(&terminal.up(), QoS::AtLeastOnce, 1, &terminal.hello()?, false)?;
    raw.read_v4_until(Duration::from_secs(5), "the hello's PUBACK", |p| matches!(p, v4::Packet::PubAck(_)))?;
    wait_for(Duration::from_secs(5), "the device online", || device_online(&gw, &sn).unwrap_or(false))?;
    let taken_over = gw.metric("rki_mqtt_connections_closed_total{reason=\"taken_over\"}");
    let mut cmd = mosquitto("mosquitto_sub", port, "mqttv311", &sn, &terminal.password)?;
    cmd.args(["-c", "-t", &down, "-q", "1", "-C", "1", "-W", "20", "-F", "%x"]);
    let sub = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_for(Duration::from_secs(10), "mosquitto_sub taking the session over", || {
        gw.metric("rki_mqtt_connections_closed_total{reason=\"taken_over\"}") > taken_over
    })?;
    assert!(raw.closed(), "the replaced connection stayed open");
    let task = create_task(&api, &for_sns(&[&sn]))?.task.id;
    let out = rki_tests::mqtt::wait_output(sub, Duration::from_secs(25))?;
    assert!(out.status.success(), "mosquitto_sub read no download: {}", text(&out));
    let payload = hex::decode(String::from_utf8_lossy(&out.stdout).trim())?;
    let download = terminal.download(&payload)?;

    // mosquitto_pub sends the terminal's signed ack; the execution succeeds.
    let ack = terminal.seal(RawDevice::ack(&download))?;
    let ack_file = gw.dir.join("ack.bin");
    std::fs::write(&ack_file, &ack)?;
    let mut cmd = mosquitto("mosquitto_pub", port, "mqttv5", &sn, &terminal.password)?;
    cmd.args(["-t", &terminal.up(), "-q", "1", "-f"]).arg(&ack_file);
    let out = run_bounded(cmd, wait)?;
    assert!(out.status.success(), "mosquitto_pub of the ack: {}", text(&out));
    wait_task(&api, task, Duration::from_secs(10), |c| c.succeeded == 1)?;
    assert!(matches!(terminal.open(&payload)?, Message::Download(_)));
    Ok(())
}
