//! What the gateway knows of its store's health, for `/healthz`, `rki_store_up` and the API's
//! error codes.
//!
//! A store can be readable and still unable to write (a full disk: SQLite can even reuse its WAL
//! for a small write while every larger one fails), or writing so slowly that every ack waits.
//! A read probe alone says nothing of either, so the engine reports every write's outcome and
//! duration here, and `/healthz` combines them with a read probe and, for SQLite, the free space
//! of the data directory's filesystem.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::StoreError;

/// Why the store cannot be trusted right now. Each has a stable code (the API's problem code
/// and `/healthz`'s `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreFault {
    /// The last write failed for want of space, and none has succeeded since.
    Full(String),
    /// Free space on the data directory's filesystem is below `store_min_free_bytes`.
    LowSpace { free_bytes: u64, min_free_bytes: u64 },
    /// The store cannot be reached or failed an I/O (a database outage, a read-only disk).
    Unavailable(String),
    /// A commit has been running, or the last one ran, longer than `store_slow_commit_ms`.
    Slow { commit_ms: u64, threshold_ms: u64 },
}

impl StoreFault {
    pub fn code(&self) -> &'static str {
        match self {
            StoreFault::Full(_) | StoreFault::LowSpace { .. } => "storage_full",
            StoreFault::Unavailable(_) => "store_unavailable",
            StoreFault::Slow { .. } => "store_slow",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            StoreFault::Full(d) => format!("the store's disk is full: {d}"),
            StoreFault::LowSpace { free_bytes, min_free_bytes } => format!(
                "the store's filesystem has {free_bytes} bytes free, below store_min_free_bytes = {min_free_bytes}; \
                 changes are refused so that the space left goes to the terminals' acks"
            ),
            StoreFault::Unavailable(d) => format!("the store is unavailable: {d}"),
            StoreFault::Slow { commit_ms, threshold_ms } => {
                format!("a store commit took {commit_ms} ms, over store_slow_commit_ms = {threshold_ms}")
            }
        }
    }
}

/// The store's health as the engine has seen it. Shared by the engine, the API and the sampler.
#[derive(Debug)]
pub struct StoreHealth {
    /// The start of this process's monotonic time scale.
    epoch: Instant,
    /// The last failed operation's fault (`Full` or `Unavailable`); cleared by the next success
    /// of the same kind of operation (a write clears a write failure).
    last_failure: Mutex<Option<StoreFault>>,
    /// When the running commit started (ms since `epoch`, plus one), or 0 when none runs.
    commit_started_ms: AtomicI64,
    /// How long the last commit took.
    last_commit_ms: AtomicU64,
    /// `store_slow_commit_ms`.
    slow_commit_ms: AtomicU64,
    /// SQLite: the data directory, whose filesystem's free space is watched; `None` otherwise.
    data_dir: OnceLock<PathBuf>,
    /// `store_min_free_bytes`.
    min_free_bytes: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_failure: Mutex::new(None),
            commit_started_ms: AtomicI64::new(0),
            last_commit_ms: AtomicU64::new(0),
            slow_commit_ms: AtomicU64::new(5_000),
            data_dir: OnceLock::new(),
            min_free_bytes: AtomicU64::new(0),
        }
    }
}

impl StoreHealth {
    /// Sets the thresholds; `data_dir` only for a store on the local filesystem (SQLite).
    pub fn configure(&self, slow_commit_ms: u64, data_dir: Option<PathBuf>, min_free_bytes: u64) {
        self.slow_commit_ms.store(slow_commit_ms.max(1), Ordering::Relaxed);
        if let Some(dir) = data_dir {
            let _ = self.data_dir.set(dir);
        }
        self.min_free_bytes.store(min_free_bytes, Ordering::Relaxed);
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// A commit starts; returns the token [`StoreHealth::commit_finished`] takes.
    pub fn commit_started(&self) -> Instant {
        self.commit_started_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        Instant::now()
    }

    pub fn commit_finished(&self, started: Instant, result: Result<(), &StoreError>) {
        self.commit_started_ms.store(0, Ordering::Relaxed);
        self.last_commit_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        match result {
            Ok(()) => self.write_succeeded(),
            Err(e) => self.record(Err(e)),
        }
    }

    /// Records the outcome of a store call that may only have read: a fault is remembered; a
    /// success clears an outage (the store answered) but not a failed write (a full disk still
    /// serves reads).
    pub fn record(&self, result: Result<(), &StoreError>) {
        let fault = match result {
            Ok(()) => None,
            Err(StoreError::Full(d)) => Some(StoreFault::Full(d.clone())),
            Err(StoreError::Unavailable(d)) => Some(StoreFault::Unavailable(d.clone())),
            // The caller's mistake or a bug, not the store's health.
            Err(_) => return,
        };
        let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        match fault {
            Some(f) => *last = Some(f),
            None if matches!(*last, Some(StoreFault::Unavailable(_))) => *last = None,
            None => {}
        }
    }

    /// A write was committed (an engine batch, or an API change that succeeded): every
    /// remembered fault is over.
    pub fn write_succeeded(&self) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Free bytes on the data directory's filesystem, for an SQLite store.
    pub fn free_bytes(&self) -> Option<u64> {
        let dir = self.data_dir.get()?;
        let stat = rustix::fs::statvfs(dir).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// The space guard alone: whether a change may start.
    pub fn space_fault(&self) -> Option<StoreFault> {
        let min_free_bytes = self.min_free_bytes.load(Ordering::Relaxed);
        let free_bytes = self.free_bytes()?;
        (free_bytes < min_free_bytes).then_some(StoreFault::LowSpace { free_bytes, min_free_bytes })
    }

    /// The longest of the running commit's age and the last commit's duration.
    pub fn commit_latency_ms(&self) -> u64 {
        let started = self.commit_started_ms.load(Ordering::Relaxed);
        let running = if started > 0 { (self.now_ms() + 1 - started).max(0) as u64 } else { 0 };
        running.max(self.last_commit_ms.load(Ordering::Relaxed))
    }

    /// What is wrong with the store now, most severe first; `None` when it is healthy.
    pub fn fault(&self) -> Option<StoreFault> {
        if let Some(f) = self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(f);
        }
        if let Some(f) = self.space_fault() {
            return Some(f);
        }
        let commit_ms = self.commit_latency_ms();
        let threshold_ms = self.slow_commit_ms.load(Ordering::Relaxed);
        (commit_ms > threshold_ms).then_some(StoreFault::Slow { commit_ms, threshold_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_is_a_fault_until_a_write_succeeds_and_an_outage_until_the_store_answers() {
        let health = StoreHealth::default();
        assert_eq!(health.fault(), None);
        health.record(Err(&StoreError::Full("database or disk is full".into())));
        assert_eq!(health.fault().map(|f| f.code()), Some("storage_full"));
        health.record(Err(&StoreError::Conflict("a caller's mistake".into())));
        assert_eq!(health.fault().map(|f| f.code()), Some("storage_full"), "not the store's health");
        health.record(Ok(()));
        assert_eq!(health.fault().map(|f| f.code()), Some("storage_full"), "a read does not clear a failed write");
        health.write_succeeded();
        assert_eq!(health.fault(), None);
        health.record(Err(&StoreError::Unavailable("connection refused".into())));
        assert_eq!(health.fault().map(|f| f.code()), Some("store_unavailable"));
        health.record(Ok(()));
        assert_eq!(health.fault(), None, "the store answered again");
    }

    #[test]
    fn a_commit_running_past_the_threshold_is_slow() {
        let health = StoreHealth::default();
        health.configure(1, None, 0);
        let started = health.commit_started();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(health.fault().map(|f| f.code()), Some("store_slow"), "while it runs");
        health.commit_finished(started, Ok(()));
        assert_eq!(health.fault().map(|f| f.code()), Some("store_slow"), "the last one was slow");
        health.configure(60_000, None, 0);
        assert_eq!(health.fault(), None);
    }

    #[test]
    fn free_space_below_the_minimum_is_a_fault() {
        let health = StoreHealth::default();
        health.configure(5_000, Some(std::env::temp_dir()), u64::MAX);
        assert_eq!(health.fault().map(|f| f.code()), Some("storage_full"));
        health.configure(5_000, None, 0);
        assert_eq!(health.fault(), None);
    }
}
