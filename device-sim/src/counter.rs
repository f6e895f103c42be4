//! The terminal's up-frame counter.
//!
//! Every frame the terminal sends carries a counter strictly above the previous one, and the gateway
//! refuses one that is not (replay). A counter kept only in the state file could go backwards after
//! a crash that lost the last write, so the counter is time based: microseconds since the UNIX
//! epoch, bumped by one when the clock has not moved past the last value used. After a crash the
//! clock has moved on, so the next counter is above anything sent before, persisted or not.

use std::time::{SystemTime, UNIX_EPOCH};

/// A strictly increasing, time-based counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpCounter {
    last: u64,
}

impl UpCounter {
    /// Resumes after `last`, the last counter known to have been used (0 if none).
    pub fn resume_after(last: u64) -> Self {
        Self { last }
    }

    /// The next counter: now in microseconds, or `last + 1` if the clock has not moved past it.
    pub fn next_counter(&mut self) -> u64 {
        let now = now_micros();
        self.last = if now > self.last { now } else { self.last.saturating_add(1) };
        self.last
    }

    /// The last counter handed out.
    pub fn last(&self) -> u64 {
        self.last
    }
}

fn now_micros() -> u64 {
    // A clock before 1970 gives 0, and the counter then simply counts up from `last`.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_strictly_increase_even_within_one_microsecond() {
        let mut counter = UpCounter::default();
        let mut previous = 0;
        for _ in 0..10_000 {
            let next = counter.next_counter();
            assert!(next > previous);
            previous = next;
        }
    }

    #[test]
    fn a_counter_resumed_in_the_future_keeps_counting_up() {
        let far = u64::MAX / 2;
        let mut counter = UpCounter::resume_after(far);
        assert_eq!(counter.next_counter(), far + 1);
        assert_eq!(counter.next_counter(), far + 2);
    }

    #[test]
    fn a_counter_resumed_in_the_past_jumps_to_now() {
        let mut counter = UpCounter::resume_after(5);
        assert!(counter.next_counter() > 1_600_000_000_000_000);
    }
}
