//! The gateway as a client of a real Mosquitto 2 with its dynamic security plugin, whose clients
//! and roles (managed by the gateway over `$CONTROL`) confine every terminal, and every RKI
//! backend, to its own topics.

mod common;

use std::time::Duration;

use rki_device_sim::{BrokerAddr, Brokers, Knobs};
use rki_protocol::backend::{BackendId, BackendSecret};
use rki_protocol::frame::MacKey;
use rki_protocol::message::{BackendAnswer, BackendRequest, Body, Message, Request};
use rki_protocol::topic;
use rki_tests::cluster::seed_and_start_mosquitto;
use rki_tests::{
    create_task, expected_kcv, for_group, for_sns, free_port, mqtt_connect, mqtt_connect_subscribed, provision, sns,
    task_detail, temp_dir, wait, wait_bootstrap_admitted, wait_task_done, GatewayOptions, GatewayProcess, Mosquitto,
    RawDevice, TestResult,
};
use rumqttc::QoS;
use serde_json::json;

fn external_config(port: u16, dir: &std::path::Path) -> String {
    format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\nusername = \"rki-gateway\"\npassword = \"gw-secret\"\n\
         client_id = \"rki-gateway-1\"\nshared_group = \"rki\"\n\
         [broker.dynsec]\nadmin_password_file = \"{}/broker-admin.secret\"\n",
        dir.display()
    )
}

/// Seeds Mosquitto's dynamic security plugin (`rki-gateway dynsec-init`), starts Mosquitto on
/// it, then the gateway in external mode, which manages the broker's clients from then on.
fn gateway_and_mosquitto() -> TestResult<(GatewayProcess, Mosquitto)> {
    let port = free_port();
    let dir = temp_dir("dynsec");
    let toml = external_config(port, &dir);
    let mosquitto = seed_and_start_mosquitto(&toml, &dir, port)?;
    let gw = GatewayProcess::start(GatewayOptions { config_toml: Some(toml), ..Default::default() })?;
    wait::until("the gateway to connect to Mosquitto", Duration::from_secs(15), || {
        gw.metric("rki_broker_up") >= 1.0 && gw.metric("rki_dynsec_up") >= 1.0
    })
    .map_err(|e| format!("{e}: {}", gw.log_tail()))?;
    // Subscribed a moment after the CONNACK (the plugin's broker logs no subscriptions to wait on).
    std::thread::sleep(Duration::from_millis(500));
    Ok((gw, mosquitto))
}

#[test]
fn a_push_through_mosquitto_injects_every_device_once() -> TestResult {
    Mosquitto::binary()?;
    let rt = common::runtime();
    let (gw, mosquitto) = gateway_and_mosquitto()?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("MOSQ", 50), "mq")?;
    rt.block_on(wait_bootstrap_admitted(mosquitto.port, &provisioned.gudids, Duration::from_secs(15)))?;
    let mut config = common::fleet_config(mosquitto.port, &provisioned, Knobs::default())?;
    config.brokers = Brokers::one(BrokerAddr::new("127.0.0.1", mosquitto.port));
    let fleet = rt.block_on(common::spawn_fleet(config, Duration::from_secs(60)))?;
    let task = create_task(&api, &for_group("mq"))?.task.id;
    let done = wait_task_done(&api, task, Duration::from_secs(60))?;
    assert_eq!(done.task.counts.succeeded, 50, "{:?}", done.task.counts);
    for r in api.ok(&format!("/v1/records?task={task}"))?["records"].as_array().cloned().unwrap_or_default() {
        assert_eq!(r["kcv"].as_str(), Some(expected_kcv(r["key_id"].as_str().unwrap_or_default())?.as_str()));
    }
    for d in fleet.devices() {
        assert_eq!(d.status().injections, 1);
    }
    rt.block_on(fleet.shutdown());
    Ok(())
}

#[test]
fn mosquitto_refuses_a_terminal_the_topics_of_another() -> TestResult {
    Mosquitto::binary()?;
    let rt = common::runtime();
    let (gw, mosquitto) = gateway_and_mosquitto()?;
    let api = gw.api();
    let provisioned = provision(&gw, &sns("ACL", 2), "acl")?;
    rt.block_on(wait_bootstrap_admitted(mosquitto.port, &provisioned.gudids, Duration::from_secs(15)))?;
    let (a_sn, a_gudid) = provisioned.gudids[0].clone();
    let (b_sn, b_gudid) = provisioned.gudids[1].clone();
    let mut a = rt.block_on(RawDevice::initialise(mosquitto.port, &a_sn, &a_gudid))?;
    let mut b = rt.block_on(RawDevice::initialise(mosquitto.port, &b_sn, &b_gudid))?;
    // A tries to listen to B's downloads and to everything.
    rt.block_on(a.client.subscribe(topic::device_down(&b_sn), QoS::AtLeastOnce))?;
    rt.block_on(a.client.subscribe("#", QoS::AtLeastOnce))?;
    rt.block_on(b.send(RawDevice::hello(false)))?;
    gw.wait_online(&[&b_sn], true)?;
    let task = create_task(&api, &for_sns(&[&b_sn]))?.task.id;
    let Message::Download(d) = rt.block_on(b.next_down(Duration::from_secs(10)))? else {
        return Err("no download for B".into());
    };
    // A saw nothing of it.
    let leaked = rt.block_on(a.next_down(Duration::from_secs(1)));
    assert!(leaked.is_err(), "A received B's traffic: {leaked:?}");
    // (The plugin refuses the SUBSCRIBE, and would filter each delivery by the receive rules
    // anyway: the proof is what A receives, above.)
    // A publishes an ack for B's execution on B's topic: the broker drops it; the gateway never sees it.
    let before = gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}");
    let forged =
        rki_protocol::message::Body { party: b_sn.clone(), counter: a.next_counter(), message: RawDevice::ack(&d) };
    rt.block_on(a.publish_raw(&topic::device_up(&b_sn), rki_protocol::frame::seal(&a.secrets.signing_key, &forged)?))?;
    // Time passing is the point: the forged publish must not reach the gateway within 800 ms
    // (the broker drops it; there is no event to wait for).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        gw.metric("rki_rejected_messages_total{kind=\"ack\",reason=\"bad_mac\"}"),
        before,
        "the forged publish reached the gateway"
    );
    assert_eq!(task_detail(&api, task)?.task.status, "unfinished");
    // B's own ack goes through.
    rt.block_on(b.send(RawDevice::ack(&d)))?;
    wait_task_done(&api, task, Duration::from_secs(10))?;
    Ok(())
}

/// A backend on the dynamic security plugin (`docs/PROTOCOL.md` §12.8): the node creates its
/// client and role before the API answers, so its first CONNECT is accepted; the plugin confines
/// it to its own topics; its revocation deletes the client, which ends its live connection, and
/// every later CONNECT is refused.
#[test]
fn on_the_plugin_a_backend_is_admitted_at_once_confined_and_cut_off_by_its_revocation() -> TestResult {
    Mosquitto::binary()?;
    let rt = common::runtime();
    let (gw, mosquitto) = gateway_and_mosquitto()?;
    let port = mosquitto.port;
    let backend = |name: &str| -> TestResult<(BackendId, String, MacKey)> {
        let v = gw.api().ok_post("/v1/backends", &json!({ "name": name }))?;
        let secret = BackendSecret::parse(v["secret"].as_str().ok_or("no secret")?)?;
        let id = BackendId::new("acme", name)?;
        let password = String::from_utf8(secret.mqtt_password(&id).expose_secret().to_vec())?;
        Ok((id.clone(), password, secret.mac_key(&id)))
    };
    let (erp, erp_password, erp_key) = backend("erp-d")?;
    let (crm, crm_password, crm_key) = backend("crm-d")?;
    rt.block_on(async {
        let own = |id: &BackendId| {
            vec![topic::backend_reply(id.org(), id.name()), topic::backend_events(id.org(), id.name())]
        };
        // erp-d also tries crm-d's topics and everything else.
        let mut erp_filters = own(&erp);
        erp_filters.extend(own(&crm));
        erp_filters.extend(["rki/v1/backend/acme/#".to_string(), "#".to_string()]);
        let (erp_client, mut erp_inbox) =
            mqtt_connect_subscribed(port, &erp.client_id(), &erp_password, true, &erp_filters).await?;
        let (crm_client, mut crm_inbox) =
            mqtt_connect_subscribed(port, &crm.client_id(), &crm_password, true, &own(&crm)).await?;
        // crm-d asks; the answer reaches crm-d, and nothing of it reaches erp-d.
        let query = |key: &MacKey, request_id: u64| {
            let body = Body {
                party: "acme".into(),
                counter: rki_tests::now_us(),
                message: Message::BackendRequest(BackendRequest {
                    request_id,
                    request: Request::QueryTask { task_id: 1 },
                }),
            };
            rki_protocol::frame::seal(key, &body)
        };
        crm_client
            .publish(topic::backend_request("acme", "crm-d"), QoS::AtLeastOnce, false, query(&crm_key, 1)?)
            .await?;
        let (reply_topic, bytes) =
            tokio::time::timeout(Duration::from_secs(10), crm_inbox.recv()).await?.ok_or("crm-d disconnected")?;
        assert_eq!(reply_topic, topic::backend_reply("acme", "crm-d"));
        let verified = rki_protocol::frame::open_backend(&bytes)?.verify(&crm_key).map_err(|e| format!("{e}"))?;
        assert!(matches!(verified.body.message, Message::BackendAnswer(BackendAnswer { request_id: 1, .. })));
        let leaked = tokio::time::timeout(Duration::from_secs(1), erp_inbox.recv()).await;
        assert!(leaked.is_err(), "erp-d received crm-d's traffic: {leaked:?}");
        // erp-d's own request is answered through the broker.
        erp_client
            .publish(topic::backend_request("acme", "erp-d"), QoS::AtLeastOnce, false, query(&erp_key, 2)?)
            .await?;
        let (reply_topic, _) =
            tokio::time::timeout(Duration::from_secs(10), erp_inbox.recv()).await?.ok_or("erp-d disconnected")?;
        assert_eq!(reply_topic, topic::backend_reply("acme", "erp-d"));
        // Revoked: the plugin deletes the client, which ends the live connection at once.
        gw.api().ok_post("/v1/backends/erp-d/revoke", &json!({}))?;
        let ended =
            tokio::time::timeout(Duration::from_secs(10), async { while erp_inbox.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "the revoked backend's connection is still open");
        assert!(mqtt_connect(port, &erp.client_id(), &erp_password, true).await.is_err(), "a revoked backend connects");
        // crm-d is untouched.
        assert!(mqtt_connect(port, &crm.client_id(), &crm_password, true).await.is_ok());
        TestResult::Ok(())
    })?;
    Ok(())
}
