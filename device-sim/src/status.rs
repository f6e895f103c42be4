//! What a simulated terminal shows of itself: a per-device [`DeviceStatus`] snapshot, and the
//! [`FleetCounters`] every device of a fleet adds to, for a live status line and awaitable
//! conditions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rki_protocol::message::{Ack, RefusalCode, SlotStatus};
use tokio::sync::Notify;

/// Frames the terminal refused to act on, by reason. A refused frame never changes state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectedFrames {
    /// Did not decode, failed the protocol's limits, or used an unknown frame version.
    pub malformed: u64,
    /// Its tag did not verify under the key the message needs (unsigned or forged).
    pub bad_tag: u64,
    /// Addressed to another SN.
    pub foreign_party: u64,
    /// Its counter was not above the last accepted down counter.
    pub replay: u64,
    /// A message the terminal does not take on its down topic (or not now).
    pub unexpected: u64,
}

impl RejectedFrames {
    pub fn total(&self) -> u64 {
        self.malformed + self.bad_tag + self.foreign_party + self.replay + self.unexpected
    }
}

/// A snapshot of one simulated terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Powered on (it may still be offline, between connections).
    pub powered: bool,
    /// Connected to the broker under its device identity, subscribed, hello sent.
    pub connected: bool,
    /// Holds device secrets from a completed initialisation.
    pub initialised: bool,
    pub locked: bool,
    pub debug_mode: bool,
    /// The key slots, as the terminal's "Key Query" screen lists them (occupied slots only).
    pub slots: Vec<SlotStatus>,
    /// Successful connections (CONNACK received) under the device identity.
    pub connections: u64,
    pub hellos_sent: u64,
    /// Keys installed (auto and manual). A duplicate delivery never adds to it.
    pub injections: u64,
    /// Ack publishes handed to the MQTT client, re-sends included.
    pub acks_sent: u64,
    /// Ack publishes the broker acknowledged (PUBACK).
    pub acks_confirmed: u64,
    /// The last ack the terminal decided on (sent or not yet).
    pub last_ack: Option<Ack>,
    /// Acks persisted but not yet confirmed by the broker; re-sent after the next hello.
    pub unconfirmed_acks: usize,
    /// The execution ID of the refused download kept for a manual injection, if any.
    pub kept_download: Option<u64>,
    /// Refusals received from the gateway, and the last one's code.
    pub refusals: u64,
    pub last_refusal: Option<RefusalCode>,
    /// Signed refusals this terminal sent for replayed down frames.
    pub refusals_sent: u64,
    pub rejected: RejectedFrames,
    /// The last error the terminal met (connection, initialisation, storage), for diagnosis.
    pub last_error: Option<String>,
    /// Set when the terminal stopped on purpose between install and ack (the crash knob).
    pub crashed: bool,
}

/// Counters shared by every device of a fleet. Gauges go up and down; the others only go up.
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Gauge: devices connected under their device identity.
    pub connected: AtomicU64,
    /// Gauge: devices holding device secrets.
    pub initialised: AtomicU64,
    pub keys_installed: AtomicU64,
    pub acks_sent: AtomicU64,
    pub acks_confirmed: AtomicU64,
    /// Acks carrying an error code (first sends only, not re-sends).
    pub failure_acks: AtomicU64,
    pub hellos_sent: AtomicU64,
    pub rejected_frames: AtomicU64,
    pub refusals_received: AtomicU64,
    /// Signed refusals sent for replayed down frames.
    pub refusals_sent: AtomicU64,
    /// Connection losses, failed initialisations and storage errors.
    pub errors: AtomicU64,
    /// Of `errors`: connection attempts refused at the TCP level (nothing listening yet).
    pub connects_refused: AtomicU64,
    /// Of `errors`: connection attempts that timed out (the TCP connect, or the wait for the
    /// broker's CONNACK, past the terminal's connect timeout).
    pub connects_timed_out: AtomicU64,
    /// Woken on every change, for [`FleetCounters::wait_until`].
    changed: Notify,
}

/// A consistent-enough copy of [`FleetCounters`] (each field read atomically, not all at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetSnapshot {
    pub connected: u64,
    pub initialised: u64,
    pub keys_installed: u64,
    pub acks_sent: u64,
    pub acks_confirmed: u64,
    pub failure_acks: u64,
    pub hellos_sent: u64,
    pub rejected_frames: u64,
    pub refusals_received: u64,
    pub refusals_sent: u64,
    pub errors: u64,
    pub connects_refused: u64,
    pub connects_timed_out: u64,
}

impl FleetSnapshot {
    /// The one-line live status the CLI prints.
    pub fn status_line(&self) -> String {
        format!(
            "connected {} | initialised {} | keys installed {} | acks {} ({} confirmed, {} failures) | rejected {} | refusals {} | errors {}",
            self.connected,
            self.initialised,
            self.keys_installed,
            self.acks_sent,
            self.acks_confirmed,
            self.failure_acks,
            self.rejected_frames,
            self.refusals_received,
            self.errors
        )
    }
}

/// Waiting for a fleet condition took longer than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("condition not reached within {waited:?}; last counters: {last:?}")]
pub struct WaitTimeout {
    pub waited: Duration,
    pub last: FleetSnapshot,
}

impl FleetCounters {
    pub fn snapshot(&self) -> FleetSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FleetSnapshot {
            connected: read(&self.connected),
            initialised: read(&self.initialised),
            keys_installed: read(&self.keys_installed),
            acks_sent: read(&self.acks_sent),
            acks_confirmed: read(&self.acks_confirmed),
            failure_acks: read(&self.failure_acks),
            hellos_sent: read(&self.hellos_sent),
            rejected_frames: read(&self.rejected_frames),
            refusals_received: read(&self.refusals_received),
            refusals_sent: read(&self.refusals_sent),
            errors: read(&self.errors),
            connects_refused: read(&self.connects_refused),
            connects_timed_out: read(&self.connects_timed_out),
        }
    }

    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    pub(crate) fn sub(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Waits until `condition` holds for a snapshot, or `timeout` passes.
    pub async fn wait_until(
        &self,
        condition: impl Fn(&FleetSnapshot) -> bool,
        timeout: Duration,
    ) -> Result<FleetSnapshot, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before reading, so a change between the read and the wait is not missed.
            notified.as_mut().enable();
            let snapshot = self.snapshot();
            if condition(&snapshot) {
                return Ok(snapshot);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let last = self.snapshot();
                if condition(&last) {
                    return Ok(last);
                }
                return Err(WaitTimeout { waited: timeout, last });
            }
        }
    }
}
