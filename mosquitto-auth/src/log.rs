//! What the plugin may write to Mosquitto's log: at most one line per [`LOG_INTERVAL`] (a flood of
//! CONNECTs, or a database down under a reconnecting fleet, cannot fill the disk), no password, no
//! URL, and of what a client chose only a short escaped prefix.

use std::time::{Duration, Instant};

/// Shortest time between two lines.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Characters of a client-chosen name the log may show.
pub const NAME_SHOWN_MAX: usize = 32;
/// How often the log says what the CONNECT checks cost the broker (when there were any).
pub const COST_WINDOW: Duration = Duration::from_secs(10);

/// Lets a line through at most once per [`LOG_INTERVAL`], counting those it held back.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(n)` if a line may be written at `now`, `n` being the lines held back since the last
    /// one; `None` otherwise.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now.duration_since(last) < LOG_INTERVAL) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// The broker thread's time in the plugin's CONNECT checks (the store's answer and the PBKDF2),
/// summed over [`COST_WINDOW`] and said once per window: what authenticating from the store costs
/// the broker, which serves nothing else meanwhile.
#[derive(Debug, Default)]
pub struct ConnectCost {
    since: Option<Instant>,
    count: u64,
    total: Duration,
    max: Duration,
}

impl ConnectCost {
    /// Counts one check that took `spent`, ending at `now`; the window's line once it is over.
    pub fn add(&mut self, spent: Duration, now: Instant) -> Option<String> {
        let since = *self.since.get_or_insert(now);
        self.count += 1;
        self.total += spent;
        self.max = self.max.max(spent);
        let window = now.duration_since(since);
        if window < COST_WINDOW {
            return None;
        }
        let line = format!(
            "rki-auth: {} CONNECTs checked in {:.0} s, {} us each on average on the broker thread, {} us at most",
            self.count,
            window.as_secs_f64(),
            (self.total / self.count.max(1) as u32).as_micros(),
            self.max.as_micros()
        );
        *self = ConnectCost::default();
        Some(line)
    }
}

/// The first [`NAME_SHOWN_MAX`] bytes of a client-chosen name, printable ASCII kept and anything
/// else (`\`, `"`, control characters, non-ASCII bytes) as `\xNN`; `…` if it was longer.
pub fn escaped(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(NAME_SHOWN_MAX + 4);
    for &b in bytes.iter().take(NAME_SHOWN_MAX) {
        if b.is_ascii_graphic() && b != b'\\' && b != b'"' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > NAME_SHOWN_MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_held_back_are_counted() {
        let t0 = Instant::now();
        let mut throttle = Throttle::default();
        assert_eq!(throttle.admit(t0), Some(0));
        for ms in [1, 10, 999] {
            assert_eq!(throttle.admit(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.admit(t0 + LOG_INTERVAL), Some(3));
        assert_eq!(throttle.admit(t0 + LOG_INTERVAL * 3), Some(0));
    }

    #[test]
    fn the_cost_of_the_checks_is_said_once_a_window() {
        let t0 = Instant::now();
        let mut cost = ConnectCost::default();
        assert_eq!(cost.add(Duration::from_micros(300), t0), None);
        assert_eq!(cost.add(Duration::from_micros(100), t0 + Duration::from_secs(1)), None);
        let line = cost.add(Duration::from_micros(200), t0 + COST_WINDOW).expect("a line");
        assert_eq!(
            line,
            "rki-auth: 3 CONNECTs checked in 10 s, 200 us each on average on the broker thread, 300 us at most"
        );
        assert_eq!(cost.add(Duration::from_micros(1), t0 + COST_WINDOW * 2), None, "a new window");
    }

    #[test]
    fn a_client_chosen_name_is_cut_and_escaped() {
        assert_eq!(escaped(b"SN0001"), "SN0001");
        assert_eq!(escaped(b"a b\n\"\\\xff%"), "a\\x20b\\x0a\\x22\\x5c\\xff%");
        let long = escaped(&[b'A'; 64 * 1024]);
        assert_eq!(long, format!("{}…", "A".repeat(NAME_SHOWN_MAX)));
    }
}
