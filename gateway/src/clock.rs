//! Time is injected: every deadline in the engine reads a [`Clock`], so a test can move 31 days in a
//! millisecond. The system clock is the default; the adjustable clock is for tests only and is
//! enabled by configuration (`clock = "adjustable"`), never silently.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the UNIX epoch.
pub type Millis = i64;

#[derive(Debug)]
pub struct Clock {
    /// Added to the system time; only ever non-zero on an adjustable clock.
    offset_ms: AtomicI64,
    /// Whether `advance` is allowed.
    adjustable: bool,
}

impl Clock {
    pub fn system() -> Self {
        Self { offset_ms: AtomicI64::new(0), adjustable: false }
    }

    pub fn adjustable() -> Self {
        Self { offset_ms: AtomicI64::new(0), adjustable: true }
    }

    pub fn is_adjustable(&self) -> bool {
        self.adjustable
    }

    pub fn now_ms(&self) -> Millis {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        system + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves the clock forward. Refused on the system clock; time never goes backwards.
    pub fn advance(&self, by_ms: i64) -> Result<Millis, &'static str> {
        if !self.adjustable {
            return Err("the clock is not adjustable (set clock = \"adjustable\" in tests only)");
        }
        if by_ms < 0 {
            return Err("the clock only moves forward");
        }
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
        Ok(self.now_ms())
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
        assert!(Clock::system().advance(1).is_err());
    }

    #[test]
    fn an_adjustable_clock_moves_forward_only() {
        let clock = Clock::adjustable();
        let before = clock.now_ms();
        let after = clock.advance(31 * 86_400_000).expect("advance");
        assert!(after - before >= 31 * 86_400_000);
        assert!(clock.advance(-1).is_err());
    }
}
