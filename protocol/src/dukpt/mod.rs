//! DUKPT: Derived Unique Key Per Transaction.
//!
//! A terminal is injected with one initial key derived from a Base Derivation Key (BDK) and its
//! own identifier; from it the terminal derives a fresh key for every transaction, and the host,
//! which holds the BDK, derives the same key from the identifier sent with the transaction.
//!
//! - [`tdes`]: TDES DUKPT, ANSI X9.24-1-2009 (the 10-byte [`Ksn`], the IPEK, the non-reversible
//!   key generation process and the PIN/MAC/data variants).
//! - [`aes`]: AES DUKPT, ANSI X9.24-3-2017 (the 12-byte [`AesKsn`], the initial key, the
//!   intermediate derivation keys and the working keys).
//!
//! The gateway only needs the initial keys ([`derive_ipek`], [`derive_initial_key`]); the
//! terminal-side derivations are here so that tests and the device simulator can prove that a
//! shipped initial key produces the published transaction keys.

pub mod aes;
pub mod tdes;

pub use self::aes::{derivation_key, derive_initial_key, working_key, AesKsn, InitialKeyId, WorkingKeyUsage};
pub use self::tdes::{data_key, derive_ipek, mac_key, mac_response_key, pin_key, transaction_key, IpekDeriver, Ksn};

use crate::keys::KeyAlgorithm;

/// Why a DUKPT derivation was refused. Every variant is a caller error: the derivations
/// themselves cannot fail on valid input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DukptError {
    #[error("TDES DUKPT needs a TDES BDK, got {0}")]
    BdkNotTdes(KeyAlgorithm),
    #[error("AES DUKPT needs an AES BDK, got {0}")]
    BdkNotAes(KeyAlgorithm),
    #[error("a TDES DUKPT IPEK is a two-key TDES key, got {0}")]
    IpekNotTdes2(KeyAlgorithm),
    #[error("an AES DUKPT derivation key is an AES key, got {0}")]
    DerivationKeyNotAes(KeyAlgorithm),
    #[error("a working key of type {working} is stronger than its derivation key ({derivation})")]
    WorkingKeyStrongerThanDerivationKey { working: KeyAlgorithm, derivation: KeyAlgorithm },
    #[error("a {name} is {expected} hex digits, got {got}")]
    IdentifierLength { name: &'static str, expected: usize, got: usize },
    #[error("a {name} must be hex")]
    IdentifierHex { name: &'static str },
    #[error("transaction counter {counter:#x} does not fit in {bits} bits")]
    CounterTooLarge { counter: u32, bits: u32 },
    #[error("transaction counter 0 is the initial key, not a transaction")]
    CounterZero,
    #[error("transaction counter {counter:#x} has {ones} one-bits; at most {max} are valid")]
    CounterTooManyOneBits { counter: u32, ones: u32, max: u32 },
}

/// Parses exactly `N` bytes of hex (either case) for identifiers such as a KSN.
fn identifier_from_hex<const N: usize>(name: &'static str, text: &str) -> Result<[u8; N], DukptError> {
    if text.len() != 2 * N {
        return Err(DukptError::IdentifierLength { name, expected: 2 * N, got: text.len() });
    }
    let mut bytes = [0u8; N];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| DukptError::IdentifierHex { name })?;
    Ok(bytes)
}
