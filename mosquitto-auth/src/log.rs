//! What the plugin may write to Mosquitto's log: at most one line per [`LOG_INTERVAL`] (a flood of
//! CONNECTs, or a database down under a reconnecting fleet, cannot fill the disk), no password, no
//! URL, and of what a client chose only a short escaped prefix.

use std::time::{Duration, Instant};

/// Shortest time between two lines.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Characters of a client-chosen name the log may show.
pub const NAME_SHOWN_MAX: usize = 32;

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
    fn a_client_chosen_name_is_cut_and_escaped() {
        assert_eq!(escaped(b"SN0001"), "SN0001");
        assert_eq!(escaped(b"a b\n\"\\\xff%"), "a\\x20b\\x0a\\x22\\x5c\\xff%");
        let long = escaped(&[b'A'; 64 * 1024]);
        assert_eq!(long, format!("{}…", "A".repeat(NAME_SHOWN_MAX)));
    }
}
