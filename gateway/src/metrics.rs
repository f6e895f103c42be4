//! Every metric the gateway exports, named once. Prometheus conventions: the `rki_` prefix, base
//! units in the name, `_total` on counters, `_seconds` histograms. Labels have bounded cardinality:
//! never an SN or a task ID. `docs/METRICS.md` documents each one.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const DEVICES_CONNECTED: &str = "rki_devices_connected";
pub const DEVICES: &str = "rki_devices";
pub const EXECUTIONS: &str = "rki_executions";
pub const EXECUTIONS_EXPIRING: &str = "rki_executions_expiring";
pub const DELIVERIES_TOTAL: &str = "rki_deliveries_total";
pub const ACKS_TOTAL: &str = "rki_acks_total";
pub const REJECTED_MESSAGES_TOTAL: &str = "rki_rejected_messages_total";
pub const DUPLICATE_ACKS_TOTAL: &str = "rki_duplicate_acks_total";
pub const EXECUTIONS_ENDED_TOTAL: &str = "rki_executions_ended_total";
pub const KEYS_INJECTED_TOTAL: &str = "rki_keys_injected_total";
pub const DELIVERY_LATENCY_SECONDS: &str = "rki_delivery_latency_seconds";
pub const STORE_COMMIT_SECONDS: &str = "rki_store_commit_seconds";
pub const STORE_BATCH_WRITES: &str = "rki_store_batch_writes";
pub const STORE_UP: &str = "rki_store_up";
pub const BROKER_UP: &str = "rki_broker_up";
pub const MQTT_CONNECT_REFUSED_TOTAL: &str = "rki_mqtt_connect_refused_total";
pub const MQTT_CONNECTIONS_MAX: &str = "rki_mqtt_connections_max";
pub const GUDIDS: &str = "rki_gudids";
pub const GUDID_REFUSALS_TOTAL: &str = "rki_gudid_refusals_total";
pub const INITIALISATIONS_TOTAL: &str = "rki_initialisations_total";
pub const TASKS_CREATED_TOTAL: &str = "rki_tasks_created_total";
pub const API_ERRORS_TOTAL: &str = "rki_api_errors_total";
pub const TASK_EXECUTIONS: &str = "rki_task_executions";

/// Histogram buckets for delivery latency (creation → durable ack, hello → durable ack): from a
/// few milliseconds on a live push to days for devices that come online late.
const DELIVERY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0, 604800.0];
/// Store commit latency: a batched SQLite commit with fsync takes about a millisecond here.
const COMMIT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0];

/// Installs the global recorder. Call once per process; later calls return the first handle's
/// twin (tests start several gateways in one process only through the binary).
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY_SECONDS.into()), DELIVERY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_COMMIT_SECONDS.into()), COMMIT_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_WRITES.into()), BATCH_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(DEVICES_CONNECTED, "Devices whose last presence message was a hello (online).");
    describe_gauge!(DEVICES, "Registered devices by state (online, locked, assigned, pending, initialised).");
    describe_gauge!(EXECUTIONS, "Executions by state, by organization.");
    describe_gauge!(EXECUTIONS_EXPIRING, "Open executions whose deadline falls within the window (24h, 7d).");
    describe_counter!(DELIVERIES_TOTAL, "Download messages published to devices (first and repeated).");
    describe_counter!(ACKS_TOTAL, "Verified, durable acks by result (succeeded, failed).");
    describe_counter!(
        REJECTED_MESSAGES_TOTAL,
        "Device and backend messages rejected, by kind and reason. A rejected message changes no state."
    );
    describe_counter!(DUPLICATE_ACKS_TOTAL, "Valid acks for executions that had already ended (idempotent re-acks).");
    describe_counter!(EXECUTIONS_ENDED_TOTAL, "Executions ended, by final state.");
    describe_counter!(KEYS_INJECTED_TOTAL, "Keys injected (succeeded executions), by organization: the billing count.");
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Time to a durable verified ack, from task creation or from the device's hello."
    );
    describe_histogram!(STORE_COMMIT_SECONDS, Unit::Seconds, "Latency of one batched store commit.");
    describe_histogram!(STORE_BATCH_WRITES, "Writes per batched store commit.");
    describe_gauge!(STORE_UP, "1 when the last store operation succeeded.");
    describe_gauge!(BROKER_UP, "1 while the MQTT broker (embedded or external) is up.");
    describe_counter!(MQTT_CONNECT_REFUSED_TOTAL, "MQTT CONNECTs refused, by reason.");
    describe_gauge!(MQTT_CONNECTIONS_MAX, "The broker's connection limit (from the open-file limit).");
    describe_gauge!(GUDIDS, "GUDIDs by state (unused, used, expired).");
    describe_counter!(GUDID_REFUSALS_TOTAL, "CreateKey requests refused, by reason.");
    describe_counter!(INITIALISATIONS_TOTAL, "Successful device initialisations.");
    describe_counter!(TASKS_CREATED_TOTAL, "Download tasks created, by organization.");
    describe_counter!(API_ERRORS_TOTAL, "Admin API requests answered with an error, by code.");
    describe_gauge!(TASK_EXECUTIONS, "Executions of unfinished tasks by state, by organization (push progress).");
}
