//! The external-broker mode: the gateway is an MQTT client (rumqttc, MQTT 3.1.1) of a broker that
//! operators already run (Mosquitto here; EMQX or HiveMQ clusters in production). Device
//! authentication and per-device topic ACLs are the broker's job in this mode (see
//! [`crate::mosquitto`] for the generated Mosquitto files). The gateway's own subscriptions are
//! shared (`$share/{group}/…`) so that several gateway nodes split the device traffic, each message
//! handled by exactly one node.

use std::sync::Arc;
use std::time::Duration;

use rki_protocol::topic;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::ExternalBroker;
use crate::engine::{Engine, InboundMessage, Outbound};
use crate::metrics as m;

/// Publishes queued before the broker accepts them.
const REQUEST_QUEUE_LEN: usize = 65_536;
/// QoS 1 publishes in flight on the gateway's connection.
const INFLIGHT_MAX: u16 = 1000;
/// Longest wait for the dynamic security plugin to confirm a device's new password before its
/// CreateKeyAnswer goes out anyway (the terminal then retries its CONNECT until the put lands).
const BROKER_PASSWORD_WAIT_MAX: Duration = Duration::from_secs(10);

/// The filters the gateway subscribes to, shared across nodes when a group is set.
pub fn filters(shared_group: Option<&str>) -> Vec<String> {
    [topic::FILTER_DEVICE_UP, topic::FILTER_INIT, topic::FILTER_BACKEND_REQUESTS]
        .iter()
        .map(|f| match shared_group {
            Some(group) => format!("$share/{group}/{f}"),
            None => f.to_string(),
        })
        .collect()
}

/// Parses `mqtt://host:port` (port 1883 by default).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| format!("broker url {url:?}: expected mqtt://host:port"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.to_string(), port.parse().map_err(|_| format!("broker url {url:?}: bad port"))?))
        }
        None if !rest.is_empty() => Ok((rest.to_string(), 1883)),
        _ => Err(format!("broker url {url:?}: no host")),
    }
}

/// Whether the gateway's session at the broker is persistent (see [`ExternalBroker::persistent_session`]).
pub fn persistent_session(config: &ExternalBroker, shared_store: bool) -> bool {
    config.persistent_session.unwrap_or(config.client_id.is_some() && !shared_store)
}

struct ClientOutbound {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
    /// The admin link to Mosquitto's dynamic security plugin, when the broker keeps its own
    /// registry: new passwords go there (the file mode and other brokers read the store).
    dynsec: Option<crate::dynsec::Admin>,
}

impl Outbound for ClientOutbound {
    fn publish(&self, topic: String, payload: Vec<u8>) {
        if self.tx.send((topic, payload)).is_err() {
            error!("broker client closed; publish dropped (the retry timer will re-deliver)");
        }
    }

    fn broker_passwords(
        &self,
        changes: Vec<(crate::dynsec::BrokerIdentity, rki_protocol::secret::SecretBytes)>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        match self.dynsec.clone() {
            // The put goes on in its own task; the caller (a CreateKeyAnswer held back, its
            // inbound shard with it) waits for it at most BROKER_PASSWORD_WAIT_MAX.
            Some(admin) => Box::pin(async move {
                let put = tokio::spawn(async move { admin.put_identities(changes).await });
                if tokio::time::timeout(BROKER_PASSWORD_WAIT_MAX, put).await.is_err() {
                    warn!("the broker has not confirmed new credentials in time; going on without");
                }
            }),
            None => Box::pin(std::future::ready(())),
        }
    }

    fn broker_revoked(
        &self,
        identities: Vec<crate::dynsec::BrokerIdentity>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        match self.dynsec.clone() {
            // A removal that fails here is done by the next reconcile (the store disowns it).
            Some(admin) => Box::pin(async move {
                let clients: Vec<(String, String)> = identities.iter().map(|i| (i.username(), i.role())).collect();
                let removal = tokio::time::timeout(BROKER_PASSWORD_WAIT_MAX, admin.remove_clients(&clients)).await;
                match removal {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "the broker did not remove revoked clients; the reconcile will"),
                    Err(_) => warn!("the broker has not removed revoked clients in time; the reconcile will"),
                }
            }),
            None => Box::pin(std::future::ready(())),
        }
    }
}

pub struct ExternalLink {
    pub outbound: Arc<dyn Outbound>,
    /// This node's admin link to the dynamic security plugin (`[broker.dynsec]`).
    pub dynsec: Option<crate::dynsec::Admin>,
    client: AsyncClient,
    eventloop: Option<EventLoop>,
    publishes: Option<mpsc::UnboundedReceiver<(String, Vec<u8>)>>,
    filters: Vec<String>,
}

impl ExternalLink {
    /// `shared_store`: other nodes may share the store (PostgreSQL), which decides the default
    /// of [`ExternalBroker::persistent_session`].
    pub fn new(config: &ExternalBroker, shared_store: bool) -> Result<Self, String> {
        let (host, port) = parse_url(&config.url)?;
        let client_id = config.client_id.clone().unwrap_or_else(|| format!("rki-gateway-{}", std::process::id()));
        let mut options = MqttOptions::new(client_id, host, port);
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        options.set_keep_alive(Duration::from_secs(30));
        // One node keeps its session (shared group or not), so that what arrives while its
        // connection is down (a broker restart, with Mosquitto's `persistence true`) waits for
        // it instead of being dropped. Several nodes (PostgreSQL) must not by default: a broker
        // keeps routing the group's share of messages to a stopped member's persistent session
        // (Mosquitto 2 does) instead of to the nodes still running. A message lost with a node is
        // recovered by the cluster sweep, which re-delivers what stays unacked (the terminal
        // answers a repeated download again). A session under a one-off client id would be
        // orphaned at the next start: persistent only with a configured `client_id`.
        let persistent = persistent_session(config, shared_store);
        if persistent && config.client_id.is_none() {
            return Err("broker.persistent_session needs a stable broker.client_id".into());
        }
        info!(client_id = ?config.client_id, persistent, "external broker session");
        options.set_clean_session(!persistent);
        options.set_inflight(INFLIGHT_MAX);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE_LEN);
        let (tx, rx) = mpsc::unbounded_channel();
        let dynsec = config.dynsec.as_ref().map(|d| crate::dynsec::Admin::connect(config, d)).transpose()?;
        Ok(Self {
            outbound: Arc::new(ClientOutbound { tx, dynsec: dynsec.clone() }),
            dynsec,
            client,
            eventloop: Some(eventloop),
            publishes: Some(rx),
            filters: filters(config.shared_group.as_deref()),
        })
    }

    /// Runs the connection: (re)subscribes after every CONNACK, feeds inbound messages to the
    /// engine, and sends queued publishes at QoS 1.
    pub fn run(&mut self, engine: Arc<Engine>) -> Result<(), String> {
        let mut eventloop = self.eventloop.take().ok_or("already running")?;
        let mut publishes = self.publishes.take().ok_or("already running")?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some((topic, payload)) = publishes.recv().await {
                if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
                    error!(error = %e, "broker publish failed");
                }
            }
        });
        let client = self.client.clone();
        let filters = self.filters.clone();
        tokio::spawn(async move {
            let mut connected_before = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        info!(filters = ?filters, session_present = ack.session_present, "connected to the external broker");
                        metrics::gauge!(m::BROKER_UP).set(1.0);
                        if connected_before {
                            // What happened while the connection was down is unknown: acks may
                            // have been dropped and wills published late.
                            engine.on_broker_reconnected();
                        }
                        connected_before = true;
                        for filter in &filters {
                            if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                                error!(error = %e, filter, "subscribe failed");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        engine.submit(InboundMessage::new(p.topic, p.payload.to_vec())).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            error!("the broker refused a subscription (check the gateway user's ACL)");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics::gauge!(m::BROKER_UP).set(0.0);
                        warn!(error = %e, "external broker connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(parse_url("mqtt://127.0.0.1:1884").ok(), Some(("127.0.0.1".into(), 1884)));
        assert_eq!(parse_url("mqtt://broker").ok(), Some(("broker".into(), 1883)));
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("mqtt://:1").is_err());
    }

    #[test]
    fn one_node_with_a_stable_client_id_keeps_its_session_and_several_nodes_do_not() {
        let mut config = ExternalBroker {
            url: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            client_id: Some("rki-gateway-1".into()),
            shared_group: Some("rki".into()),
            persistent_session: None,
            mosquitto_sync: None,
            dynsec: None,
        };
        assert!(persistent_session(&config, false), "one node (SQLite), stable id");
        assert!(!persistent_session(&config, true), "several nodes (PostgreSQL)");
        config.persistent_session = Some(true);
        assert!(persistent_session(&config, true), "explicitly asked for");
        config.persistent_session = None;
        config.client_id = None;
        assert!(!persistent_session(&config, false), "a one-off client id");
        config.persistent_session = Some(true);
        assert!(ExternalLink::new(&config, false).is_err(), "a persistent session needs a stable id");
    }

    #[test]
    fn shared_filters_carry_the_group() {
        assert_eq!(filters(Some("rki"))[0], "$share/rki/+/rki/v1/up");
        assert_eq!(filters(None)[0], "+/rki/v1/up");
    }
}
