//! # rki-gateway
//!
//! The RKI service: the terminals' MQTT endpoint, a durable task engine that derives, wraps and delivers
//! one DUKPT initial key per terminal, verifies each signed ack and records it for good, an admin
//! API and Prometheus metrics.
//!
//! ## Layout
//! - [`config`]: defaults, TOML file, `RKI_…` environment, flags.
//! - [`clock`]: the injected clock (system, or adjustable in tests).
//! - [`domain`]: execution states and their transitions, task expiry bounds, readiness reasons.
//! - [`store`]: the [`store::Store`] interface (one trait per role) on SQLite and PostgreSQL: the
//!   source of truth.
//! - [`keyservice`]: the narrow key-service interface; every clear key lives behind it.
//! - [`engine`]: inbound device messages, delivery, ack verification, the batched committer,
//!   retry and expiry sweeps; its per-device decisions are pure (`engine::session`).
//! - [`service`]: every operator, key-owner and backend action, each audited in its own
//!   transaction.
//! - [`mqtt`]: the terminals' MQTT endpoint (3.1.1 and 5.0, optional TLS): identities, access
//!   rules, sessions and QoS 1 downlinks, routing by SN. The only module that knows MQTT packets.
//! - [`api`]: the axum admin API, `/metrics`, `/healthz`.
//! - [`channel`]: the backend channel: an RKI backend's signed requests over MQTT, answered
//!   through [`service`], and its organization's numbered events.
//! - [`http`]: the admin HTTP server's connections: a cap, header and body deadlines.
//! - [`metrics`]: every metric name, once.
//! - [`portal`]: the fleet manager's web portal under `/portal/`, static files over the `/v1` API.
//! - [`external`], [`mosquitto`] and [`dynsec`]: the gateway as a client of an external broker,
//!   and the broker's credentials: generated password and ACL files, or Mosquitto's dynamic
//!   security plugin.
//! - [`sampler`]: periodic gauges read from the store.
//! - [`server`]: wiring it all together, and graceful shutdown.

pub mod api;
pub mod channel;
pub mod clock;
pub mod config;
pub mod domain;
pub mod dynsec;
pub mod engine;
pub mod external;
pub mod http;
pub mod keyservice;
pub mod metrics;
pub mod mosquitto;
pub mod mqtt;
pub mod portal;
pub mod sampler;
pub mod server;
pub mod service;
pub mod store;
