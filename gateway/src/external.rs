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

/// The filters the gateway subscribes to, shared across nodes when a group is set.
pub fn filters(shared_group: Option<&str>) -> Vec<String> {
    [topic::FILTER_DEVICE_UP, topic::FILTER_INIT, topic::FILTER_BACKEND_TASKS]
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

struct ClientOutbound {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

impl Outbound for ClientOutbound {
    fn publish(&self, topic: String, payload: Vec<u8>) {
        if self.tx.send((topic, payload)).is_err() {
            error!("broker client closed; publish dropped (the retry timer will re-deliver)");
        }
    }
}

pub struct ExternalLink {
    pub outbound: Arc<dyn Outbound>,
    client: AsyncClient,
    eventloop: Option<EventLoop>,
    publishes: Option<mpsc::UnboundedReceiver<(String, Vec<u8>)>>,
    filters: Vec<String>,
}

impl ExternalLink {
    pub fn new(config: &ExternalBroker) -> Result<Self, String> {
        let (host, port) = parse_url(&config.url)?;
        let client_id = config.client_id.clone().unwrap_or_else(|| format!("rki-gateway-{}", std::process::id()));
        let mut options = MqttOptions::new(client_id, host, port);
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        options.set_keep_alive(Duration::from_secs(30));
        // One node keeps its session, so what arrives while it restarts waits for it. Several
        // nodes (a shared group) must not: a broker keeps routing the group's share of messages
        // to a stopped member's persistent session (Mosquitto 2 does) instead of to the nodes
        // still running. A message lost with a node is recovered by the cluster sweep, which
        // re-delivers what stays unacked (the terminal answers a repeated download again).
        options.set_clean_session(config.shared_group.is_some());
        options.set_inflight(INFLIGHT_MAX);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE_LEN);
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            outbound: Arc::new(ClientOutbound { tx }),
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
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        info!(filters = ?filters, "connected to the external broker");
                        metrics::gauge!(m::BROKER_UP).set(1.0);
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
    fn shared_filters_carry_the_group() {
        assert_eq!(filters(Some("rki"))[0], "$share/rki/+/rki/v1/up");
        assert_eq!(filters(None)[0], "+/rki/v1/up");
    }
}
