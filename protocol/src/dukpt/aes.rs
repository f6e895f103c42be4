//! AES DUKPT, ANSI X9.24-3-2017.
//!
//! Every key is derived the same way (the standard's "Derive Key"): AES-ECB encryption, under
//! the deriving key, of a 16-byte derivation data block per 128 bits of output, truncated to the
//! derived key's length. The derivation data is:
//!
//! | bytes | field                                                                    |
//! |-------|--------------------------------------------------------------------------|
//! | 0     | version, `01`                                                            |
//! | 1     | key block counter, `01` for the first 128 bits, `02` for the next        |
//! | 2..4  | key usage indicator ([`WorkingKeyUsage`], or `8000`/`8001` for derivation) |
//! | 4..6  | algorithm indicator of the derived key (`0000` 2TDEA … `0004` AES-256)     |
//! | 6..8  | length of the derived key in bits                                        |
//! | 8..16 | the initial key ID (initial key), or its right 4 bytes and the counter     |
//!
//! - [`derive_initial_key`]: the initial key from the BDK and the initial key ID (usage `8001`).
//! - [`derivation_key`]: the terminal's intermediate derivation key for a counter, walking the
//!   counter's one-bits from the most significant (usage `8000`).
//! - [`working_key`]: a working key (PIN, MAC, data, KEK) from the derivation key for the same
//!   KSN.

use std::fmt;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit};
use zeroize::Zeroizing;

use super::{identifier_from_hex, DukptError};
use crate::keys::{KeyAlgorithm, SymmetricKey};
use crate::secret::SecretBytes;

/// X9.24-3-2017: a terminal never uses a counter with more than sixteen one-bits.
const COUNTER_ONE_BITS_MAX: u32 = 16;
const USAGE_KEY_DERIVATION: u16 = 0x8000;
const USAGE_INITIAL_KEY: u16 = 0x8001;

/// The 8-byte AES DUKPT initial key ID: a 4-byte BDK ID and a 4-byte derivation ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InitialKeyId([u8; 8]);

impl InitialKeyId {
    pub const fn new(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }

    /// Exactly 16 hex digits, either case.
    pub fn from_hex(text: &str) -> Result<Self, DukptError> {
        identifier_from_hex::<8>("AES DUKPT initial key ID", text).map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Debug for InitialKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InitialKeyId({})", self.to_hex())
    }
}

impl fmt::Display for InitialKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The 12-byte AES DUKPT KSN: the initial key ID and a 32-bit transaction counter.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AesKsn([u8; 12]);

impl AesKsn {
    pub fn new(id: &InitialKeyId, counter: u32) -> Self {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&id.0);
        bytes[8..].copy_from_slice(&counter.to_be_bytes());
        Self(bytes)
    }

    /// Exactly 24 hex digits, either case.
    pub fn from_hex(text: &str) -> Result<Self, DukptError> {
        identifier_from_hex::<12>("AES DUKPT KSN", text).map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }

    pub fn initial_key_id(&self) -> InitialKeyId {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.0[..8]);
        InitialKeyId(id)
    }

    pub fn counter(&self) -> u32 {
        u32::from_be_bytes([self.0[8], self.0[9], self.0[10], self.0[11]])
    }

    pub fn with_counter(&self, counter: u32) -> Self {
        Self::new(&self.initial_key_id(), counter)
    }

    /// The last 8 bytes of working-key derivation data: the right half of the initial key ID
    /// and `counter`.
    fn derivation_tail(&self, counter: u32) -> [u8; 8] {
        let mut tail = [0u8; 8];
        tail[..4].copy_from_slice(&self.0[4..8]);
        tail[4..].copy_from_slice(&counter.to_be_bytes());
        tail
    }
}

impl fmt::Debug for AesKsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AesKsn({})", self.to_hex())
    }
}

impl fmt::Display for AesKsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a working key is for: the key usage indicator of the X9.24-3-2017 derivation data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkingKeyUsage {
    /// `0002`
    KeyEncryptionKey,
    /// `1000`
    PinEncryption,
    /// `2000`
    MacGeneration,
    /// `2001`
    MacVerification,
    /// `2002`
    MacBothWays,
    /// `3000`
    DataEncryption,
    /// `3001`
    DataDecryption,
    /// `3002`
    DataBothWays,
}

impl WorkingKeyUsage {
    pub const ALL: [WorkingKeyUsage; 8] = [
        WorkingKeyUsage::KeyEncryptionKey,
        WorkingKeyUsage::PinEncryption,
        WorkingKeyUsage::MacGeneration,
        WorkingKeyUsage::MacVerification,
        WorkingKeyUsage::MacBothWays,
        WorkingKeyUsage::DataEncryption,
        WorkingKeyUsage::DataDecryption,
        WorkingKeyUsage::DataBothWays,
    ];

    /// The key usage indicator, bytes 2..4 of the derivation data.
    pub fn indicator(self) -> u16 {
        match self {
            WorkingKeyUsage::KeyEncryptionKey => 0x0002,
            WorkingKeyUsage::PinEncryption => 0x1000,
            WorkingKeyUsage::MacGeneration => 0x2000,
            WorkingKeyUsage::MacVerification => 0x2001,
            WorkingKeyUsage::MacBothWays => 0x2002,
            WorkingKeyUsage::DataEncryption => 0x3000,
            WorkingKeyUsage::DataDecryption => 0x3001,
            WorkingKeyUsage::DataBothWays => 0x3002,
        }
    }
}

/// The algorithm indicator, bytes 4..6 of the derivation data.
fn algorithm_indicator(algorithm: KeyAlgorithm) -> u16 {
    match algorithm {
        KeyAlgorithm::Tdes2 => 0x0000,
        KeyAlgorithm::Tdes3 => 0x0001,
        KeyAlgorithm::Aes128 => 0x0002,
        KeyAlgorithm::Aes192 => 0x0003,
        KeyAlgorithm::Aes256 => 0x0004,
    }
}

/// Security strength order, for "a working key is never stronger than its derivation key"
/// (X9.24-3-2017).
fn strength_rank(algorithm: KeyAlgorithm) -> u8 {
    match algorithm {
        KeyAlgorithm::Tdes2 => 0,
        KeyAlgorithm::Tdes3 => 1,
        KeyAlgorithm::Aes128 => 2,
        KeyAlgorithm::Aes192 => 3,
        KeyAlgorithm::Aes256 => 4,
    }
}

/// The initial key for `id` (X9.24-3-2017, usage `8001`): same type and length as the BDK.
pub fn derive_initial_key(bdk: &SymmetricKey, id: &InitialKeyId) -> Result<SymmetricKey, DukptError> {
    if !bdk.algorithm().is_aes() {
        return Err(DukptError::BdkNotAes(bdk.algorithm()));
    }
    Ok(derive(bdk, USAGE_INITIAL_KEY, bdk.algorithm(), id.0))
}

/// The terminal's intermediate derivation key for the counter of `ksn` (X9.24-3-2017): from
/// the initial key, one derivation per one-bit of the counter, most significant first, each with
/// the counter's bits so far. Same type as the initial key. Refuses counter 0 (that is the
/// initial key itself) and counters with more than sixteen one-bits.
pub fn derivation_key(initial_key: &SymmetricKey, ksn: &AesKsn) -> Result<SymmetricKey, DukptError> {
    let algorithm = initial_key.algorithm();
    if !algorithm.is_aes() {
        return Err(DukptError::DerivationKeyNotAes(algorithm));
    }
    let counter = ksn.counter();
    if counter == 0 {
        return Err(DukptError::CounterZero);
    }
    let ones = counter.count_ones();
    if ones > COUNTER_ONE_BITS_MAX {
        return Err(DukptError::CounterTooManyOneBits { counter, ones, max: COUNTER_ONE_BITS_MAX });
    }
    let mut key = initial_key.clone_secret();
    let mut so_far = 0u32;
    for bit in (0..32).rev() {
        let mask = 1u32 << bit;
        if counter & mask != 0 {
            so_far |= mask;
            key = derive(&key, USAGE_KEY_DERIVATION, algorithm, ksn.derivation_tail(so_far));
        }
    }
    Ok(key)
}

/// A working key of `key_type` for `usage` from the derivation key of the same `ksn`
/// (X9.24-3-2017). Refuses a working key stronger than the derivation key.
pub fn working_key(
    derivation_key: &SymmetricKey,
    ksn: &AesKsn,
    usage: WorkingKeyUsage,
    key_type: KeyAlgorithm,
) -> Result<SymmetricKey, DukptError> {
    let derivation = derivation_key.algorithm();
    if !derivation.is_aes() {
        return Err(DukptError::DerivationKeyNotAes(derivation));
    }
    if strength_rank(key_type) > strength_rank(derivation) {
        return Err(DukptError::WorkingKeyStrongerThanDerivationKey { working: key_type, derivation });
    }
    Ok(derive(derivation_key, usage.indicator(), key_type, ksn.derivation_tail(ksn.counter())))
}

/// X9.24-3-2017 "Derive Key": `key` is an AES key (checked by every caller).
fn derive(key: &SymmetricKey, usage: u16, derived: KeyAlgorithm, tail: [u8; 8]) -> SymmetricKey {
    let mut data = [0u8; 16];
    data[0] = 0x01;
    data[2..4].copy_from_slice(&usage.to_be_bytes());
    data[4..6].copy_from_slice(&algorithm_indicator(derived).to_be_bytes());
    let bits = u16::try_from(derived.key_len() * 8).unwrap_or(u16::MAX);
    data[6..8].copy_from_slice(&bits.to_be_bytes());
    data[8..].copy_from_slice(&tail);

    let mut out = SecretBytes::zeroed(derived.key_len());
    match key.algorithm() {
        KeyAlgorithm::Aes128 => encrypt_blocks::<aes::Aes128>(key, &mut data, &mut out),
        KeyAlgorithm::Aes192 => encrypt_blocks::<aes::Aes192>(key, &mut data, &mut out),
        KeyAlgorithm::Aes256 => encrypt_blocks::<aes::Aes256>(key, &mut data, &mut out),
        KeyAlgorithm::Tdes2 | KeyAlgorithm::Tdes3 => debug_assert!(false, "AES DUKPT key is AES"),
    }
    match SymmetricKey::new(derived, out) {
        Ok(key) => key,
        Err(_) => unreachable!("the output has the derived algorithm's length"),
    }
}

/// Fills `out` with the encryption of `data` under `key`, scheduled once, for key block counters
/// 1, 2, … (at most two blocks: a derived key is at most 256 bits).
fn encrypt_blocks<C: BlockEncrypt + KeyInit>(key: &SymmetricKey, data: &mut [u8; 16], out: &mut SecretBytes) {
    let Ok(cipher) = C::new_from_slice(key.expose_secret()) else {
        debug_assert!(false, "an AES key of its own algorithm's length");
        return;
    };
    let mut block = Zeroizing::new([0u8; 16]);
    for (counter, chunk) in (1u8..).zip(out.expose_secret_mut().chunks_mut(16)) {
        data[1] = counter;
        block.copy_from_slice(data);
        cipher.encrypt_block(GenericArray::from_mut_slice(&mut block[..]));
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdk() -> SymmetricKey {
        SymmetricKey::aes_from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").expect("bdk")
    }

    fn id() -> InitialKeyId {
        InitialKeyId::from_hex("1234567890123456").expect("id")
    }

    #[test]
    fn ksn_is_the_initial_key_id_and_a_32_bit_counter() {
        let ksn = AesKsn::from_hex("123456789012345600000001").expect("ksn");
        assert_eq!(ksn.initial_key_id(), id());
        assert_eq!(ksn.counter(), 1);
        assert_eq!(ksn.with_counter(0xABCDEF01).to_hex(), "1234567890123456ABCDEF01");
        assert_eq!(format!("{ksn:?}"), "AesKsn(123456789012345600000001)");
    }

    #[test]
    fn initial_key_from_a_tdes_bdk_is_refused() {
        let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("tdes");
        assert_eq!(derive_initial_key(&bdk, &id()), Err(DukptError::BdkNotAes(KeyAlgorithm::Tdes2)));
    }

    #[test]
    fn derivation_key_for_counter_zero_is_refused() {
        let initial = derive_initial_key(&bdk(), &id()).expect("initial");
        let ksn = AesKsn::new(&id(), 0);
        assert_eq!(derivation_key(&initial, &ksn), Err(DukptError::CounterZero));
    }

    #[test]
    fn derivation_key_for_a_counter_with_seventeen_one_bits_is_refused() {
        let initial = derive_initial_key(&bdk(), &id()).expect("initial");
        let ksn = AesKsn::new(&id(), 0x1FFFF);
        assert_eq!(
            derivation_key(&initial, &ksn),
            Err(DukptError::CounterTooManyOneBits { counter: 0x1FFFF, ones: 17, max: 16 })
        );
        assert!(derivation_key(&initial, &AesKsn::new(&id(), 0xFFFF)).is_ok());
    }

    #[test]
    fn working_key_stronger_than_its_derivation_key_is_refused() {
        let initial = derive_initial_key(&bdk(), &id()).expect("initial");
        let ksn = AesKsn::new(&id(), 1);
        let derivation = derivation_key(&initial, &ksn).expect("derivation");
        assert_eq!(
            working_key(&derivation, &ksn, WorkingKeyUsage::PinEncryption, KeyAlgorithm::Aes256),
            Err(DukptError::WorkingKeyStrongerThanDerivationKey {
                working: KeyAlgorithm::Aes256,
                derivation: KeyAlgorithm::Aes128
            })
        );
        let tdes = working_key(&derivation, &ksn, WorkingKeyUsage::PinEncryption, KeyAlgorithm::Tdes3);
        assert_eq!(tdes.map(|k| k.algorithm()), Ok(KeyAlgorithm::Tdes3));
    }

    #[test]
    fn every_working_key_usage_gives_a_different_key() {
        let initial = derive_initial_key(&bdk(), &id()).expect("initial");
        let ksn = AesKsn::new(&id(), 5);
        let derivation = derivation_key(&initial, &ksn).expect("derivation");
        let keys: Vec<SymmetricKey> = WorkingKeyUsage::ALL
            .iter()
            .map(|usage| working_key(&derivation, &ksn, *usage, KeyAlgorithm::Aes128).expect("working"))
            .collect();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
