//! Three gateway nodes on Mosquitto's dynamic security plugin and PostgreSQL
//! (`docs/SCALE-OUT.md`): whichever node answers a terminal's CreateKey, the broker knows the
//! terminal's new password before the answer reaches it, so no terminal is refused at its first
//! CONNECT; a re-initialisation through any node refuses the old password at once; the
//! reconcile removes what the store disowns; only the admin identity reaches `$CONTROL`.

mod common;

use std::time::Duration;

use rki_tests::{mqtt_connect, provision, sns, wait, BrokerAuth, Cluster, ClusterOptions, RawDevice, TestResult};
use serde_json::json;

const TERMINALS: usize = 60;

/// Initialises `sn` (the CreateKey goes to whichever node the shared subscription picks); the
/// bootstrap identity is pushed to the broker just after provisioning, so its first CONNECT may
/// come a moment too early and is retried; the device's own CONNECT is not.
async fn initialise(port: u16, sn: &str, gudid: &str) -> TestResult<rki_protocol::init::DeviceSecrets> {
    wait::poll_async(&format!("the broker to admit init@{sn}"), Duration::from_secs(20), || async {
        match RawDevice::initialise_secrets(port, sn, gudid).await {
            Ok(secrets) => Ok(Ok(secrets)),
            Err(e) if e.to_string().contains("NotAuthorized") => Err(e.to_string()),
            Err(e) => Ok(Err(e)),
        }
    })
    .await?
}

fn password(secrets: &rki_protocol::init::DeviceSecrets) -> TestResult<String> {
    Ok(String::from_utf8(secrets.mqtt_password.expose_secret().to_vec())?)
}

#[test]
fn terminals_initialised_through_every_node_connect_at_once_and_a_reinitialised_one_loses_its_old_password(
) -> TestResult {
    let rt = common::runtime();
    let cluster = Cluster::start(ClusterOptions { broker_auth: BrokerAuth::Dynsec, ..Default::default() })?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns("DYN", TERMINALS), "dyn")?;
    // Every terminal initialises at once, then connects once as itself: no retry allowed.
    let results = rt.block_on(async {
        let tasks: Vec<_> = provisioned
            .gudids
            .iter()
            .cloned()
            .map(|(sn, gudid)| {
                tokio::spawn(async move {
                    let secrets = initialise(port, &sn, &gudid).await.map_err(|e| format!("{sn}: {e}"))?;
                    let pw = password(&secrets).map_err(|e| e.to_string())?;
                    mqtt_connect(port, &sn, &pw, true).await.map_err(|e| format!("{sn} refused at once: {e}"))?;
                    Ok::<(String, rki_protocol::init::DeviceSecrets), String>((sn, secrets))
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(out)
    })?;
    let refused: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{} terminals refused, e.g. {:?}", refused.len(), &refused[..refused.len().min(3)]);
    let mut devices: Vec<(String, rki_protocol::init::DeviceSecrets)> = results.into_iter().flatten().collect();
    let per_node: Vec<f64> = cluster.nodes.iter().map(|n| n.metric("rki_initialisations_total")).collect();
    assert_eq!(per_node.iter().sum::<f64>(), TERMINALS as f64, "{per_node:?}");
    assert!(per_node.iter().all(|n| *n > 0.0), "every node answered some CreateKeys: {per_node:?}");

    // Re-initialisation, the new GUDID provisioned through each node in turn: the old password
    // is refused at the very next CONNECT, the new one accepted.
    for (i, (sn, old)) in devices.iter_mut().take(3).enumerate() {
        let api = cluster.api(i);
        let v = api.ok_post("/v1/gudids", &json!({"sns": [sn.clone()]}))?;
        let gudid = v["gudids"][0]["gudid"].as_str().ok_or("no gudid")?.to_string();
        let new = rt.block_on(initialise(port, sn, &gudid))?;
        let refused = rt.block_on(mqtt_connect(port, sn, &password(old)?, true));
        assert!(refused.is_err(), "{sn}: the old password still opens the broker");
        rt.block_on(mqtt_connect(port, sn, &password(&new)?, true))?;
        *old = new;
    }

    // A device disowned by the store (deleted behind the gateway's back) loses its client at the
    // next reconcile, whichever node runs it; its neighbours keep theirs.
    let (gone, gone_secrets) = &devices[TERMINALS - 1];
    let mut sql = cluster.sql()?;
    sql.execute(
        "UPDATE device_credentials SET broker_password_hash = NULL WHERE device_id = (SELECT id FROM devices WHERE sn = $1)",
        &[gone],
    )?;
    // Each look is a CONNECT that stays open when accepted: about two a second.
    let gone_password = password(gone_secrets)?;
    let refused = format!("the broker to refuse {gone} after the reconcile");
    wait::poll_paced(&refused, Duration::from_secs(40), Duration::from_millis(500), || {
        match rt.block_on(mqtt_connect(port, gone, &gone_password, true)) {
            Ok(_) => Err("still accepted"),
            Err(_) => Ok(()),
        }
    })?;
    let (kept, kept_secrets) = &devices[TERMINALS - 2];
    rt.block_on(mqtt_connect(port, kept, &password(kept_secrets)?, true))?;
    Ok(())
}

#[test]
fn only_the_admin_identity_reaches_the_control_topic() -> TestResult {
    let rt = common::runtime();
    let cluster = Cluster::start(ClusterOptions { nodes: 1, broker_auth: BrokerAuth::Dynsec, ..Default::default() })?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns("CTL", 1), "ctl")?;
    let (sn, gudid) = provisioned.gudids[0].clone();
    let secrets = rt.block_on(initialise(port, &sn, &gudid))?;
    // A terminal that asks the plugin to create a client for it gets no answer and no client.
    rt.block_on(async {
        let (client, mut rx) = mqtt_connect(port, &sn, &password(&secrets)?, true).await?;
        client.subscribe("$CONTROL/dynamic-security/v1/response", rumqttc::QoS::AtLeastOnce).await?;
        let command = json!({"commands": [{"command": "createClient", "username": "intruder", "password": "x"}]});
        client.publish("$CONTROL/dynamic-security/v1", rumqttc::QoS::AtLeastOnce, false, command.to_string()).await?;
        let answer = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert!(
            answer.is_err() || answer.as_ref().is_ok_and(|a| a.is_none()),
            "the terminal got an answer: {answer:?}"
        );
        TestResult::Ok(())
    })?;
    assert!(rt.block_on(mqtt_connect(port, "intruder", "x", true)).is_err(), "the terminal created a client");
    // The gateway's message identity is no admin either: only `rki-admin` (each node's admin
    // link) is.
    rt.block_on(async {
        let (client, mut rx) = mqtt_connect(port, rki_tests::cluster::GATEWAY_USER, "gw-secret", true).await?;
        client.subscribe("$CONTROL/dynamic-security/v1/response", rumqttc::QoS::AtLeastOnce).await?;
        let command = json!({"commands": [{"command": "listClients"}]});
        client.publish("$CONTROL/dynamic-security/v1", rumqttc::QoS::AtLeastOnce, false, command.to_string()).await?;
        let answer = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert!(answer.is_err() || answer.as_ref().is_ok_and(|a| a.is_none()), "the gateway identity got an answer");
        TestResult::Ok(())
    })?;
    let file = std::fs::read_to_string(cluster.shared.join("dynamic-security.json"))?;
    assert!(!file.contains("gw-secret"), "a password in clear in the plugin's file");
    Ok(())
}
