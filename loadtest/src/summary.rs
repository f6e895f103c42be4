//! The summary of one run: the figures the issue names, under their names, plus what explains
//! them (phases, per-thread CPU, machine load). `--json` prints it as one object.

use serde::Serialize;

/// Delivery latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples_ms` (any order); zeros for no sample.
    pub fn of(samples_ms: &[f64]) -> Latency {
        if samples_ms.is_empty() {
            return Latency::default();
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Latency { p50: rank(50.0), p95: rank(95.0), p99: rank(99.0), max: sorted[sorted.len() - 1] }
    }
}

/// CPU seconds of one thread name during one phase, and seconds its threads were runnable but
/// waited for a CPU (0 in results from before it was measured).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ThreadCpu {
    pub thread: String,
    pub cpu_seconds: f64,
    #[serde(default)]
    pub waiting_seconds: f64,
}

impl ThreadCpu {
    pub fn list(delta: Vec<(String, crate::procfs::ThreadTimes)>) -> Vec<ThreadCpu> {
        delta
            .into_iter()
            .map(|(thread, t)| ThreadCpu { thread, cpu_seconds: round3(t.cpu), waiting_seconds: round3(t.waiting) })
            .collect()
    }
}

/// One run of one scenario at one fleet size.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Summary {
    pub scenario: String,
    /// `rki-gateway` or `mosquitto` (broker-baseline), or `engine` (no sockets).
    pub server: String,
    pub devices: usize,
    /// From the first terminal's start to every terminal connected under its device identity
    /// (for the gateway this includes each terminal's initialisation: two CONNECTs per device).
    pub connect_seconds: f64,
    /// Terminals online per second over the connect phase.
    pub connects_per_second: f64,
    /// The best one-second window of the connect phase.
    pub connects_per_second_peak: f64,
    /// From the task's creation request (or, for the baseline, the first download) to the last
    /// verified, durable ack.
    pub push_seconds: f64,
    /// The creation request alone: derive, wrap, persist, first publish.
    pub task_create_seconds: f64,
    pub keys_per_second: f64,
    /// From the task's creation request to each ack's record, per device.
    pub latency_ms: Latency,
    /// Devices whose key is recorded as succeeded with the KCV computed here independently.
    pub acks_verified: usize,
    /// Devices without a succeeded record at the end.
    pub lost: usize,
    /// Second records of one device, plus second injections on one terminal.
    pub duplicates: usize,
    /// Messages the gateway or the terminals rejected, refusals, connection errors.
    pub errors: u64,
    pub gateway_rss_peak_bytes: u64,
    /// CPU seconds of the server process over its whole life in this run.
    pub gateway_cpu_seconds: f64,
    /// CPU seconds of the server process during the push only.
    pub gateway_cpu_seconds_push: f64,
    /// (RSS with every device connected and idle − RSS before the first connection) / devices.
    pub bytes_per_device: f64,
    /// CPU seconds of this process (the simulated fleet, and the baseline's backend).
    pub loadtest_cpu_seconds: f64,
    /// Server threads by CPU seconds during the connect phase.
    pub threads_connect: Vec<ThreadCpu>,
    /// Server threads by CPU seconds during the push.
    pub threads_push: Vec<ThreadCpu>,
    /// Scenario-specific figures (restart times, churn events, engine phases).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// 1-minute load average at the start and at the end of the run.
    pub load_average_start: f64,
    pub load_average_end: f64,
    /// Acked devices over time: (seconds since the push started, cumulative acks).
    pub curve: Vec<(f64, f64)>,
}

impl Summary {
    /// The human-readable lines printed at the end of a run.
    pub fn report(&self) -> String {
        let mut out = format!(
            "{} on {} with {} devices\n  connect {:.2} s ({:.0}/s, peak {:.0}/s) | push {:.3} s (create {:.3} s) | {:.0} keys/s\n  latency ms p50 {:.0} p95 {:.0} p99 {:.0} max {:.0} | verified {} lost {} duplicates {} errors {}\n  server RSS peak {:.1} MiB | CPU {:.2} s (push {:.2} s) | {:.0} B/device | loadtest CPU {:.2} s",
            self.scenario,
            self.server,
            self.devices,
            self.connect_seconds,
            self.connects_per_second,
            self.connects_per_second_peak,
            self.push_seconds,
            self.task_create_seconds,
            self.keys_per_second,
            self.latency_ms.p50,
            self.latency_ms.p95,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.acks_verified,
            self.lost,
            self.duplicates,
            self.errors,
            self.gateway_rss_peak_bytes as f64 / (1024.0 * 1024.0),
            self.gateway_cpu_seconds,
            self.gateway_cpu_seconds_push,
            self.bytes_per_device,
            self.loadtest_cpu_seconds,
        );
        for (label, threads) in [("connect", &self.threads_connect), ("push", &self.threads_push)] {
            if !threads.is_empty() {
                let top: Vec<String> = threads
                    .iter()
                    .take(6)
                    .map(|t| format!("{} {:.2} ({:.2})", t.thread, t.cpu_seconds, t.waiting_seconds))
                    .collect();
                out.push_str(&format!("\n  server threads ({label}, CPU s (waiting for a CPU s)): {}", top.join(", ")));
            }
        }
        for (k, v) in &self.extra {
            out.push_str(&format!("\n  {k}: {v}"));
        }
        out
    }
}

/// Rounds to milliseconds, for readable JSON.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::of(&samples);
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Latency::of(&[7.0]).p50, 7.0);
        assert_eq!(Latency::of(&[]), Latency::default());
    }
}
