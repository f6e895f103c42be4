//! # rki-loadtest
//!
//! Fleet-scale pushes against the RKI gateway, measured, and the same load against Mosquitto 2 as
//! the baseline a user would otherwise build. Every scenario drives the real thing: the gateway
//! binary as a child process (or one already running), its admin API, real MQTT, and simulated
//! terminals from `rki-device-sim` in this process; the `engine` scenario calls the gateway's
//! library and store directly, with no socket.
//!
//! ## Layout
//! - [`push`]: `fleet-push`, `reconnect-storm` and `churn` against the gateway.
//! - [`baseline`]: `broker-baseline`, Mosquitto (or, with `--baseline-broker rumqttd`, rumqttd
//!   alone with the gateway's settings: the `rki-plain-broker` binary) plus a backend with no
//!   crypto and no store.
//! - [`engine_scale`]: `engine`, one task for a million devices, derive + wrap + persist.
//! - [`gateway`]: the gateway child process (MQTT on 0.0.0.0, so terminals can spread over
//!   127.0.0.1–127.0.0.N) or an attached one.
//! - [`setup`]: the operator's preparation through the admin API (key ceremony, import, group,
//!   assignment, GUDIDs), task creation and the records read back.
//! - [`procfs`]: RSS, peak RSS and CPU seconds of a process and of each of its threads.
//! - [`progress`]: the live progress line on stderr.
//! - [`summary`]: the figures of one run, as printed and as `--json`.
//! - [`topology`]: one gateway with its embedded broker and SQLite, or N nodes on Mosquitto and
//!   PostgreSQL (`fleet-push --gateways 3 --broker mosquitto --store postgres`).
//! - [`plot`]: PNG line charts (the delivery curve, the scaling curve) with no font file.
//!
//! ## Invariants
//! - Nothing is written behind the gateway's back in the socket scenarios: terminals initialise
//!   through the real GUDID flow, the task is created through the API, and success is read from
//!   the durable records, whose KCVs are recomputed here from the test BDK.
//! - A scenario's limits (timeouts, fleet size) are named; every wait ends.

pub mod baseline;
pub mod engine_scale;
pub mod gateway;
pub mod plot;
pub mod procfs;
pub mod progress;
pub mod push;
pub mod setup;
pub mod summary;
pub mod topology;

/// The error of a run: a one-line reason for the operator.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
