//! Secret byte containers.
//!
//! Every key in this crate lives in a [`SecretBytes`] or in a type built on it:
//! - the bytes are zeroized when the value is dropped;
//! - `Debug` prints `[REDACTED]` and the length, never a byte;
//! - there is no `Serialize`, no `Display` and no implicit `Clone`: copying a secret is the explicit,
//!   greppable [`SecretBytes::clone_secret`];
//! - the only way to read the bytes is [`SecretBytes::expose_secret`], so every use can be audited
//!   with `grep expose_secret`;
//! - equality is constant time ([`subtle::ConstantTimeEq`]).

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// A heap buffer of secret bytes, zeroized on drop.
pub struct SecretBytes {
    bytes: Zeroizing<Vec<u8>>,
}

impl SecretBytes {
    /// Copies `bytes` into a new secret. The caller remains responsible for its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self { bytes: Zeroizing::new(bytes.to_vec()) }
    }

    /// Takes ownership of `bytes`; they are zeroized when the secret is dropped.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self { bytes: Zeroizing::new(bytes) }
    }

    /// A secret of `len` zero bytes, to be filled in place through [`SecretBytes::expose_secret_mut`].
    pub fn zeroed(len: usize) -> Self {
        Self { bytes: Zeroizing::new(vec![0u8; len]) }
    }

    /// `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<Self, getrandom::Error> {
        let mut secret = Self::zeroed(len);
        getrandom::getrandom(secret.expose_secret_mut())?;
        Ok(secret)
    }

    /// Decodes hex (either case). The intermediate buffer is zeroized too.
    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut bytes = Zeroizing::new(vec![0u8; text.len() / 2]);
        if text.len() % 2 != 0 {
            return Err(hex::FromHexError::OddLength);
        }
        hex::decode_to_slice(text, &mut bytes)?;
        Ok(Self { bytes })
    }

    /// The secret bytes. Every call site is a place where key material is used: keep them few.
    pub fn expose_secret(&self) -> &[u8] {
        &self.bytes
    }

    /// Mutable access, for filling a buffer in place.
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// An explicit copy of the secret.
    pub fn clone_secret(&self) -> Self {
        Self::from_slice(&self.bytes)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Upper-case hex of the secret, itself zeroized on drop. For the offline key calculator only.
    pub fn to_hex_upper(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode_upper(self.expose_secret()))
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.bytes.len())
    }
}

impl ConstantTimeEq for SecretBytes {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.bytes.as_slice().ct_eq(other.bytes.as_slice())
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SecretBytes {}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.bytes.zeroize();
    }
}

/// Constant-time equality of two public-but-sensitive byte strings (MAC tags, KCVs).
/// Lengths are not secret: unequal lengths compare unequal at once.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_secret_shows_no_key_bytes() {
        let secret = SecretBytes::from_hex("0123456789ABCDEFFEDCBA9876543210").expect("hex");
        let shown = format!("{secret:?}");
        assert!(!shown.to_uppercase().contains("0123"), "{shown}");
        assert!(!shown.to_uppercase().contains("89AB"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn secrets_compare_by_value() {
        let a = SecretBytes::from_slice(&[1, 2, 3]);
        assert_eq!(a, SecretBytes::from_slice(&[1, 2, 3]));
        assert_ne!(a, SecretBytes::from_slice(&[1, 2, 4]));
        assert_ne!(a, SecretBytes::from_slice(&[1, 2]));
    }

    #[test]
    fn odd_hex_is_refused() {
        assert!(SecretBytes::from_hex("ABC").is_err());
        assert!(SecretBytes::from_hex("ZZ").is_err());
    }
}
