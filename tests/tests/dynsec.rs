//! Three gateway nodes on Mosquitto's dynamic security plugin and PostgreSQL
//! (`docs/SCALE-OUT.md`): whichever node answers a terminal's CreateKey, the broker knows the
//! terminal's new password before the answer reaches it, so no terminal is refused at its first
//! CONNECT; a re-initialisation through any node refuses the old password at once; the
//! reconcile removes what the store disowns; only the admin identity reaches `$CONTROL`.

#[path = "support/broker_auth.rs"]
mod broker_auth;
mod common;

use std::time::Duration;

use broker_auth::{initialise, password};
use rki_tests::{mqtt_connect, provision, sns, wait, BrokerAuth, Cluster, ClusterOptions, TestResult};
use serde_json::json;

const TERMINALS: usize = 60;

#[test]
fn terminals_initialised_through_every_node_connect_at_once_and_a_reinitialised_one_loses_its_old_password(
) -> TestResult {
    let rt = common::runtime();
    let (cluster, devices) =
        broker_auth::initialise_at_once_then_reinitialise(&rt, BrokerAuth::Dynsec, "DYN", TERMINALS)?;
    let port = cluster.mosquitto.port;

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
