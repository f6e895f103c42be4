//! # rki-protocol
//!
//! The RKI wire protocol and the payment cryptography it needs. Pure: this crate does no I/O, reads
//! no clock and knows nothing of MQTT, sockets, the store or HTTP. Randomness enters only through
//! explicit arguments or the OS CSPRNG behind [`secret::SecretBytes::random`].
//!
//! ## Layout
//! - [`secret`]: [`secret::SecretBytes`], the zeroizing, redacted, constant-time container every key
//!   lives in.
//! - [`keys`]: [`keys::SymmetricKey`] (key plus algorithm) and key check values ([`keys::Kcv`]).
//! - [`tdes`]: single-block TDES/DES helpers.
//! - [`dukpt`]: DUKPT derivation, TDES (ANSI X9.24-1-2009) and AES (ANSI X9.24-3-2017).
//! - [`tr31`]: ASC X9 TR-31 key blocks, versions A, B, C and D.
//! - [`terminal`]: the terminal's vocabulary: key slots, key types, error codes, models.
//! - [`topic`]: the one MQTT topic scheme.
//! - [`message`]: every wire message, postcard-encoded.
//! - [`frame`]: the signed envelope around every message (HMAC-SHA256 plus counter).
//! - [`init`]: device initialisation crypto (GUDID, X25519 + HKDF-SHA256 key agreement).
//! - [`backend`]: an RKI backend's identity (`backend@{org}~{name}`) and the MQTT password and
//!   frame MAC key derived from its secret; its messages are in [`message`].
#![forbid(unsafe_code)]

pub mod backend;
mod des_core;
pub mod dukpt;
pub mod frame;
pub mod init;
pub mod keys;
pub mod message;
pub mod secret;
pub mod tdes;
pub mod terminal;
pub mod topic;
pub mod tr31;

pub use keys::{Kcv, KcvLen, KeyAlgorithm, SymmetricKey};
pub use secret::SecretBytes;
