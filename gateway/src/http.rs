//! The admin HTTP server: axum's router served by hyper, with the limits an exposed port needs.
//!
//! `axum::serve` accepts every connection and waits for its headers forever, so 2,000 slowloris
//! connections stayed open, and at a low open-file limit idle HTTP connections took the
//! descriptors the MQTT endpoint needed. Here:
//! - a permit is taken before each `accept` ([`MAX_CONNECTIONS`] at most, and no more than the
//!   process's share of descriptors left to HTTP): over the cap, connections wait in the kernel's
//!   backlog instead of taking descriptors from the terminals;
//! - hyper closes a connection that has not sent a whole request head within
//!   [`HEADER_READ_TIMEOUT`], including an idle keep-alive connection waiting for its next request;
//! - a request body must arrive within [`BODY_READ_TIMEOUT`] (tower-http), or the request fails;
//! - an `accept` that fails (EMFILE, ENFILE) backs off and logs at most once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

/// Admin connections at most, whatever the open-file limit.
pub const MAX_CONNECTIONS: usize = 512;
/// Descriptors kept for the store, logs and the HTTP listeners before connections are counted.
const DESCRIPTOR_RESERVE: u64 = 64;
/// A request head (line and headers) must arrive within this, on a new or an idle connection
/// (`http_header_timeout_seconds`).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive whole within this (`http_body_timeout_seconds`).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}
/// The pause after a failed `accept` (out of descriptors): the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The admin port's connection cap: [`MAX_CONNECTIONS`], and never more than what the open-file
/// limit leaves once `mqtt_connections` and a reserve are set aside, so the admin port can
/// never starve the terminals. At least 8, so that an operator can always get in.
pub fn max_connections(fd_limit: u64, mqtt_connections: usize) -> usize {
    let left = fd_limit.saturating_sub(mqtt_connections as u64).saturating_sub(DESCRIPTOR_RESERVE);
    (left as usize).clamp(8, MAX_CONNECTIONS)
}

/// Serves `router` on `listener` until `shutdown` turns true, then lets the connections in flight
/// finish their request (up to 10 s).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_read_timeout));
    let header_read_timeout = limits.header_read_timeout;
    let mut last_error_log: Option<Instant> = None;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                metrics::counter!(crate::metrics::HTTP_ACCEPT_ERRORS_TOTAL).increment(1);
                if last_error_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, "admin HTTP accept failed; backing off");
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stopping = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
                }
            }
            drop(permit);
        });
        // Reap finished connections so the set does not grow with the total served.
        while connections.try_join_next().is_some() {}
    }
    info!("admin HTTP: no longer accepting; finishing requests in flight");
    let _ =
        tokio::time::timeout(Duration::from_secs(11), async { while connections.join_next().await.is_some() {} }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_the_terminals_their_descriptors() {
        assert_eq!(max_connections(20_000, 1_000), MAX_CONNECTIONS, "a generous limit: the fixed cap");
        assert_eq!(max_connections(1_200, 1_000), 136, "what the terminals and the reserve leave");
        assert_eq!(max_connections(1_000, 1_000), 8, "never below a handful for operators");
    }
}
