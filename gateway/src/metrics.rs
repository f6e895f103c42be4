//! Every metric the gateway exports, named once. Prometheus conventions: the `rki_` prefix, base
//! units in the name, `_total` on counters, `_seconds` histograms. Labels have bounded cardinality:
//! never an SN or a task ID. `docs/METRICS.md` documents each one.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const DEVICES_CONNECTED: &str = "rki_devices_connected";
pub const DEVICES: &str = "rki_devices";
pub const EXECUTIONS: &str = "rki_executions";
pub const EXECUTIONS_EXPIRING: &str = "rki_executions_expiring";
pub const EXECUTIONS_EXPIRING_NEVER_SEEN: &str = "rki_executions_expiring_never_seen";
pub const DELIVERIES_TOTAL: &str = "rki_deliveries_total";
pub const ACKS_TOTAL: &str = "rki_acks_total";
pub const REJECTED_MESSAGES_TOTAL: &str = "rki_rejected_messages_total";
pub const BACKEND_REQUESTS_TOTAL: &str = "rki_backend_requests_total";
pub const BACKEND_REQUESTS_REFUSED_TOTAL: &str = "rki_backend_requests_refused_total";
pub const BACKEND_EVENTS_PUBLISHED_TOTAL: &str = "rki_backend_events_published_total";
pub const DUPLICATE_ACKS_TOTAL: &str = "rki_duplicate_acks_total";
pub const EXECUTIONS_ENDED_TOTAL: &str = "rki_executions_ended_total";
pub const KEYS_INJECTED_TOTAL: &str = "rki_keys_injected_total";
pub const DELIVERY_LATENCY_SECONDS: &str = "rki_delivery_latency_seconds";
pub const STORE_COMMIT_SECONDS: &str = "rki_store_commit_seconds";
pub const INBOUND_WAIT_SECONDS: &str = "rki_inbound_wait_seconds";
pub const STORE_BATCH_WRITES: &str = "rki_store_batch_writes";
pub const STORE_UP: &str = "rki_store_up";
pub const HTTP_ACCEPT_ERRORS_TOTAL: &str = "rki_http_accept_errors_total";
pub const STORE_COMMIT_LATENCY_SECONDS: &str = "rki_store_commit_latency_seconds";
pub const STORE_FREE_BYTES: &str = "rki_store_free_bytes";
pub const STORE_LOCKS_HELD: &str = "rki_store_locks_held";
pub const BROKER_UP: &str = "rki_broker_up";
pub const STORE_LISTENER_UP: &str = "rki_store_listener_up";
pub const DYNSEC_UP: &str = "rki_dynsec_up";
pub const DYNSEC_FAILURES_TOTAL: &str = "rki_dynsec_failures_total";
pub const DYNSEC_MISSING_DEVICES: &str = "rki_dynsec_missing_devices";
pub const MQTT_CONNECT_REFUSED_TOTAL: &str = "rki_mqtt_connects_refused_total";
pub const MQTT_CONNECTIONS_MAX: &str = "rki_mqtt_connections_max";
pub const GUDIDS: &str = "rki_gudids";
pub const GUDID_REFUSALS_TOTAL: &str = "rki_gudid_refusals_total";
pub const DEVICE_REFUSALS_TOTAL: &str = "rki_device_refusals_total";
pub const BROKER_RECONNECTS_TOTAL: &str = "rki_broker_reconnects_total";
pub const INITIALISATIONS_TOTAL: &str = "rki_initialisations_total";
pub const TASKS_CREATED_TOTAL: &str = "rki_tasks_created_total";
pub const API_ERRORS_TOTAL: &str = "rki_api_errors_total";
pub const TASK_EXECUTIONS: &str = "rki_task_executions";
pub const TASKS: &str = "rki_tasks";
pub const STORE_FILE_BYTES: &str = "rki_store_file_bytes";
pub const SAMPLER_DURATION_SECONDS: &str = "rki_sampler_duration_seconds";
pub const SAMPLER_ERRORS_TOTAL: &str = "rki_sampler_errors_total";
pub const BUILD_INFO: &str = "rki_build_info";
pub const MQTT_CONNECTIONS: &str = "rki_mqtt_connections";
pub const MQTT_CONNECTIONS_CLOSED_TOTAL: &str = "rki_mqtt_connections_closed_total";
pub const MQTT_REFUSALS_TOTAL: &str = "rki_mqtt_refusals_total";
pub const MQTT_ACCEPT_ERRORS_TOTAL: &str = "rki_mqtt_accept_errors_total";
pub const MQTT_SESSIONS: &str = "rki_mqtt_sessions";
pub const MQTT_DOWNLINKS_TOTAL: &str = "rki_mqtt_downlinks_total";
pub const MQTT_DOWNLINKS_DROPPED_TOTAL: &str = "rki_mqtt_downlinks_dropped_total";

/// Histogram buckets for delivery latency (creation → durable ack, hello → durable ack): from a
/// few milliseconds on a live push (a 100-terminal push here: 50 to 100 ms from creation) to days
/// for devices that come online late.
const DELIVERY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0, 604800.0];
/// Store commit latency: a batched SQLite commit with fsync took 3.5 ms on average here (a
/// 100-terminal push: 51 of 60 commits under 5 ms, none above 50 ms).
const COMMIT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Inbound wait (broker hand-over → the device's shard takes the message up): well under a
/// millisecond when idle, up to seconds when a fleet's acks arrive at once.
const INBOUND_WAIT_BUCKETS: &[f64] = &[0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0];

/// Installs the global recorder. Call once per process; later calls return the first handle's
/// twin (tests start several gateways in one process only through the binary).
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY_SECONDS.into()), DELIVERY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_COMMIT_SECONDS.into()), COMMIT_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_WRITES.into()), BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(INBOUND_WAIT_SECONDS.into()), INBOUND_WAIT_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    register_closed_series();
    Ok(handle)
}

/// Exports the counters whose labels come from a closed vocabulary at 0 from the start, so that
/// `rate()` and `increase()` see their first increment and a dashboard shows 0 rather than "no
/// data". (Prometheus cannot tell how much a series that appears between two scrapes went up.)
fn register_closed_series() {
    use crate::domain::ExecutionState;
    for result in ["succeeded", "failed"] {
        metrics::counter!(ACKS_TOTAL, "result" => result).increment(0);
    }
    for state in ExecutionState::ALL.into_iter().filter(|s| !s.is_open()) {
        metrics::counter!(EXECUTIONS_ENDED_TOTAL, "state" => state.as_str()).increment(0);
    }
    for reason in
        ["connect_timeout", "packet_too_large", "keep_alive", "dropped", "disconnect", "taken_over", "revoked"]
    {
        metrics::counter!(MQTT_CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(0);
    }
    for reason in ["foreign_subscribe", "wildcard_subscribe", "foreign_publish", "retain", "qos2"] {
        metrics::counter!(MQTT_REFUSALS_TOTAL, "reason" => reason).increment(0);
    }
    for reason in crate::mqtt::rules::CONNECT_REFUSAL_REASONS {
        metrics::counter!(MQTT_CONNECT_REFUSED_TOTAL, "reason" => *reason).increment(0);
    }
    for reason in ["not_a_device_topic", "no_session", "session_full"] {
        metrics::counter!(MQTT_DOWNLINKS_DROPPED_TOTAL, "reason" => reason).increment(0);
    }
    {
        use rki_protocol::message::RefusalCode::*;
        for code in [UnknownGudid, GudidUsed, GudidExpired, GudidWrongDevice, BadTag, Malformed] {
            metrics::counter!(GUDID_REFUSALS_TOTAL, "reason" => code.as_str()).increment(0);
        }
    }
    metrics::counter!(MQTT_ACCEPT_ERRORS_TOTAL, "kind" => "descriptors").increment(0);
    for name in [DELIVERIES_TOTAL, DUPLICATE_ACKS_TOTAL, INITIALISATIONS_TOTAL, SAMPLER_ERRORS_TOTAL] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(DEVICES_CONNECTED).set(0.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(DEVICES_CONNECTED, "Devices whose last presence message was a hello (online).");
    describe_gauge!(
        DEVICES,
        "Devices by state (registered, initialised, online, never_seen, locked, assigned, pending), by organization. \
         A device counts in every state that holds for it."
    );
    describe_gauge!(EXECUTIONS, "Executions by state, by organization.");
    describe_gauge!(EXECUTIONS_EXPIRING, "Open executions whose deadline falls within the window (24h, 7d).");
    describe_gauge!(
        EXECUTIONS_EXPIRING_NEVER_SEEN,
        "Open executions of devices never seen online whose deadline falls within the window (24h, 7d)."
    );
    describe_counter!(DELIVERIES_TOTAL, "Download messages published to devices (first and repeated).");
    describe_counter!(BACKEND_REQUESTS_TOTAL, "Backend requests verified and answered, by request.");
    describe_counter!(
        BACKEND_REQUESTS_REFUSED_TOTAL,
        "Backend requests dropped unanswered (bad frame, MAC, replay, …) or refused, by reason."
    );
    describe_counter!(BACKEND_EVENTS_PUBLISHED_TOTAL, "Backend events published (first and repeated).");
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
    describe_histogram!(
        INBOUND_WAIT_SECONDS,
        Unit::Seconds,
        "Time a device message waits between the broker's hand-over and its shard taking it up."
    );
    describe_gauge!(
        STORE_UP,
        "1 when the store can be read and written at normal speed (what /healthz reports); 0 while it is \
         unavailable, full, short of space or slow."
    );
    describe_counter!(
        HTTP_ACCEPT_ERRORS_TOTAL,
        "Failed accepts on the admin HTTP port (out of descriptors); each backs off 100 ms."
    );
    describe_gauge!(
        STORE_COMMIT_LATENCY_SECONDS,
        Unit::Seconds,
        "The longer of the last store commit's duration and the age of the commit running now."
    );
    describe_gauge!(STORE_FREE_BYTES, Unit::Bytes, "SQLite: free space on the data directory's filesystem.");
    describe_gauge!(
        STORE_LOCKS_HELD,
        "SQLite: 1 while the gateway holds SQLite's locks on its store (checked in /proc/locks); 0 is an \
         emergency: another process opening the store could delete its write-ahead log."
    );
    describe_gauge!(DYNSEC_UP, "1 while this node's admin link to Mosquitto's dynamic security plugin is ready.");
    describe_counter!(DYNSEC_FAILURES_TOTAL, "Credentials the dynamic security plugin did not take after every retry.");
    describe_gauge!(
        DYNSEC_MISSING_DEVICES,
        "Initialised devices without a client at the dynamic security plugin (last reconcile)."
    );
    describe_gauge!(BROKER_UP, "1 while the MQTT endpoint listens, or the external broker is connected.");
    describe_gauge!(
        STORE_LISTENER_UP,
        "Several nodes (PostgreSQL): 1 while this node listens for the tasks other nodes create; 0 while it \
         does not, and finds them at its sweep's next tick (a second at most)."
    );
    describe_counter!(MQTT_CONNECT_REFUSED_TOTAL, "MQTT CONNECTs refused, by reason.");
    describe_gauge!(MQTT_CONNECTIONS_MAX, "The MQTT endpoint's connection bound (from the open-file limit).");
    describe_gauge!(GUDIDS, "GUDIDs by state (unused, used, expired), by organization.");
    describe_counter!(GUDID_REFUSALS_TOTAL, "CreateKey requests refused, by reason.");
    describe_counter!(
        DEVICE_REFUSALS_TOTAL,
        "Signed refusals from terminals of down frames they did not act on, by frame and code."
    );
    describe_counter!(
        BROKER_RECONNECTS_TOTAL,
        "External broker mode: the gateway's connection to the broker came back after a loss."
    );
    describe_counter!(INITIALISATIONS_TOTAL, "Successful device initialisations.");
    describe_counter!(TASKS_CREATED_TOTAL, "Download tasks created, by organization.");
    describe_counter!(API_ERRORS_TOTAL, "Admin API requests answered with an error, by code.");
    describe_gauge!(TASK_EXECUTIONS, "Executions of unfinished tasks by state, by organization (push progress).");
    describe_gauge!(TASKS, "Download tasks by status (unfinished, done), by organization.");
    describe_gauge!(STORE_FILE_BYTES, Unit::Bytes, "Size of the store's files (database, wal).");
    describe_gauge!(SAMPLER_DURATION_SECONDS, Unit::Seconds, "How long the last metrics sample took.");
    describe_counter!(SAMPLER_ERRORS_TOTAL, "Metrics samples that failed (the store could not be read).");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the running build.");
    describe_gauge!(MQTT_CONNECTIONS, "MQTT endpoint: accepted (CONNACKed) connections open now.");
    describe_counter!(
        MQTT_CONNECTIONS_CLOSED_TOTAL,
        "MQTT endpoint: connections ended, by reason (connect_timeout, packet_too_large, keep_alive, dropped, ...)."
    );
    describe_counter!(
        MQTT_REFUSALS_TOTAL,
        "MQTT endpoint: SUBSCRIBEs and PUBLISHes refused by the access rules, by reason."
    );
    describe_counter!(MQTT_ACCEPT_ERRORS_TOTAL, "MQTT endpoint: failed accepts, by kind (descriptors, other).");
    describe_gauge!(MQTT_SESSIONS, "MQTT endpoint: client sessions held (connected, or kept after a disconnect).");
    describe_counter!(MQTT_DOWNLINKS_TOTAL, "MQTT endpoint: downlinks written at QoS 1 (first sends).");
    describe_counter!(
        MQTT_DOWNLINKS_DROPPED_TOTAL,
        "MQTT endpoint: downlinks not queued, by reason (no_session, session_full); the retry timer or the next hello sends them again."
    );
}

#[cfg(test)]
mod tests {
    //! The metrics review, as tests: names follow the Prometheus conventions, labels have bounded
    //! cardinality, and `docs/METRICS.md` documents every metric with its type.

    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    /// Label keys in use. Each takes a bounded set of values: organization names, states,
    /// reasons and codes from closed vocabularies. An SN, a task ID or a GUDID never is one.
    const LABEL_KEYS: &[&str] = &[
        "org", "state", "status", "result", "kind", "reason", "code", "from", "window", "file", "version", "frame",
        "request",
    ];

    /// `CONSTANT → "rki_name"` for every metric name declared in this file.
    fn declared() -> BTreeMap<String, String> {
        include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub const "))
            .filter_map(|l| {
                let (constant, rest) = l.split_once(": &str = \"")?;
                Some((constant.to_string(), rest.split('"').next()?.to_string()))
            })
            .collect()
    }

    /// `CONSTANT → counter | gauge | histogram (+ unit)` from the `describe_*!` calls.
    fn described() -> BTreeMap<String, (String, String)> {
        let source = include_str!("metrics.rs");
        let mut out = BTreeMap::new();
        for (i, _) in source.match_indices("describe_") {
            let rest = &source[i + "describe_".len()..];
            let Some((kind, args)) = rest.split_once("!(") else { continue };
            if !matches!(kind, "counter" | "gauge" | "histogram") {
                continue;
            }
            let mut parts = args.split(',').map(str::trim);
            let constant = parts.next().unwrap_or_default().to_string();
            let unit = parts.next().filter(|p| p.starts_with("Unit::")).unwrap_or("").to_string();
            assert!(out.insert(constant.clone(), (kind.to_string(), unit)).is_none(), "{constant} described twice");
        }
        out
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_metric_name_follows_the_prometheus_conventions() {
        let declared = declared();
        let described = described();
        assert!(declared.len() >= 20, "parsed only {declared:?}");
        for (constant, name) in &declared {
            assert!(name.starts_with("rki_"), "{name}: the rki_ prefix");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
            let (kind, unit) = described.get(constant).unwrap_or_else(|| panic!("{constant} is never described"));
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}: _total exactly on counters");
            if name.ends_with("_seconds") {
                assert_eq!(unit, "Unit::Seconds", "{name}");
            }
            if name.ends_with("_bytes") {
                assert_eq!(unit, "Unit::Bytes", "{name}");
            }
            if kind == "histogram" && unit == "Unit::Seconds" {
                assert!(name.ends_with("_seconds"), "{name}: a latency histogram in base units");
            }
            for forbidden in ["_ms", "_millis", "_minutes", "_kb", "_mb"] {
                assert!(!name.contains(forbidden), "{name}: base units only");
            }
        }
        for constant in described.keys() {
            assert!(declared.contains_key(constant), "{constant} described but not declared");
        }
    }

    #[test]
    fn every_label_has_bounded_cardinality() {
        let mut files = Vec::new();
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        let mut seen = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).expect("source");
            for call in ["counter!(", "gauge!(", "histogram!("] {
                for (i, _) in text.match_indices(call) {
                    // The macro call up to its closing parenthesis (labels never nest one).
                    let args = &text[i + call.len()..];
                    let args = &args[..args.find(')').unwrap_or(args.len())];
                    for (j, _) in args.match_indices("\" =>") {
                        let key = args[..j].rsplit('"').next().unwrap_or_default();
                        assert!(LABEL_KEYS.contains(&key), "{}: label {key:?} is not a bounded one", file.display());
                        seen += 1;
                    }
                }
            }
            // The sampler builds its labels as (key, value) pairs.
            if file.ends_with("sampler.rs") {
                for (i, _) in text.match_indices("&[(\"") {
                    let key = text[i + 4..].split('"').next().unwrap_or_default();
                    assert!(LABEL_KEYS.contains(&key), "sampler label {key:?}");
                    seen += 1;
                }
            }
        }
        assert!(seen > 10, "found only {seen} labels: is the scan still right?");
    }

    #[test]
    fn every_metric_is_documented_in_metrics_md_with_its_type() {
        let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/METRICS.md");
        let doc = std::fs::read_to_string(&doc_path).expect("docs/METRICS.md");
        // Table rows: | `rki_name` | type | labels | unit | meaning |
        let mut documented = BTreeMap::new();
        for line in doc.lines().filter(|l| l.starts_with("| `rki_")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            assert_eq!(cells.len(), 7, "{name}: a row has metric, type, labels, unit, meaning");
            assert!(!cells[5].is_empty(), "{name}: say what it means");
            documented.insert(name, cells[2].to_string());
        }
        let described = described();
        for (constant, name) in declared() {
            let kind = documented.get(&name).unwrap_or_else(|| panic!("{name} is not documented in docs/METRICS.md"));
            assert_eq!(kind, &described[&constant].0, "{name}: type in docs/METRICS.md");
        }
        let declared: Vec<String> = declared().into_values().collect();
        for name in documented.keys() {
            assert!(declared.contains(name), "docs/METRICS.md documents {name}, which the gateway does not export");
        }
    }
}
