//! Time is injected: every deadline in the engine reads a [`Clock`], so a test can move 31 days in a
//! millisecond. The system clock is the default; the adjustable clock is for tests only and is
//! enabled by configuration (`clock = "adjustable"`), never silently.
//!
//! A clock has two readings, and neither goes backwards inside a run:
//! - [`Clock::now_ms`], wall time for timestamps and deadlines (expiry, GUDID validity): the system
//!   time (plus the adjustable offset), but never below a reading already given, nor below the
//!   floor the engine restores from the store at start ([`Clock::raise_floor`]; SQLite only: with
//!   a store several nodes share, their clocks must agree with each other). A backward step
//!   of the system clock therefore stops this reading until the system clock has caught up:
//!   timestamps repeat, and expiries and GUDID validity pause for the length of the step. A forward
//!   step moves them at once (a deadline inside the step passes).
//! - [`Clock::ticks_ms`], elapsed time for retry timing: the process's monotonic clock plus every
//!   forward step of the adjustable clock, so a test fires a retry by moving the clock, and a step
//!   of the system clock, either way, changes no retry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the UNIX epoch.
pub type Millis = i64;

/// The file, in the data directory, that keeps an adjustable clock's offset across restarts.
pub const ADJUSTABLE_OFFSET_FILE: &str = "adjustable-clock-offset-ms";

#[derive(Debug)]
pub struct Clock {
    /// Added to the system time; only ever non-zero on an adjustable clock.
    offset_ms: AtomicI64,
    /// Whether `step` is allowed.
    adjustable: bool,
    /// The highest wall reading given so far (or restored): `now_ms` never returns less.
    floor_ms: AtomicI64,
    /// The sum of forward steps, added to the monotonic elapsed time of `ticks_ms`.
    forward_ms: AtomicI64,
    /// The origin of `ticks_ms`.
    started: Instant,
    /// Where an adjustable clock persists its offset (none: it starts at zero every time).
    offset_file: Option<PathBuf>,
}

impl Clock {
    fn new(adjustable: bool, offset_ms: i64, offset_file: Option<PathBuf>) -> Self {
        Self {
            offset_ms: AtomicI64::new(offset_ms),
            adjustable,
            floor_ms: AtomicI64::new(i64::MIN),
            forward_ms: AtomicI64::new(0),
            started: Instant::now(),
            offset_file,
        }
    }

    pub fn system() -> Self {
        Self::new(false, 0, None)
    }

    /// An adjustable clock that starts at the system time and forgets its offset at exit.
    pub fn adjustable() -> Self {
        Self::new(true, 0, None)
    }

    /// An adjustable clock whose offset is kept in `dir` ([`ADJUSTABLE_OFFSET_FILE`]), so that a
    /// restarted gateway resumes at the time it was set to: the offset is read now, written on
    /// every step.
    pub fn adjustable_persisted(dir: &Path) -> Result<Self, String> {
        let file = dir.join(ADJUSTABLE_OFFSET_FILE);
        let offset_ms = match std::fs::read_to_string(&file) {
            Ok(text) => text
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("{}: expected a whole number of milliseconds", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        Ok(Self::new(true, offset_ms, Some(file)))
    }

    pub fn is_adjustable(&self) -> bool {
        self.adjustable
    }

    fn system_ms() -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    /// Wall time: never below a reading already given, nor below the restored floor.
    pub fn now_ms(&self) -> Millis {
        let now = Self::system_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed));
        let previous = self.floor_ms.fetch_max(now, Ordering::Relaxed);
        previous.max(now)
    }

    /// Elapsed milliseconds since the clock was made, plus every forward step: for retry timing.
    pub fn ticks_ms(&self) -> i64 {
        (self.started.elapsed().as_millis() as i64).saturating_add(self.forward_ms.load(Ordering::Relaxed))
    }

    /// Wall time will not read below `floor_ms` from now on (a floor persisted by a previous run).
    pub fn raise_floor(&self, floor_ms: Millis) {
        self.floor_ms.fetch_max(floor_ms, Ordering::Relaxed);
    }

    /// Steps an adjustable clock forward (positive) or back (negative), and persists the offset
    /// when the clock has a file. Refused on the system clock. A backward step stops the wall
    /// reading until the stepped time has caught up with it (see the module documentation);
    /// `ticks_ms` moves with forward steps only.
    pub fn step(&self, by_ms: i64) -> Result<Millis, String> {
        if !self.adjustable {
            return Err("the clock is not adjustable (set clock = \"adjustable\" in tests only)".into());
        }
        let offset = self.offset_ms.fetch_add(by_ms, Ordering::Relaxed).saturating_add(by_ms);
        if by_ms > 0 {
            self.forward_ms.fetch_add(by_ms, Ordering::Relaxed);
        }
        if let Some(file) = &self.offset_file {
            std::fs::write(file, offset.to_string()).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(self.now_ms())
    }

    /// Moves the clock forward (a `step` that refuses a negative amount).
    pub fn advance(&self, by_ms: i64) -> Result<Millis, String> {
        if by_ms < 0 {
            return Err("advance moves forward; step back with a negative step".into());
        }
        self.step(by_ms)
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_cannot_be_moved() {
        assert!(Clock::system().step(1).is_err());
        assert!(Clock::system().step(-1).is_err());
    }

    #[test]
    fn an_adjustable_clock_moves_forward_and_fires_retries() {
        let clock = Clock::adjustable();
        let (before, ticks) = (clock.now_ms(), clock.ticks_ms());
        let after = clock.advance(31 * 86_400_000).expect("advance");
        assert!(after - before >= 31 * 86_400_000);
        assert!(clock.ticks_ms() - ticks >= 31 * 86_400_000);
        assert!(clock.advance(-1).is_err());
    }

    #[test]
    fn a_backward_step_stops_the_wall_reading_and_leaves_retry_timing_alone() {
        let clock = Clock::adjustable();
        let before = clock.now_ms();
        let ticks = clock.ticks_ms();
        clock.step(-86_400_000).expect("step back");
        assert_eq!(clock.offset_ms(), -86_400_000);
        // Wall time does not go back: it stands at the highest reading until the system catches up.
        for _ in 0..100 {
            assert!(clock.now_ms() >= before);
        }
        assert!(clock.now_ms() - before < 86_400_000);
        assert!(clock.ticks_ms() >= ticks);
    }

    #[test]
    fn a_restored_floor_holds_the_wall_reading_up() {
        let clock = Clock::system();
        let ahead = clock.now_ms() + 3_600_000;
        clock.raise_floor(ahead);
        assert_eq!(clock.now_ms(), ahead);
        clock.raise_floor(0);
        assert_eq!(clock.now_ms(), ahead);
    }

    #[test]
    fn an_adjustable_clock_persists_its_offset_in_its_directory() {
        let dir = std::env::temp_dir().join(format!("rki-clock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let _ = std::fs::remove_file(dir.join(ADJUSTABLE_OFFSET_FILE));
        let clock = Clock::adjustable_persisted(&dir).expect("fresh");
        assert_eq!(clock.offset_ms(), 0);
        clock.step(5_000).expect("forward");
        clock.step(-86_400_000).expect("back");
        let again = Clock::adjustable_persisted(&dir).expect("restored");
        assert_eq!(again.offset_ms(), 5_000 - 86_400_000);
        std::fs::write(dir.join(ADJUSTABLE_OFFSET_FILE), "soon").expect("write");
        assert!(Clock::adjustable_persisted(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
