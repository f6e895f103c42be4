//! The initialisation storm and re-initialisation checks of a broker that learns credentials as
//! the nodes make them (Mosquitto's dynamic security plugin, `dynsec.rs`) or reads them from the
//! store at each CONNECT (the store plugin, `store_auth.rs`): the same spec, either way.

use std::time::Duration;

use rki_protocol::init::DeviceSecrets;
use rki_tests::{mqtt_connect, provision, sns, wait, BrokerAuth, Cluster, ClusterOptions, RawDevice, TestResult};
use serde_json::json;

/// Initialises `sn` (the CreateKey goes to whichever node the shared subscription picks). With
/// the dynamic security plugin the bootstrap identity is pushed to the broker just after
/// provisioning, so its first CONNECT may come a moment too early and is retried; the device's own
/// CONNECT never is.
pub async fn initialise(port: u16, sn: &str, gudid: &str) -> TestResult<DeviceSecrets> {
    wait::poll_async(&format!("the broker to admit init@{sn}"), Duration::from_secs(20), || async {
        match RawDevice::initialise_secrets(port, sn, gudid).await {
            Ok(secrets) => Ok(Ok(secrets)),
            Err(e) if e.to_string().contains("NotAuthorized") => Err(e.to_string()),
            Err(e) => Ok(Err(e)),
        }
    })
    .await?
}

pub fn password(secrets: &DeviceSecrets) -> TestResult<String> {
    Ok(String::from_utf8(secrets.mqtt_password.expose_secret().to_vec())?)
}

/// Three nodes on `auth`: `terminals` SNs provisioned, every terminal initialised at once (each
/// node answers some CreateKeys) and connected once as itself, at its first CONNECT; then three
/// of them re-initialised, the new GUDID provisioned through each node in turn: the old password
/// is refused at the very next CONNECT and the new one accepted. Returns the cluster and the
/// terminals with their current secrets.
pub fn initialise_at_once_then_reinitialise(
    rt: &tokio::runtime::Runtime,
    auth: BrokerAuth,
    prefix: &str,
    terminals: usize,
) -> TestResult<(Cluster, Vec<(String, DeviceSecrets)>)> {
    let _ = rki_device_sim::raise_fd_limit();
    let cluster = Cluster::start(ClusterOptions { broker_auth: auth, ..Default::default() })?;
    let port = cluster.mosquitto.port;
    let provisioned = provision(&cluster.nodes[0], &sns(prefix, terminals), "storm")?;
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
                    Ok::<(String, DeviceSecrets), String>((sn, secrets))
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
    let mut devices: Vec<(String, DeviceSecrets)> = results.into_iter().flatten().collect();
    let per_node: Vec<f64> = cluster.nodes.iter().map(|n| n.metric("rki_initialisations_total")).collect();
    assert_eq!(per_node.iter().sum::<f64>(), terminals as f64, "{per_node:?}");
    assert!(per_node.iter().all(|n| *n > 0.0), "every node answered some CreateKeys: {per_node:?}");

    for (i, (sn, old)) in devices.iter_mut().take(cluster.nodes.len()).enumerate() {
        let api = cluster.api(i);
        let v = api.ok_post("/v1/gudids", &json!({"sns": [sn.clone()]}))?;
        let gudid = v["gudids"][0]["gudid"].as_str().ok_or("no gudid")?.to_string();
        let new = rt.block_on(initialise(port, sn, &gudid))?;
        let refused = rt.block_on(mqtt_connect(port, sn, &password(old)?, true));
        assert!(refused.is_err(), "{sn}: the old password still opens the broker");
        rt.block_on(mqtt_connect(port, sn, &password(&new)?, true))?;
        *old = new;
    }
    Ok((cluster, devices))
}
