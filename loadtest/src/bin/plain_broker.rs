//! `rki-plain-broker`: rumqttd alone, with the gateway's embedded-broker settings and nothing of
//! the gateway (no authentication, no engine, no store). `rki-loadtest broker-baseline
//! --baseline-broker rumqttd` starts it, so that the embedded broker's own share of a push can be
//! told apart from the gateway's work and from Mosquitto's.

use std::net::SocketAddr;

use clap::Parser;

/// The gateway's allocator, so that "rumqttd alone" differs from the gateway only by the gateway.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The address the MQTT listener binds.
    #[arg(long)]
    listen: SocketAddr,
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    rki_device_sim::raise_fd_limit().map_err(|e| format!("open-file limit: {e}"))?;
    rki_gateway::broker::run_plain(cli.listen)
}
