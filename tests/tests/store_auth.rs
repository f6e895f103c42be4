//! Mosquitto authenticating from the store (`docs/SCALE-OUT.md`, "Mosquitto authenticating from
//! the store"): the project's plugin `librki_mosquitto_auth.so` reads PostgreSQL's
//! `rki_broker_credentials` view at each CONNECT, under a role that may read nothing else, and
//! confines every identity to its own topics; the nodes push nothing to the broker. Real
//! Mosquitto 2.0, real PostgreSQL, real gateway nodes:
//! - an initialisation storm through three nodes: every terminal admitted at its first CONNECT;
//!   a re-initialisation through any node refuses the old password at once; a device the store
//!   disowns is refused at its very next CONNECT; a terminal whose password is replaced just after
//!   its admission is disconnected at its re-check;
//! - each identity reaches only its own topics (not another's, not `#`, not `$CONTROL`);
//!   `init@{SN}` opens only while its GUDID is live and closes once the device proves its
//!   secrets; a revoked backend is refused at its next CONNECT; malformed CONNECTs are refused
//!   and the broker lives on;
//! - a database outage refuses CONNECTs at once without stopping the broker, and they are
//!   accepted again when it returns.
//!
//! The kill-mid-push spec on this broker is in `three_nodes.rs`. The tests of this file run one at
//! a time (each starts its own PostgreSQL, Mosquitto and gateways).

#[path = "support/broker_auth.rs"]
mod broker_auth;
mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use broker_auth::{initialise, password};
use rki_protocol::backend::{BackendId, BackendSecret};
use rki_protocol::init::Gudid;
use rki_tests::cluster::{BROKER_DB_ROLE, GATEWAY_PASSWORD, GATEWAY_USER};
use rki_tests::mqtt::{Got, Raw};
use rki_tests::{
    bootstrap_password, mqtt_connect, mqtt_connect_subscribed, provision, sns, wait, BrokerAuth, Cluster,
    ClusterOptions, RawDevice, TestResult,
};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use serde_json::json;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const STORM: usize = 300;

fn one_node() -> TestResult<Cluster> {
    Cluster::start(ClusterOptions { nodes: 1, broker_auth: BrokerAuth::Store, ..Default::default() })
}

#[test]
fn terminals_initialised_through_every_node_connect_at_once_and_a_reinitialised_one_loses_its_old_password(
) -> TestResult {
    let _serial = one_at_a_time();
    let rt = common::runtime();
    let (cluster, devices) = broker_auth::initialise_at_once_then_reinitialise(&rt, BrokerAuth::Store, "STO", STORM)?;
    let port = cluster.mosquitto.port;
    // A device disowned by the store (its broker hash taken away behind the gateway's back) is
    // refused at its very next CONNECT: nothing to reconcile, nothing cached.
    let (gone, gone_secrets) = &devices[STORM - 1];
    cluster.sql()?.execute(
        "UPDATE device_credentials SET broker_password_hash = NULL WHERE device_id = (SELECT id FROM devices WHERE sn = $1)",
        &[gone],
    )?;
    assert!(rt.block_on(mqtt_connect(port, gone, &password(gone_secrets)?, true)).is_err(), "{gone} still admitted");
    let (kept, kept_secrets) = &devices[STORM - 2];
    rt.block_on(mqtt_connect(port, kept, &password(kept_secrets)?, true))?;
    // A terminal admitted a moment before a newer initialisation replaced its password (another
    // node answering a newer CreateKey): the plugin looks each admitted terminal up again 10 s
    // after its admission and disconnects it; one whose password is unchanged stays.
    let (stale, stale_secrets) = &devices[STORM - 3];
    let (steady, steady_secrets) = &devices[STORM - 4];
    let mut stale_link = Raw::open(port)?;
    stale_link.connect_v4(stale, Some((stale, &password(stale_secrets)?)), true)?;
    assert_eq!(stale_link.connack_v4()?.code, ConnectReturnCode::Success);
    let mut steady_link = Raw::open(port)?;
    steady_link.connect_v4(steady, Some((steady, &password(steady_secrets)?)), true)?;
    assert_eq!(steady_link.connack_v4()?.code, ConnectReturnCode::Success);
    cluster.sql()?.execute(
        "UPDATE device_credentials SET broker_password_hash =
             (SELECT broker_password_hash FROM device_credentials WHERE device_id = (SELECT id FROM devices WHERE sn = $2))
         WHERE device_id = (SELECT id FROM devices WHERE sn = $1)",
        &[stale, kept],
    )?;
    assert!(stale_link.closed_within(Duration::from_secs(20)), "{stale} stays connected with a replaced password");
    assert!(!steady_link.closed_within(Duration::from_secs(2)), "{steady} was disconnected with a current password");
    // The plugin's role reads the view and nothing else.
    let mut broker_role = postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user={BROKER_DB_ROLE} dbname=rki", cluster.pg.port()),
        postgres::NoTls,
    )?;
    let views = broker_role.query_one("SELECT count(*) FROM rki_broker_credentials", &[])?.get::<_, i64>(0);
    assert!(views >= STORM as i64 - 1, "{views} rows");
    for table in ["device_credentials", "gudids", "backends", "devices", "key_sources"] {
        let denied = broker_role.query(&format!("SELECT 1 FROM {table} LIMIT 1"), &[]);
        assert!(denied.is_err(), "the broker's role reads {table}");
    }
    Ok(())
}

/// A CONNECT packet (MQTT 3.1.1, clean session) built byte by byte, so that a test can send
/// what no client library would: a user name that is not UTF-8, a password flag without a
/// password.
fn connect_packet(client_id: &[u8], username: Option<&[u8]>, password: Option<&[u8]>) -> Vec<u8> {
    let field = |bytes: &[u8]| [&(bytes.len() as u16).to_be_bytes()[..], bytes].concat();
    let flags = 0x02 | if username.is_some() { 0x80 } else { 0 } | if password.is_some() { 0x40 } else { 0 };
    let mut body = [&b"\x00\x04MQTT\x04"[..], &[flags, 0, 30]].concat();
    body.extend(field(client_id));
    for part in [username, password].into_iter().flatten() {
        body.extend(field(part));
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// Whether the broker refused a raw CONNECT: a refusing CONNACK, or the connection closed
/// without one (Mosquitto's answer to a malformed CONNECT).
fn refused(port: u16, packet: &[u8]) -> TestResult<bool> {
    let mut raw = Raw::open(port)?;
    raw.send(packet)?;
    Ok(match raw.read_v4(Duration::from_secs(5))? {
        Got::Packet(Packet::ConnAck(ack)) => ack.code != ConnectReturnCode::Success,
        Got::Closed => true,
        Got::Packet(other) => return Err(format!("unexpected {other:?}").into()),
        Got::Silent => return Err("no answer to a CONNECT within 5 s".into()),
    })
}

#[test]
fn each_identity_reaches_only_its_own_topics_and_no_stale_or_malformed_one_gets_in() -> TestResult {
    let _serial = one_at_a_time();
    let rt = common::runtime();
    let cluster = one_node()?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns("CFA", 3), "cfa")?;
    let [(a, a_gudid), (b, b_gudid), (c, c_gudid)] =
        <[(String, String); 3]>::try_from(provisioned.gudids.clone()).map_err(|_| "three GUDIDs")?;
    let a_password = password(&rt.block_on(initialise(port, &a, &a_gudid))?)?;
    let b_password = password(&rt.block_on(initialise(port, &b, &b_gudid))?)?;
    let (down_a, down_b) = (format!("{a}/rki/v1/down"), format!("{b}/rki/v1/down"));

    // Terminal A may subscribe to its own down topic only.
    let mut spy_a = Raw::open(port)?;
    spy_a.connect_v4(&a, Some((&a, &a_password)), true)?;
    assert_eq!(spy_a.connack_v4()?.code, ConnectReturnCode::Success);
    let foreign = [
        down_b.clone(),
        "#".into(),
        "+/rki/v1/down".into(),
        format!("{b}/rki/v1/#"),
        format!("{a}/rki/v1/#"),
        "$CONTROL/#".into(),
        "$CONTROL/dynamic-security/v1/response".into(),
        "$SYS/#".into(),
        format!("$share/g/{down_b}"),
        "rki/v1/backend/#".into(),
    ];
    for (i, filter) in foreign.iter().enumerate() {
        let granted = spy_a.subscribe_v4_granted(10 + i as u16, filter)?;
        assert_eq!(granted, [SubscribeReasonCode::Failure], "{a} subscribed to {filter}");
    }
    assert_eq!(spy_a.subscribe_v4_granted(9, &down_a)?, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // The gateway's identity (Mosquitto's own files) writes to both; A gets its own message and
    // not B's, which was published first (one publisher's messages arrive in order).
    rt.block_on(async {
        let (_b_client, mut b_inbox) =
            mqtt_connect_subscribed(port, &b, &b_password, true, std::slice::from_ref(&down_b)).await?;
        let (gw, _) = mqtt_connect(port, GATEWAY_USER, GATEWAY_PASSWORD, true).await?;
        gw.publish(down_b.as_str(), rumqttc::QoS::AtLeastOnce, false, b"for-b".to_vec()).await?;
        gw.publish(down_a.as_str(), rumqttc::QoS::AtLeastOnce, false, b"for-a".to_vec()).await?;
        let got_b = tokio::time::timeout(Duration::from_secs(10), b_inbox.recv()).await?;
        assert_eq!(got_b, Some((down_b.clone(), b"for-b".to_vec())));
        TestResult::Ok(())
    })?;
    let first = spy_a.read_v4_until(Duration::from_secs(10), "a message for A", |p| matches!(p, Packet::Publish(_)))?;
    assert!(matches!(&first, Packet::Publish(p) if p.topic == down_a), "A's first message is not its own: {first:?}");
    // A publishes where it may not, then on its own up topic: a client of the gateway's identity,
    // which may read every device and backend topic, receives only the last one.
    rt.block_on(async {
        let filters = ["+/rki/v1/#".to_string(), "rki/v1/backend/#".to_string()];
        let (_spy, mut spy_inbox) =
            mqtt_connect_subscribed(port, GATEWAY_USER, GATEWAY_PASSWORD, true, &filters).await?;
        let forbidden = [
            format!("{b}/rki/v1/up"),
            format!("{b}/rki/v1/init"),
            format!("{a}/rki/v1/init"),
            down_b.clone(),
            down_a.clone(),
            "rki/v1/backend/acme/erp/req".to_string(),
            "$CONTROL/dynamic-security/v1".to_string(),
        ];
        for (i, topic) in forbidden.iter().enumerate() {
            spy_a.publish_v4(topic, QoS::AtLeastOnce, 100 + i as u16, b"forbidden", false)?;
        }
        let up_a = format!("{a}/rki/v1/up");
        spy_a.publish_v4(&up_a, QoS::AtLeastOnce, 99, b"sentinel", false)?;
        let first = tokio::time::timeout(Duration::from_secs(10), spy_inbox.recv()).await?;
        assert_eq!(first, Some((up_a, b"sentinel".to_vec())), "a forbidden publication got through");
        TestResult::Ok(())
    })?;

    // init@{SN}: not for an unknown SN, nor with a wrong password; with the live GUDID's password
    // until the device proves its new secrets.
    let c_bootstrap = bootstrap_password(&Gudid::parse(&c_gudid)?, &c);
    assert!(rt.block_on(mqtt_connect(port, "init@NOSUCHSN1", &c_bootstrap, true)).is_err());
    assert!(rt.block_on(mqtt_connect(port, &format!("init@{c}"), "wrong", true)).is_err());
    rt.block_on(mqtt_connect(port, &format!("init@{c}"), &c_bootstrap, true))?;
    let mut device_c = rt.block_on(RawDevice::initialise(port, &c, &c_gudid))?;
    rt.block_on(device_c.send(RawDevice::hello(false)))?;
    let closed = format!("the broker to refuse init@{c} once its device proved its secrets");
    wait::poll_paced(&closed, Duration::from_secs(15), Duration::from_millis(200), || {
        match rt.block_on(mqtt_connect(port, &format!("init@{c}"), &c_bootstrap, true)) {
            Ok(_) => Err("still admitted"),
            Err(_) => Ok(()),
        }
    })?;

    // A backend: admitted at its first CONNECT, confined, refused at the next CONNECT once revoked.
    let api = cluster.api(0);
    let v = api.ok_post("/v1/backends", &json!({ "name": "erp" }))?;
    let id = BackendId::new("acme", "erp")?;
    let secret = BackendSecret::parse(v["secret"].as_str().ok_or("no secret")?)?;
    let backend_password = String::from_utf8(secret.mqtt_password(&id).expose_secret().to_vec())?;
    let mut backend = Raw::open(port)?;
    backend.connect_v4(&id.client_id(), Some((&id.client_id(), &backend_password)), true)?;
    assert_eq!(backend.connack_v4()?.code, ConnectReturnCode::Success, "a new backend at its first CONNECT");
    for (i, filter) in
        ["rki/v1/backend/acme/+/reply", "rki/v1/backend/#", "#", "rki/v1/backend/acme/other/events"].iter().enumerate()
    {
        assert_eq!(backend.subscribe_v4_granted(20 + i as u16, filter)?, [SubscribeReasonCode::Failure], "{filter}");
    }
    let reply = rki_protocol::topic::backend_reply("acme", "erp");
    assert_eq!(backend.subscribe_v4_granted(30, &reply)?, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    api.ok_post("/v1/backends/erp/revoke", &json!({}))?;
    assert!(rt.block_on(mqtt_connect(port, &id.client_id(), &backend_password, true)).is_err(), "revoked, admitted");
    // Its live connection ends too (the plugin looks connected backends up every 5 s).
    assert!(backend.closed_within(Duration::from_secs(15)), "a revoked backend stays connected");

    // Malformed CONNECTs: refused, and the broker serves on.
    let huge = vec![b'S'; 64 * 1024];
    let a_bytes = a.as_bytes();
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("%", connect_packet(b"%", Some(b"%"), Some(b"x"))),
        ("a/b", connect_packet(b"a/b", Some(b"a/b"), Some(b"x"))),
        ("+", connect_packet(b"+", Some(b"+"), Some(b"x"))),
        ("#", connect_packet(b"#", Some(b"#"), Some(b"x"))),
        ("64 KiB", connect_packet(&huge, Some(&huge), Some(b"x"))),
        ("not UTF-8", connect_packet(b"\xff\xfeSN", Some(b"\xff\xfeSN"), Some(b"x"))),
        ("no password", connect_packet(a_bytes, Some(a_bytes), None)),
        ("no user name", connect_packet(a_bytes, None, None)),
        ("another client id", connect_packet(b"other", Some(a_bytes), Some(a_password.as_bytes()))),
        ("init@", connect_packet(b"init@", Some(b"init@"), Some(b"x"))),
        ("backend@acme", connect_packet(b"backend@acme", Some(b"backend@acme"), Some(b"x"))),
    ];
    for (what, packet) in &garbage {
        assert!(refused(port, packet)?, "a CONNECT with {what} was admitted");
    }
    rt.block_on(mqtt_connect(port, &b, &b_password, true)).map_err(|e| format!("the broker after garbage: {e}"))?;
    let log = cluster.mosquitto.log();
    assert!(!log.contains(&a_password) && !log.contains(&backend_password), "a password in the broker's log");
    Ok(())
}

#[test]
fn a_database_outage_refuses_connects_at_once_and_the_broker_serves_on_until_it_returns() -> TestResult {
    let _serial = one_at_a_time();
    let rt = common::runtime();
    let cluster = one_node()?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns("OUT", 2), "out")?;
    let (one, one_gudid) = provisioned.gudids[0].clone();
    let (two, two_gudid) = provisioned.gudids[1].clone();
    let one_password = password(&rt.block_on(initialise(port, &one, &one_gudid))?)?;
    let two_password = password(&rt.block_on(initialise(port, &two, &two_gudid))?)?;
    let down_one = format!("{one}/rki/v1/down");
    let (_one_client, mut one_inbox) =
        rt.block_on(mqtt_connect_subscribed(port, &one, &one_password, true, std::slice::from_ref(&down_one)))?;

    cluster.pg.stop()?;
    // Every CONNECT is refused, each at once: the broker does not wait on a dead database.
    for _ in 0..20 {
        let started = Instant::now();
        assert!(rt.block_on(mqtt_connect(port, &two, &two_password, true)).is_err(), "admitted without the store");
        assert!(started.elapsed() < Duration::from_secs(3), "a refusal took {:?}", started.elapsed());
    }
    // Connected clients are served: the gateway's identity (Mosquitto's files) reaches terminal
    // one, before and after a reload (SIGHUP: Mosquitto checks every connected client again, and
    // the plugin keeps those it admitted on their connection, without the store).
    let (gw, _) = rt.block_on(mqtt_connect(port, GATEWAY_USER, GATEWAY_PASSWORD, true))?;
    let mut reach_one = |text: &'static [u8]| {
        rt.block_on(async {
            gw.publish(down_one.as_str(), rumqttc::QoS::AtLeastOnce, false, text.to_vec()).await?;
            let got = tokio::time::timeout(Duration::from_secs(10), one_inbox.recv()).await?;
            assert_eq!(got, Some((down_one.clone(), text.to_vec())));
            TestResult::Ok(())
        })
    };
    reach_one(b"still here")?;
    let hup = std::process::Command::new("kill").arg("-HUP").arg(cluster.mosquitto.pid().to_string()).status()?;
    assert!(hup.success());
    wait::until("the broker to reload", Duration::from_secs(10), || {
        cluster.mosquitto.log().contains("rki-auth: reload")
    })?;
    reach_one(b"after the reload")?;
    assert!(rt.block_on(mqtt_connect(port, &two, &two_password, true)).is_err(), "admitted after the reload");

    cluster.pg.start_again()?;
    wait::poll_paced(
        "the broker to admit a terminal again",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || rt.block_on(mqtt_connect(port, &two, &two_password, true)).map(|_| ()).map_err(|e| e.to_string()),
    )?;
    let log = cluster.mosquitto.log();
    assert!(log.contains("rki-auth: store unavailable, CONNECTs refused"), "{log}");
    assert!(log.contains("rki-auth: the store answers again"), "{log}");
    let outage_lines = log.lines().filter(|l| l.contains("rki-auth: store unavailable")).count();
    assert!(outage_lines <= 10, "{outage_lines} lines for a few seconds' outage: at most one a second");
    Ok(())
}
