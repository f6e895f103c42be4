//! Symmetric keys with their algorithm, and key check values (KCV).
//!
//! The algorithm travels with the key: a [`SymmetricKey`] can only be built with a length that is
//! valid for its algorithm, so a TDES routine is never handed an AES key by mistake.

use std::fmt;

use aes::cipher::KeyInit;
use cmac::{Cmac, Mac};

use crate::secret::SecretBytes;

/// The block cipher a key is for, with its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// Double-length TDES (two-key, 16 bytes).
    Tdes2,
    /// Triple-length TDES (three-key, 24 bytes).
    Tdes3,
    Aes128,
    Aes192,
    Aes256,
}

impl KeyAlgorithm {
    pub fn key_len(self) -> usize {
        match self {
            KeyAlgorithm::Tdes2 | KeyAlgorithm::Aes128 => 16,
            KeyAlgorithm::Tdes3 | KeyAlgorithm::Aes192 => 24,
            KeyAlgorithm::Aes256 => 32,
        }
    }

    pub fn is_tdes(self) -> bool {
        matches!(self, KeyAlgorithm::Tdes2 | KeyAlgorithm::Tdes3)
    }

    pub fn is_aes(self) -> bool {
        !self.is_tdes()
    }

    /// The TDES algorithm for a key of `len` bytes.
    pub fn tdes_for_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(KeyAlgorithm::Tdes2),
            24 => Some(KeyAlgorithm::Tdes3),
            _ => None,
        }
    }

    /// The AES algorithm for a key of `len` bytes.
    pub fn aes_for_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(KeyAlgorithm::Aes128),
            24 => Some(KeyAlgorithm::Aes192),
            32 => Some(KeyAlgorithm::Aes256),
            _ => None,
        }
    }

    /// Stable lower-case name used in the API, the store and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Tdes2 => "tdes2",
            KeyAlgorithm::Tdes3 => "tdes3",
            KeyAlgorithm::Aes128 => "aes128",
            KeyAlgorithm::Aes192 => "aes192",
            KeyAlgorithm::Aes256 => "aes256",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "tdes2" => KeyAlgorithm::Tdes2,
            "tdes3" => KeyAlgorithm::Tdes3,
            "aes128" => KeyAlgorithm::Aes128,
            "aes192" => KeyAlgorithm::Aes192,
            "aes256" => KeyAlgorithm::Aes256,
            _ => return None,
        })
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a byte string is not a key of the asked algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a TDES key must be 16 or 24 bytes, got {0}")]
    TdesLength(usize),
    #[error("an AES key must be 16, 24 or 32 bytes, got {0}")]
    AesLength(usize),
    #[error("key is not valid hex")]
    Hex,
}

/// A symmetric key and the algorithm it is for. Zeroized on drop; `Debug` shows no key bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct SymmetricKey {
    algorithm: KeyAlgorithm,
    bytes: SecretBytes,
}

impl SymmetricKey {
    pub fn tdes(bytes: SecretBytes) -> Result<Self, KeyError> {
        let algorithm = KeyAlgorithm::tdes_for_len(bytes.len()).ok_or(KeyError::TdesLength(bytes.len()))?;
        Ok(Self { algorithm, bytes })
    }

    pub fn aes(bytes: SecretBytes) -> Result<Self, KeyError> {
        let algorithm = KeyAlgorithm::aes_for_len(bytes.len()).ok_or(KeyError::AesLength(bytes.len()))?;
        Ok(Self { algorithm, bytes })
    }

    /// A key of the given algorithm; the length must match it exactly.
    pub fn new(algorithm: KeyAlgorithm, bytes: SecretBytes) -> Result<Self, KeyError> {
        let key = if algorithm.is_tdes() { Self::tdes(bytes)? } else { Self::aes(bytes)? };
        if key.algorithm != algorithm {
            return Err(if algorithm.is_tdes() {
                KeyError::TdesLength(key.bytes.len())
            } else {
                KeyError::AesLength(key.bytes.len())
            });
        }
        Ok(key)
    }

    pub fn tdes_from_hex(text: &str) -> Result<Self, KeyError> {
        Self::tdes(SecretBytes::from_hex(text).map_err(|_| KeyError::Hex)?)
    }

    pub fn aes_from_hex(text: &str) -> Result<Self, KeyError> {
        Self::aes(SecretBytes::from_hex(text).map_err(|_| KeyError::Hex)?)
    }

    /// Fresh random key material from the OS CSPRNG.
    pub fn random(algorithm: KeyAlgorithm) -> Result<Self, getrandom::Error> {
        let bytes = SecretBytes::random(algorithm.key_len())?;
        Ok(Self { algorithm, bytes })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn expose_secret(&self) -> &[u8] {
        self.bytes.expose_secret()
    }

    pub fn secret(&self) -> &SecretBytes {
        &self.bytes
    }

    pub fn into_secret(self) -> SecretBytes {
        self.bytes
    }

    pub fn clone_secret(&self) -> Self {
        Self { algorithm: self.algorithm, bytes: self.bytes.clone_secret() }
    }

    /// The key check value: TDES-ECB of eight zero bytes for TDES, AES-CMAC of sixteen zero bytes for
    /// AES (the CMAC method of X9.24-1-2017 and X9.24-3), truncated to `len`.
    pub fn kcv(&self, len: KcvLen) -> Kcv {
        let full = match self.algorithm {
            KeyAlgorithm::Tdes2 | KeyAlgorithm::Tdes3 => {
                let mut block = [0u8; 8];
                if crate::tdes::encrypt_block(self, &mut block).is_err() {
                    unreachable!("this arm holds a TDES key, which encrypt_block accepts");
                }
                let mut out = [0u8; 16];
                out[..8].copy_from_slice(&block);
                out
            }
            KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => aes_cmac_zero(self),
        };
        Kcv::from_slice(&full[..len.bytes()]).unwrap_or(Kcv { bytes: [0; 5], len: 0 })
    }
}

/// AES-CMAC of one all-zero block: the AES key check value before truncation.
fn aes_cmac_zero(key: &SymmetricKey) -> [u8; 16] {
    fn run<M: Mac + KeyInit>(key: &[u8]) -> [u8; 16] {
        let mut out = [0u8; 16];
        if let Ok(mut mac) = <M as KeyInit>::new_from_slice(key) {
            Mac::update(&mut mac, &[0u8; 16]);
            out.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        }
        out
    }
    match key.algorithm() {
        KeyAlgorithm::Aes128 => run::<Cmac<aes::Aes128>>(key.expose_secret()),
        KeyAlgorithm::Aes192 => run::<Cmac<aes::Aes192>>(key.expose_secret()),
        KeyAlgorithm::Aes256 => run::<Cmac<aes::Aes256>>(key.expose_secret()),
        _ => [0u8; 16],
    }
}

/// How many bytes of the check value to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KcvLen {
    #[default]
    Three,
    Five,
}

impl KcvLen {
    pub fn bytes(self) -> usize {
        match self {
            KcvLen::Three => 3,
            KcvLen::Five => 5,
        }
    }

    pub fn from_bytes(len: usize) -> Option<Self> {
        match len {
            3 => Some(KcvLen::Three),
            5 => Some(KcvLen::Five),
            _ => None,
        }
    }
}

/// A key check value of 3 or 5 bytes. Not secret, but compared in constant time all the same.
#[derive(Clone, Copy, Debug, Eq)]
pub struct Kcv {
    bytes: [u8; 5],
    len: u8,
}

impl Kcv {
    /// A KCV of 3 to 5 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if !(3..=5).contains(&bytes.len()) {
            return None;
        }
        let mut out = [0u8; 5];
        out[..bytes.len()].copy_from_slice(bytes);
        Some(Self { bytes: out, len: bytes.len() as u8 })
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        Self::from_slice(&hex::decode(text).ok()?)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.as_bytes())
    }

    /// The first three bytes, the length every record and ack carries.
    pub fn short(&self) -> Kcv {
        let mut bytes = [0u8; 5];
        bytes[..3].copy_from_slice(&self.bytes[..3]);
        Kcv { bytes, len: 3 }
    }
}

impl PartialEq for Kcv {
    fn eq(&self, other: &Self) -> bool {
        crate::secret::ct_eq(self.as_bytes(), other.as_bytes())
    }
}

/// By hand, over the same bytes [`PartialEq`] compares, so that equal KCVs hash equally: a derive
/// would also hash the unused tail of the buffer.
impl std::hash::Hash for Kcv {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Display for Kcv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lengths_are_checked_per_algorithm() {
        assert!(SymmetricKey::tdes(SecretBytes::zeroed(8)).is_err());
        assert!(SymmetricKey::tdes(SecretBytes::zeroed(32)).is_err());
        assert!(SymmetricKey::aes(SecretBytes::zeroed(20)).is_err());
        assert!(SymmetricKey::new(KeyAlgorithm::Aes256, SecretBytes::zeroed(16)).is_err());
        assert_eq!(SymmetricKey::aes(SecretBytes::zeroed(24)).map(|k| k.algorithm()), Ok(KeyAlgorithm::Aes192));
    }

    #[test]
    fn debug_of_a_key_shows_no_key_bytes() {
        let key = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("key");
        let shown = format!("{key:?}").to_uppercase();
        assert!(!shown.contains("0123456789"), "{shown}");
        assert!(!shown.contains("FEDCBA"), "{shown}");
    }

    #[test]
    fn kcv_of_five_bytes_extends_the_three_byte_one() {
        let key = SymmetricKey::aes_from_hex("D148768C94633673B742547F971CE836").expect("key");
        let three = key.kcv(KcvLen::Three);
        let five = key.kcv(KcvLen::Five);
        assert_eq!(three.to_hex(), "75E0FC");
        assert_eq!(five.as_bytes().len(), 5);
        assert_eq!(five.short(), three);
    }
}
