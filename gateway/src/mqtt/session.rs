//! The state the endpoint keeps per client id: the live connection (if any), the subscription, the
//! downlinks not yet written and those written at QoS 1 and not yet PUBACKed. A persistent session
//! outlives its connection, bounded in messages and in time; a clean one ends with it. Nothing here
//! is durable: a restart starts with no sessions, and the device's hello drives redelivery from the
//! store.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// One downlink.
#[derive(Debug, Clone)]
pub struct Down {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// The execution a `Download` carries: withdrawn from a kept session once it has ended.
    pub execution: Option<i64>,
}

/// A topic an identity may subscribe to; each has its own flag in [`Subscriptions`]. A terminal
/// and a bootstrap identity have one (their down topic), a backend two (`docs/PROTOCOL.md` §12.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// `{SN}/rki/v1/down`.
    Down,
    /// `rki/v1/backend/{org}/{name}/reply`: the answers.
    Reply,
    /// `rki/v1/backend/{org}/{name}/events`: the events.
    Events,
}

impl Subscription {
    fn bit(self) -> u8 {
        match self {
            Subscription::Down => 1,
            Subscription::Reply => 2,
            Subscription::Events => 4,
        }
    }
}

/// The topics a session is subscribed to, one flag each (a byte: sessions are per terminal, and
/// an idle terminal's memory is counted).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Subscriptions(u8);

impl Subscriptions {
    pub fn contains(self, topic: Subscription) -> bool {
        self.0 & topic.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn add(&mut self, topic: Subscription) {
        self.0 |= topic.bit();
    }

    pub fn remove(&mut self, topic: Subscription) {
        self.0 &= !topic.bit();
    }
}

/// Why a downlink was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// No subscription to its topic, live or kept (another of the identity's topics does not count).
    NoSession,
    /// The session holds its maximum of unacknowledged downlinks.
    SessionFull,
}

impl Dropped {
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::NoSession => "no_session",
            Dropped::SessionFull => "session_full",
        }
    }
}

#[derive(Debug, Default)]
pub struct ClientState {
    /// The live connection's id and its wake-up, if connected.
    conn: Option<(u64, Arc<Notify>)>,
    /// The topics it is subscribed to: a downlink goes out only on one of them.
    pub subscribed: Subscriptions,
    /// How long the session outlives its connection; `None`: it ends with it.
    lifetime: Option<Duration>,
    /// The identity was revoked ([`Client::evict`]): its connection closes at its next wake-up.
    revoked: bool,
    /// When a disconnected persistent session is forgotten.
    expires_at: Option<Instant>,
    /// Downlinks not written yet.
    pub pending: VecDeque<Down>,
    /// Downlinks written at QoS 1, awaiting their PUBACK, by packet id, oldest first.
    pub inflight: VecDeque<(u16, Down)>,
    last_pkid: u16,
}

impl ClientState {
    /// Whether a connection is live (attached and not yet detached).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether `conn` is still the live connection (it was not taken over).
    pub fn is_current(&self, conn: u64) -> bool {
        self.conn.as_ref().is_some_and(|(id, _)| *id == conn)
    }

    /// Whether the identity was revoked: its connection must close.
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }

    /// Queues a downlink on `topic` for the live connection or the kept session, if it is
    /// subscribed to that topic.
    pub fn queue(
        &mut self,
        down: Down,
        topic: Subscription,
        messages_max: usize,
    ) -> Result<Option<Arc<Notify>>, Dropped> {
        if !self.subscribed.contains(topic) || (self.conn.is_none() && self.lifetime.is_none()) {
            return Err(Dropped::NoSession);
        }
        if self.pending.len() + self.inflight.len() >= messages_max {
            return Err(Dropped::SessionFull);
        }
        self.pending.push_back(down);
        Ok(self.conn.as_ref().map(|(_, wake)| wake.clone()))
    }

    /// Drops the kept downlinks of an execution that has ended (stopped, expired): a session kept
    /// for a terminal that went away would otherwise send its download again at the next
    /// connection, and the terminal install a key the operator has stopped. One already written
    /// to a live connection is not taken back. How many were dropped.
    pub fn withdraw(&mut self, execution: i64) -> usize {
        let before = self.pending.len() + self.inflight.len();
        self.pending.retain(|down| down.execution != Some(execution));
        self.inflight.retain(|(_, down)| down.execution != Some(execution));
        before - self.pending.len() - self.inflight.len()
    }

    /// The next packet id not in flight (1 to 65,535).
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|(id, _)| *id == self.last_pkid) {
                return self.last_pkid;
            }
        }
    }

    /// Removes the downlink `pkid` from the in-flight list; whether it was there.
    pub fn acknowledge(&mut self, pkid: u16) -> bool {
        let acknowledged = match self.inflight.iter().position(|(id, _)| *id == pkid) {
            Some(index) => self.inflight.remove(index).is_some(),
            None => false,
        };
        self.release_if_drained();
        acknowledged
    }

    /// Gives back the queues' storage once both are empty: an idle session holds none (they grow
    /// to a push's burst, then would keep that capacity for the connection's life).
    pub fn release_if_drained(&mut self) {
        if self.inflight.is_empty() && self.pending.is_empty() && self.inflight.capacity() + self.pending.capacity() > 0
        {
            self.inflight = VecDeque::new();
            self.pending = VecDeque::new();
        }
    }

    fn has_session(&self, now: Instant) -> bool {
        (!self.subscribed.is_empty() || !self.inflight.is_empty() || !self.pending.is_empty())
            && self.expires_at.is_none_or(|at| at > now)
    }

    fn reset(&mut self) {
        self.subscribed = Subscriptions::default();
        self.pending.clear();
        self.inflight.clear();
    }

    /// Whether the entry can be forgotten.
    pub fn is_forgettable(&self, now: Instant) -> bool {
        self.conn.is_none() && self.expires_at.is_none_or(|at| at <= now)
    }
}

/// A client id's state, shared by its connections (one at a time) and the engine's publishes.
#[derive(Debug, Default)]
pub struct Client(Mutex<ClientState>);

/// What a newly accepted connection finds.
pub struct Attached {
    pub session_present: bool,
    /// The connection it replaced, woken so that it sees it was taken over.
    pub replaced: Option<Arc<Notify>>,
}

impl Client {
    pub fn lock(&self) -> MutexGuard<'_, ClientState> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `conn` the live connection. A resumed session (`resume`, and one exists) keeps its
    /// subscription and downlinks; otherwise they are dropped.
    pub fn attach(
        &self,
        conn: u64,
        wake: Arc<Notify>,
        resume: bool,
        lifetime: Option<Duration>,
        now: Instant,
    ) -> Attached {
        let mut state = self.lock();
        let session_present = resume && state.has_session(now);
        if !session_present {
            state.reset();
        }
        state.lifetime = lifetime;
        state.expires_at = None;
        let replaced = state.conn.replace((conn, wake)).map(|(_, wake)| wake);
        Attached { session_present, replaced }
    }

    /// The identity was revoked: its session is dropped, it takes no more downlinks, and its live
    /// connection (woken by the returned handle) closes. The entry is then forgotten by the
    /// caller, so a later connection starts from nothing (and must pass CONNECT first).
    pub fn evict(&self) -> Option<Arc<Notify>> {
        let mut state = self.lock();
        state.reset();
        state.revoked = true;
        state.lifetime = None;
        state.expires_at = None;
        state.conn.take().map(|(_, wake)| wake)
    }

    /// `conn` ended. Returns whether it was the live connection (not taken over). A persistent
    /// session stays for its lifetime, with its unacknowledged downlinks to send again; a clean
    /// one is dropped.
    pub fn detach(&self, conn: u64, now: Instant) -> bool {
        let mut state = self.lock();
        if !state.is_current(conn) {
            return false;
        }
        state.conn = None;
        match state.lifetime {
            Some(lifetime) => state.expires_at = Some(now + lifetime),
            None => state.reset(),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(n: u8) -> Down {
        Down { topic: Arc::from("SN1/rki/v1/down"), payload: Bytes::from(vec![n]), execution: Some(i64::from(n)) }
    }

    #[test]
    fn an_ended_executions_downloads_are_withdrawn_from_the_session_in_flight_or_not() {
        let client = Client::default();
        let t0 = Instant::now();
        client.attach(1, Arc::new(Notify::new()), true, Some(Duration::from_secs(3600)), t0);
        client.lock().subscribed.add(Subscription::Down);
        for n in [1, 2, 1, 3] {
            assert!(client.lock().queue(down(n), Subscription::Down, 8).is_ok());
        }
        let mut state = client.lock();
        let pkid = state.next_pkid();
        let first = state.pending.pop_front().expect("queued");
        state.inflight.push_back((pkid, first));
        let unlock = Down { topic: Arc::from("SN1/rki/v1/down"), payload: Bytes::from_static(b"u"), execution: None };
        state.pending.push_back(unlock);
        // Execution 1: once in flight, once pending.
        assert_eq!(state.withdraw(1), 2);
        assert_eq!(state.withdraw(1), 0);
        assert!(state.inflight.is_empty());
        let left: Vec<Option<i64>> = state.pending.iter().map(|d| d.execution).collect();
        assert_eq!(left, [Some(2), Some(3), None], "others and untagged downlinks stay, in order");
        assert!(!state.acknowledge(pkid), "a PUBACK of a withdrawn downlink finds nothing");
    }

    #[test]
    fn a_persistent_session_keeps_its_downlinks_for_its_lifetime_and_a_clean_one_does_not() {
        let t0 = Instant::now();
        let client = Client::default();
        let hour = Some(Duration::from_secs(3600));
        assert!(!client.attach(1, Arc::new(Notify::new()), true, hour, t0).session_present, "nothing to resume");
        client.lock().subscribed.add(Subscription::Down);
        assert!(client.lock().queue(down(1), Subscription::Down, 8).is_ok());
        let pkid = client.lock().next_pkid();
        let first = client.lock().pending.pop_front().expect("queued");
        client.lock().inflight.push_back((pkid, first));
        assert!(client.detach(1, t0));
        // Disconnected, the session still takes downlinks, up to its bound.
        for n in 2..=8 {
            assert!(client.lock().queue(down(n), Subscription::Down, 8).is_ok());
        }
        assert_eq!(client.lock().queue(down(9), Subscription::Down, 8).err(), Some(Dropped::SessionFull));
        let resumed = client.attach(2, Arc::new(Notify::new()), true, hour, t0 + Duration::from_secs(60));
        assert!(resumed.session_present && resumed.replaced.is_none());
        {
            let mut state = client.lock();
            assert_eq!((state.inflight.len(), state.pending.len()), (1, 7));
            assert!(state.acknowledge(pkid) && !state.acknowledge(pkid));
        }
        // After its lifetime, a session is gone: nothing to resume.
        assert!(client.detach(2, t0));
        assert!(client.lock().is_forgettable(t0 + Duration::from_secs(3601)));
        let clean = client.attach(3, Arc::new(Notify::new()), true, None, t0 + Duration::from_secs(3601));
        assert!(!clean.session_present);
        assert!(client.lock().pending.is_empty());
        // A clean session drops everything with its connection.
        client.lock().subscribed.add(Subscription::Down);
        assert!(client.detach(3, t0) && client.lock().subscribed.is_empty());
        assert_eq!(client.lock().queue(down(1), Subscription::Down, 8).err(), Some(Dropped::NoSession));
    }

    #[test]
    fn a_takeover_wakes_the_old_connection_which_then_changes_nothing() {
        let t0 = Instant::now();
        let client = Client::default();
        let old_wake = Arc::new(Notify::new());
        client.attach(1, old_wake.clone(), false, None, t0);
        client.lock().subscribed.add(Subscription::Down);
        let attached = client.attach(2, Arc::new(Notify::new()), true, None, t0);
        assert!(attached.session_present, "the live session is resumed");
        assert!(attached.replaced.is_some_and(|w| Arc::ptr_eq(&w, &old_wake)));
        let old_is_current = client.lock().is_current(1);
        let new_is_current = client.lock().is_current(2);
        assert!(!old_is_current && new_is_current);
        assert!(!client.detach(1, t0), "the replaced connection's end touches nothing");
        assert!(client.lock().subscribed.contains(Subscription::Down));
    }

    #[test]
    fn an_evicted_client_wakes_its_connection_keeps_nothing_and_takes_nothing() {
        let t0 = Instant::now();
        let client = Client::default();
        let wake = Arc::new(Notify::new());
        client.attach(1, wake.clone(), false, Some(Duration::from_secs(3600)), t0);
        client.lock().subscribed.add(Subscription::Down);
        assert!(client.lock().queue(down(1), Subscription::Down, 8).is_ok());
        let woken = client.evict().expect("the live connection's wake-up");
        assert!(Arc::ptr_eq(&woken, &wake));
        let state = client.lock();
        assert!(state.is_revoked() && !state.is_current(1));
        assert!(state.pending.is_empty() && state.subscribed.is_empty());
        drop(state);
        assert_eq!(client.lock().queue(down(2), Subscription::Down, 8).err(), Some(Dropped::NoSession));
        assert!(!client.detach(1, t0), "the evicted connection's end touches nothing");
        assert!(client.lock().is_forgettable(t0));
    }

    #[test]
    fn a_downlink_goes_only_to_a_topic_the_session_is_subscribed_to() {
        let t0 = Instant::now();
        let client = Client::default();
        client.attach(1, Arc::new(Notify::new()), false, None, t0);
        client.lock().subscribed.add(Subscription::Reply);
        let mut state = client.lock();
        assert!(state.queue(down(1), Subscription::Reply, 8).is_ok());
        assert_eq!(state.queue(down(2), Subscription::Events, 8).err(), Some(Dropped::NoSession));
        state.subscribed.add(Subscription::Events);
        state.subscribed.remove(Subscription::Reply);
        assert_eq!(state.queue(down(3), Subscription::Reply, 8).err(), Some(Dropped::NoSession));
        assert!(state.queue(down(4), Subscription::Events, 8).is_ok());
        assert_eq!(state.pending.iter().map(|d| d.payload[0]).collect::<Vec<_>>(), [1, 4]);
        state.subscribed.remove(Subscription::Events);
        assert!(state.subscribed.is_empty());
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut state = ClientState { last_pkid: u16::MAX - 1, ..Default::default() };
        state.inflight.push_back((1, down(0)));
        assert_eq!(state.next_pkid(), u16::MAX);
        assert_eq!(state.next_pkid(), 2, "0 and the in-flight 1 are skipped");
    }
}
