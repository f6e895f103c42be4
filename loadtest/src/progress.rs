//! The live progress line on stderr: connected, delivered, acked, errors, once a second.
//!
//! On a terminal the line is rewritten in place; into a file or a pipe a new line is written
//! every [`PIPE_INTERVAL`] instead, so logs stay short.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rki_device_sim::FleetCounters;

/// Refresh period on a terminal.
const TTY_INTERVAL: Duration = Duration::from_secs(1);
/// Period of a new line when stderr is not a terminal.
const PIPE_INTERVAL: Duration = Duration::from_secs(5);

/// What the line shows, updated by the scenario.
#[derive(Debug, Default)]
pub struct Progress {
    /// The fleet's own counters (connected, keys installed, errors).
    pub fleet: Mutex<Option<Arc<FleetCounters>>>,
    /// Devices connected, when not from a fleet's counters (the baseline's backend counts hellos).
    pub connected: AtomicU64,
    /// Downloads received by terminals (keys installed), when not from a fleet.
    pub delivered: AtomicU64,
    /// Verified acks: durable records (gateway) or acks received (baseline).
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub total: AtomicU64,
    pub phase: Mutex<String>,
    stop: AtomicBool,
}

impl Progress {
    pub fn new(total: usize) -> Arc<Self> {
        let p = Progress::default();
        p.total.store(total as u64, Ordering::Relaxed);
        Arc::new(p)
    }

    pub fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.to_string();
        }
    }

    pub fn set_fleet(&self, counters: Arc<FleetCounters>) {
        if let Ok(mut f) = self.fleet.lock() {
            *f = Some(counters);
        }
    }

    fn line(&self, since: Instant) -> String {
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let fleet = self.fleet.lock().ok().and_then(|f| f.as_ref().map(|c| c.snapshot()));
        let (connected, delivered, errors) = match fleet {
            Some(s) => (s.connected, s.keys_installed, s.errors + s.rejected_frames + s.refusals_received),
            None => (read(&self.connected), read(&self.delivered), read(&self.errors)),
        };
        let phase = self.phase.lock().map(|p| p.clone()).unwrap_or_default();
        format!(
            "[{:7.1}s] {:<8} connected {}/{} | delivered {} | acked {} | errors {}",
            since.elapsed().as_secs_f64(),
            phase,
            connected,
            read(&self.total),
            delivered,
            read(&self.acked),
            errors
        )
    }

    /// Prints the line until [`Progress::stop`]; `quiet` prints nothing.
    pub fn spawn_printer(self: &Arc<Self>, quiet: bool) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let since = Instant::now();
            let tty = std::io::stderr().is_terminal();
            let interval = if tty { TTY_INTERVAL } else { PIPE_INTERVAL };
            let mut last = Instant::now();
            while !me.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if quiet || last.elapsed() < interval {
                    continue;
                }
                last = Instant::now();
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r\x1b[2K{}", me.line(since));
                } else {
                    let _ = writeln!(err, "{}", me.line(since));
                }
                let _ = err.flush();
            }
            if !quiet {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{}{}", if tty { "\r\x1b[2K" } else { "" }, me.line(since));
            }
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
