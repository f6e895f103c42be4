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
//!
//! A client is known by the address of Mosquitto's context for its connection, from the CONNECT
//! to the `MOSQ_EVT_DISCONNECT` that Mosquitto sends before it frees the context.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::identity::{Deferred, Identity, Owner};

/// How often connected backends are looked up again.
pub const BACKEND_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Entry {
    username: Box<[u8]>,
    hash: String,
}

#[derive(Debug, Default)]
pub struct Admitted {
    by_client: HashMap<usize, Entry>,
    /// Between `MOSQ_EVT_RELOAD` and the next `MOSQ_EVT_TICK`: Mosquitto is re-checking its
    /// connected clients.
    reloading: bool,
    last_backend_check: Option<Instant>,
}

impl Admitted {
    pub fn admit(&mut self, client: usize, username: &[u8], hash: String) {
        self.by_client.insert(client, Entry { username: username.into(), hash });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_reloads_recheck_of_the_same_connection_and_name_passes() {
        let mut admitted = Admitted::default();
        admitted.admit(0x10, b"SN1", "$7$a".into());
        assert!(!admitted.is_recheck(0x10, b"SN1"), "not during a reload: a CONNECT");
        admitted.reload_started();
        assert!(admitted.is_recheck(0x10, b"SN1"));
        assert!(!admitted.is_recheck(0x10, b"SN2"), "another name on that connection");
        assert!(!admitted.is_recheck(0x20, b"SN1"), "another connection");
        admitted.gone(0x10);
        assert!(!admitted.is_recheck(0x10, b"SN1"), "disconnected");
        admitted.admit(0x10, b"SN1", "$7$a".into());
        admitted.tick();
        assert!(!admitted.is_recheck(0x10, b"SN1"), "the reload is over");
        assert_eq!(admitted.len(), 1);
    }

    #[test]
    fn connected_backends_are_due_once_an_interval() {
        let deferred = Deferred::parse("rki-gateway").expect("list");
        let mut admitted = Admitted::default();
        admitted.admit(1, b"backend@acme~erp", "$7$erp".into());
        admitted.admit(2, b"SN1", "$7$sn".into());
        admitted.admit(3, b"rki-gateway", "x".into());
        let t0 = Instant::now();
        assert_eq!(admitted.backends_due(t0, &deferred), [("backend@acme~erp".to_string(), "$7$erp".to_string())]);
        assert!(admitted.backends_due(t0 + Duration::from_secs(1), &deferred).is_empty());
        assert_eq!(admitted.backends_due(t0 + BACKEND_CHECK_INTERVAL, &deferred).len(), 1);
    }
}
