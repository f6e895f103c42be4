//! `rki-plain-broker`: rumqttd alone, with the settings the gateway's embedded rumqttd had before
//! the gateway got its own MQTT endpoint, and nothing of the gateway (no authentication, no engine,
//! no store). `rki-loadtest broker-baseline --baseline-broker rumqttd` starts it, so that the
//! rumqttd figures stay measurable beside the endpoint's and Mosquitto's.
//!
//! rumqttd binds its listener with the standard library's backlog of 128 (it takes neither a
//! socket nor a backlog); the gateway used to raise it from outside, which this baseline no longer
//! does: it is rumqttd as it ships.

use std::collections::HashMap;
use std::net::SocketAddr;

use clap::Parser;
use rki_protocol::topic;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};

/// The gateway's allocator, so that "rumqttd alone" differs from the gateway only by the gateway.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Segment size of a device's own topic filter: a handful of frames.
const DEVICE_SEGMENT_BYTES: usize = 16 * 1024;
/// Segment size of the wildcard filters a gateway subscribes to: a fleet-wide burst of acks.
const FLEET_SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// Largest MQTT payload accepted: a frame is at most 4 KiB.
const MAX_PAYLOAD_BYTES: usize = 8 * 1024;
/// File descriptors kept for everything but connections.
const FD_RESERVE: u64 = 300;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The address the MQTT listener binds.
    #[arg(long)]
    listen: SocketAddr,
}

fn config(addr: SocketAddr, max_connections: usize) -> Config {
    let mut custom = HashMap::new();
    for filter in [topic::FILTER_DEVICE_UP, topic::FILTER_INIT, topic::FILTER_BACKEND_REQUESTS] {
        custom
            .insert(filter.to_string(), SegmentConfig { max_segment_size: FLEET_SEGMENT_BYTES, max_segment_count: 4 });
    }
    let router = RouterConfig {
        max_connections,
        max_outgoing_packet_count: 200,
        max_segment_size: DEVICE_SEGMENT_BYTES,
        max_segment_count: 2,
        custom_segment: Some(custom),
        ..Default::default()
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    let server =
        ServerSettings { name: "v4".into(), listen: addr, tls: None, next_connection_delay_ms: 0, connections };
    Config { id: 0, router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Default::default() }
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    rki_device_sim::raise_fd_limit().map_err(|e| format!("open-file limit: {e}"))?;
    let max_connections = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((_, hard)) if hard > FD_RESERVE + 100 => (hard - FD_RESERVE).min(1_000_000) as usize,
        _ => 1000,
    };
    Broker::new(config(cli.listen, max_connections)).start().map_err(|e| format!("rumqttd: {e}"))
}
