//! # rki-device-sim
//!
//! A simulated Sunmi-class payment terminal running the key-injection app, for the gateway's
//! end-to-end tests and for `rki-loadtest`. It speaks the protocol of `rki-protocol` over MQTT
//! 3.1.1 (rumqttc, QoS 1), behaves like the real terminal (its refusal codes, its lock, its debug
//! slot, its persistent state) and fails like one on demand (power cuts, lost networks, slow acks,
//! a crash between install and ack).
//!
//! One process holds tens of thousands of terminals: each is one tokio task with one small MQTT
//! client, no thread of its own.
//!
//! ## Layout
//! - [`config`]: what a terminal is ([`DeviceProfile`]), where it connects ([`BrokerAddr`],
//!   [`Brokers`]), where it keeps its state ([`StateStore`]) and how it misbehaves ([`Knobs`]).
//! - [`device`]: the terminal's task and its [`DeviceHandle`]: connection, initialisation,
//!   presence, downloads, unlocks, power and network knobs.
//! - [`app`]: the key-injection app's decisions, pure: which down frames to accept, what to
//!   answer a download with, a manual injection.
//! - [`bootstrap`]: the initialisation's side of it, pure: the CreateKeys one initialisation has
//!   sent ([`bootstrap::SentCreateKeys`]) and which down frame answers or refuses one.
//! - [`state`]: what survives a power cycle ([`state::TerminalState`]) and its state file.
//! - [`counter`]: the time-based, strictly increasing up-frame counter.
//! - [`status`]: a terminal's [`DeviceStatus`] and a fleet's shared [`FleetCounters`].
//! - [`fleet`]: many terminals at once ([`Fleet`]), SN patterns and fleet CSV files.
//!
//! ## Identities
//! - Bootstrap (initialising): client ID = username = `init@{SN}`, password the GUDID's bootstrap
//!   password (`Gudid::bootstrap_password`, PROTOCOL.md §2.2), clean
//!   session. It only sends CreateKey.
//! - Device: client ID = username = `{SN}`, password from the initialisation, persistent session,
//!   last will = a signed `Bye` on the up topic.
//!
//! ## Architecture invariants
//! - Every message, frame and topic comes from `rki-protocol`; none is re-defined here.
//! - A down frame changes state only after its tag, party and counter are checked
//!   ([`app::accept_down_frame`]).
//! - A decision is persisted before its ack is published; an ack is re-sent after every hello until
//!   the broker confirms it; a duplicate delivery is answered with the same ack and never injects
//!   twice.
//! - No clear key is stored: a slot keeps the key's type, key ID and KCV.
#![forbid(unsafe_code)]

pub mod app;
pub mod bootstrap;
pub mod config;
pub mod counter;
pub mod device;
pub mod fleet;
pub mod state;
pub mod status;

pub use config::{BrokerAddr, Brokers, DeviceConfig, DeviceProfile, Flapping, Knobs, StateStore};
pub use device::{Device, DeviceError, DeviceHandle};
pub use fleet::{raise_fd_limit, FailingShare, Fleet, FleetConfig, FleetMember, SnPattern};
pub use status::{DeviceStatus, FleetCounters, FleetSnapshot, RejectedFrames};
