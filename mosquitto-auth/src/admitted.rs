//! The clients the plugin admitted that are still connected, each with the hash its password
//! matched. Two things need them:
//! - **A reload.** On SIGHUP (Debian's logrotate sends one daily) Mosquitto checks every
//!   connected client's user name and password again, through the same `BASIC_AUTH` callback as
//!   a CONNECT. Looked up in the store, that would be one query per connected terminal on the
//!   broker thread (seconds at fleet size), and a reload while the database is down would
//!   disconnect the whole fleet. Between the reload's start (`MOSQ_EVT_RELOAD`) and the broker's
//!   next loop (`MOSQ_EVT_TICK`), a check of a client admitted on this very connection, under the
//!   same user name, is a re-check, and passes: the plugin checks credentials at CONNECT.
//! - **A revoked backend.** Every [`BACKEND_CHECK_INTERVAL`], each connected backend's hash is
//!   looked up again (backends are few); a backend whose hash the store no longer holds (revoked,
//!   or created anew with another secret) is disconnected, so that it stops receiving its
//!   organization's events.
//! - **A terminal initialised again just after it was admitted.** With several gateway nodes, a
//!   terminal can be admitted with one initialisation's password a moment before a newer
//!   initialisation of the same GUDID commits (PROTOCOL.md §7.5: the gateway answers a newer
//!   CreateKey anew until the GUDID is proven). It would stay connected with secrets the store no
//!   longer holds: its hellos and its downloads fail their MAC, and it never gets a key. So each
//!   terminal is looked up again [`TERMINAL_RECHECKS`] after its admission, all of those due in
//!   one query per tick, and disconnected if its hash is gone; it then reconnects, is refused,
//!   and initialises again (§7.5).
//!
//! A client is known by the address of Mosquitto's context for its connection, from the CONNECT
//! to the `MOSQ_EVT_DISCONNECT` that Mosquitto sends before it frees the context.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::identity::{Deferred, Identity, Owner};

/// How often connected backends are looked up again.
pub const BACKEND_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// When, after its admission, a terminal is looked up again: a newer initialisation commits
/// within seconds of the older one's answer (the terminal's own wait for an answer is 10 s).
pub const TERMINAL_RECHECKS: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(30)];

/// Most terminals looked up again in one query; the rest wait for the next one.
pub const TERMINAL_RECHECKS_PER_TICK: usize = 500;

/// At most one terminals' re-check query per this. The query runs on the broker's only thread:
/// in a 19,000-terminal storm, a query of 1,000 SNs on every tick held it long enough that the
/// gateway nodes' keep-alives expired (all three at once) and a few hellos were lost.
pub const TERMINAL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Entry {
    username: Box<[u8]>,
    hash: String,
    admitted_at: Instant,
    /// How many of [`TERMINAL_RECHECKS`] are done.
    rechecks: usize,
}

#[derive(Debug, Default)]
pub struct Admitted {
    by_client: HashMap<usize, Entry>,
    /// Between `MOSQ_EVT_RELOAD` and the next `MOSQ_EVT_TICK`: Mosquitto is re-checking its
    /// connected clients.
    reloading: bool,
    last_backend_check: Option<Instant>,
    last_terminal_check: Option<Instant>,
}

impl Admitted {
    pub fn admit(&mut self, client: usize, username: &[u8], hash: String, now: Instant) {
        self.by_client.insert(client, Entry { username: username.into(), hash, admitted_at: now, rechecks: 0 });
    }

    pub fn gone(&mut self, client: usize) {
        self.by_client.remove(&client);
    }

    pub fn reload_started(&mut self) {
        self.reloading = true;
    }

    pub fn tick(&mut self) {
        self.reloading = false;
    }

    /// Whether this check is a reload's re-check of a client the plugin admitted on this
    /// connection under `username`.
    pub fn is_recheck(&self, client: usize, username: &[u8]) -> bool {
        self.reloading && self.by_client.get(&client).is_some_and(|e| *e.username == *username)
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// The connected backends, `(user name, hash it connected with)`, when a check is due at
    /// `now`; none otherwise.
    pub fn backends_due(&mut self, now: Instant, deferred: &Deferred) -> Vec<(String, String)> {
        if self.last_backend_check.is_some_and(|at| now.duration_since(at) < BACKEND_CHECK_INTERVAL) {
            return Vec::new();
        }
        self.last_backend_check = Some(now);
        self.by_client
            .values()
            .filter(|e| {
                matches!(crate::identity::owner(&e.username, deferred), Owner::Plugin(Identity::Backend { .. }))
            })
            .filter_map(|e| Some((String::from_utf8(e.username.to_vec()).ok()?, e.hash.clone())))
            .collect()
    }
}

impl Admitted {
    /// The connected terminals due for a look-up again at `now` ([`TERMINAL_RECHECKS`]), as
    /// `(SN, hash it connected with)`, at most [`TERMINAL_RECHECKS_PER_TICK`]; each is counted as
    /// looked up.
    pub fn terminals_due(&mut self, now: Instant, deferred: &Deferred) -> Vec<(String, String)> {
        if self.last_terminal_check.is_some_and(|at| now.saturating_duration_since(at) < TERMINAL_CHECK_INTERVAL) {
            return Vec::new();
        }
        let mut due = Vec::new();
        for e in self.by_client.values_mut() {
            if due.len() >= TERMINAL_RECHECKS_PER_TICK {
                break;
            }
            let Some(after) = TERMINAL_RECHECKS.get(e.rechecks) else { continue };
            if now.saturating_duration_since(e.admitted_at) < *after {
                continue;
            }
            let Owner::Plugin(Identity::Terminal { sn }) = crate::identity::owner(&e.username, deferred) else {
                continue;
            };
            e.rechecks += 1;
            due.push((sn.to_string(), e.hash.clone()));
        }
        if !due.is_empty() {
            self.last_terminal_check = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_reloads_recheck_of_the_same_connection_and_name_passes() {
        let mut admitted = Admitted::default();
        admitted.admit(0x10, b"SN1", "$7$a".into(), Instant::now());
        assert!(!admitted.is_recheck(0x10, b"SN1"), "not during a reload: a CONNECT");
        admitted.reload_started();
        assert!(admitted.is_recheck(0x10, b"SN1"));
        assert!(!admitted.is_recheck(0x10, b"SN2"), "another name on that connection");
        assert!(!admitted.is_recheck(0x20, b"SN1"), "another connection");
        admitted.gone(0x10);
        assert!(!admitted.is_recheck(0x10, b"SN1"), "disconnected");
        admitted.admit(0x10, b"SN1", "$7$a".into(), Instant::now());
        admitted.tick();
        assert!(!admitted.is_recheck(0x10, b"SN1"), "the reload is over");
        assert_eq!(admitted.len(), 1);
    }

    #[test]
    fn connected_backends_are_due_once_an_interval() {
        let deferred = Deferred::parse("rki-gateway").expect("list");
        let mut admitted = Admitted::default();
        admitted.admit(1, b"backend@acme~erp", "$7$erp".into(), Instant::now());
        admitted.admit(2, b"SN1", "$7$sn".into(), Instant::now());
        admitted.admit(3, b"rki-gateway", "x".into(), Instant::now());
        let t0 = Instant::now();
        assert_eq!(admitted.backends_due(t0, &deferred), [("backend@acme~erp".to_string(), "$7$erp".to_string())]);
        assert!(admitted.backends_due(t0 + Duration::from_secs(1), &deferred).is_empty());
        assert_eq!(admitted.backends_due(t0 + BACKEND_CHECK_INTERVAL, &deferred).len(), 1);
    }

    #[test]
    fn terminals_are_due_twice_after_their_admission_and_never_again() {
        let deferred = Deferred::parse("rki-gateway").expect("list");
        let mut admitted = Admitted::default();
        let t0 = Instant::now();
        admitted.admit(1, b"SN1", "$7$one".into(), t0);
        admitted.admit(2, b"backend@acme~erp", "$7$erp".into(), t0);
        admitted.admit(3, b"init@SN2", "$7$boot".into(), t0);
        admitted.admit(4, b"SN3", "$7$three".into(), t0 + Duration::from_secs(5));
        assert!(admitted.terminals_due(t0 + Duration::from_secs(9), &deferred).is_empty());
        assert_eq!(admitted.terminals_due(t0 + TERMINAL_RECHECKS[0], &deferred), [("SN1".into(), "$7$one".into())]);
        assert!(admitted.terminals_due(t0 + TERMINAL_RECHECKS[0], &deferred).is_empty(), "once per step");
        let mut due = admitted.terminals_due(t0 + TERMINAL_RECHECKS[1], &deferred);
        due.sort();
        assert_eq!(due, [("SN1".to_string(), "$7$one".to_string()), ("SN3".to_string(), "$7$three".to_string())]);
        assert_eq!(admitted.terminals_due(t0 + Duration::from_secs(3600), &deferred).len(), 1, "SN3's second");
        assert!(admitted.terminals_due(t0 + Duration::from_secs(7200), &deferred).is_empty(), "never again");
    }

    #[test]
    fn a_tick_looks_up_a_bounded_number_of_terminals() {
        let deferred = Deferred::default();
        let mut admitted = Admitted::default();
        let t0 = Instant::now();
        for i in 0..TERMINAL_RECHECKS_PER_TICK + 5 {
            admitted.admit(i, format!("SN{i}").as_bytes(), "$7$x".into(), t0);
        }
        let later = t0 + TERMINAL_RECHECKS[0];
        assert_eq!(admitted.terminals_due(later, &deferred).len(), TERMINAL_RECHECKS_PER_TICK);
        assert!(admitted.terminals_due(later, &deferred).is_empty(), "one query per interval");
        let next = later + TERMINAL_CHECK_INTERVAL;
        assert_eq!(admitted.terminals_due(next, &deferred).len(), 5, "the rest at the next one");
    }
}
