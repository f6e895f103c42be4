//! TDES DUKPT, ANSI X9.24-1-2009.
//!
//! - [`derive_ipek`]: the Initial PIN Encryption Key (IPEK) from the BDK and the initial KSN
//!   (X9.24-1-2009 Annex A, "Derivation of the Initial Key").
//! - [`transaction_key`]: the terminal's current key for a KSN, by the non-reversible key
//!   generation process over the one-bits of the 21-bit transaction counter (Annex A).
//! - [`pin_key`], [`mac_key`], [`mac_response_key`], [`data_key`]: the variants of a transaction
//!   key (Annex A; the PIN variant is checked against the A.4 test data).
//!
//! Extension, not in the standard: [`derive_ipek`] also accepts a three-key BDK. The mask
//! `C0C0C0C0 00000000` is then applied to all three key parts, and the IPEK is still two-key.

use std::fmt;

use zeroize::Zeroizing;

use super::{identifier_from_hex, DukptError};
use crate::des_core::TdesSchedule;
use crate::keys::{KeyAlgorithm, SymmetricKey};
use crate::secret::SecretBytes;

/// Bits of the transaction counter in the KSN.
const COUNTER_BITS: u32 = 21;
const COUNTER_MASK: u32 = (1 << COUNTER_BITS) - 1;
/// X9.24-1-2009: a terminal never uses a counter with more than ten one-bits.
const COUNTER_ONE_BITS_MAX: u32 = 10;
/// The key-part mask of the IPEK derivation and the non-reversible key generation process.
const KEY_PART_MASK: [u8; 8] = [0xC0, 0xC0, 0xC0, 0xC0, 0x00, 0x00, 0x00, 0x00];

/// A TDES DUKPT Key Serial Number: 59 bits of initial key serial number and a 21-bit counter.
/// Public: `Debug` and `Display` show it in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ksn([u8; 10]);

impl Ksn {
    pub const fn new(bytes: [u8; 10]) -> Self {
        Self(bytes)
    }

    /// Exactly 20 hex digits, either case.
    pub fn from_hex(text: &str) -> Result<Self, DukptError> {
        identifier_from_hex::<10>("TDES KSN", text).map(Self)
    }

    /// Upper-case hex, 20 digits.
    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 10] {
        &self.0
    }

    /// The transaction counter: the low 21 bits.
    pub fn counter(&self) -> u32 {
        u32::from_be_bytes([0, self.0[7], self.0[8], self.0[9]]) & COUNTER_MASK
    }

    /// The same KSN with the counter replaced; refused if `counter` does not fit in 21 bits.
    pub fn with_counter(&self, counter: u32) -> Result<Self, DukptError> {
        if counter > COUNTER_MASK {
            return Err(DukptError::CounterTooLarge { counter, bits: COUNTER_BITS });
        }
        let mut bytes = self.0;
        let low = u32::from_be_bytes([0, bytes[7], bytes[8], bytes[9]]) & !COUNTER_MASK;
        let [_, b7, b8, b9] = (low | counter).to_be_bytes();
        bytes[7] = b7;
        bytes[8] = b8;
        bytes[9] = b9;
        Ok(Self(bytes))
    }

    /// The initial KSN: this KSN with the counter cleared.
    pub fn initial(&self) -> Self {
        let mut bytes = self.0;
        bytes[7] &= 0xE0;
        bytes[8] = 0;
        bytes[9] = 0;
        Self(bytes)
    }
}

impl fmt::Debug for Ksn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ksn({})", self.to_hex())
    }
}

impl fmt::Display for Ksn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The IPEK for `ksn` (its counter is ignored), X9.24-1-2009 Annex A: the leftmost 8 bytes of the
/// initial KSN encrypted under the BDK give the left half, and under the BDK XOR
/// `C0C0C0C0 00000000 C0C0C0C0 00000000` the right half.
///
/// Extension: a three-key BDK is accepted, with the mask applied to each of its three parts; the
/// IPEK is two-key either way, as every TDES DUKPT terminal expects.
pub fn derive_ipek(bdk: &SymmetricKey, ksn: &Ksn) -> Result<SymmetricKey, DukptError> {
    Ok(IpekDeriver::new(bdk)?.derive(ksn))
}

/// A BDK scheduled once for deriving many IPEKs ([`derive_ipek`] for each KSN, without
/// scheduling the BDK and its masked twin again for every terminal of a batch). Holds the key
/// schedules, zeroized on drop; its `Debug` shows nothing of them.
pub struct IpekDeriver {
    left: TdesSchedule,
    right: TdesSchedule,
}

impl fmt::Debug for IpekDeriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IpekDeriver(..)")
    }
}

impl IpekDeriver {
    /// Schedules a two- or three-key TDES BDK; any other key is refused.
    pub fn new(bdk: &SymmetricKey) -> Result<Self, DukptError> {
        let refused = || DukptError::BdkNotTdes(bdk.algorithm());
        if !bdk.algorithm().is_tdes() {
            return Err(refused());
        }
        let mut masked = SecretBytes::from_slice(bdk.expose_secret());
        for (byte, mask) in masked.expose_secret_mut().iter_mut().zip(KEY_PART_MASK.iter().cycle()) {
            *byte ^= mask;
        }
        let left = TdesSchedule::new(bdk.expose_secret()).ok_or_else(refused)?;
        let right = TdesSchedule::new(masked.expose_secret()).ok_or_else(refused)?;
        Ok(Self { left, right })
    }

    /// The IPEK for `ksn` (its counter is ignored); the two halves are computed interleaved.
    pub fn derive(&self, ksn: &Ksn) -> SymmetricKey {
        let mut left = Zeroizing::new([0u8; 8]);
        left.copy_from_slice(&ksn.initial().0[..8]);
        let mut right = Zeroizing::new(*left);
        self.left.encrypt_pair(&mut left, &self.right, &mut right);
        let mut ipek = SecretBytes::zeroed(16);
        ipek.expose_secret_mut()[..8].copy_from_slice(&left[..]);
        ipek.expose_secret_mut()[8..].copy_from_slice(&right[..]);
        match SymmetricKey::new(KeyAlgorithm::Tdes2, ipek) {
            Ok(key) => key,
            Err(_) => unreachable!("16 bytes are a two-key TDES key"),
        }
    }
}

/// The terminal's transaction key for `ksn`, derived from the IPEK by the non-reversible key
/// generation process once for each one-bit of the counter, most significant first
/// (X9.24-1-2009 Annex A). Refuses counter 0 (the IPEK is not a transaction key) and counters
/// with more than ten one-bits, which a conforming terminal never reaches.
pub fn transaction_key(ipek: &SymmetricKey, ksn: &Ksn) -> Result<SymmetricKey, DukptError> {
    if ipek.algorithm() != KeyAlgorithm::Tdes2 {
        return Err(DukptError::IpekNotTdes2(ipek.algorithm()));
    }
    let counter = ksn.counter();
    check_counter(counter)?;

    let mut key = Zeroizing::new([0u8; 16]);
    key.copy_from_slice(ipek.expose_secret());
    // The 64-bit KSN register: the rightmost 8 bytes of the KSN with the counter cleared, into
    // which the counter's bits are shifted one at a time.
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&ksn.0[2..]);
    let mut register = u64::from_be_bytes(tail) & !u64::from(COUNTER_MASK);
    for bit in (0..COUNTER_BITS).rev() {
        let shift = 1u64 << bit;
        if u64::from(counter) & shift != 0 {
            register |= shift;
            non_reversible_key_generation(&mut key, register.to_be_bytes());
        }
    }
    Ok(from_16(&key))
}

fn check_counter(counter: u32) -> Result<(), DukptError> {
    if counter == 0 {
        return Err(DukptError::CounterZero);
    }
    let ones = counter.count_ones();
    if ones > COUNTER_ONE_BITS_MAX {
        return Err(DukptError::CounterTooManyOneBits { counter, ones, max: COUNTER_ONE_BITS_MAX });
    }
    Ok(())
}

/// X9.24-1-2009 "Non-reversible Key Generation Process", replacing `key` in place.
fn non_reversible_key_generation(key: &mut [u8; 16], register: [u8; 8]) {
    let right = half_generation(key, register);
    for (byte, mask) in key.iter_mut().zip(KEY_PART_MASK.iter().cycle()) {
        *byte ^= mask;
    }
    let left = half_generation(key, register);
    key[..8].copy_from_slice(&left);
    key[8..].copy_from_slice(&right);
}

/// One half of the process: (register XOR right) single-DES-encrypted under left, XOR right.
fn half_generation(key: &[u8; 16], register: [u8; 8]) -> [u8; 8] {
    let mut left = Zeroizing::new([0u8; 8]);
    left.copy_from_slice(&key[..8]);
    let mut block = register;
    for (b, r) in block.iter_mut().zip(&key[8..]) {
        *b ^= r;
    }
    crate::tdes::des_encrypt_block(&left, &mut block);
    for (b, r) in block.iter_mut().zip(&key[8..]) {
        *b ^= r;
    }
    block
}

fn from_16(bytes: &[u8; 16]) -> SymmetricKey {
    // Sixteen bytes are always a valid two-key TDES key.
    match SymmetricKey::tdes(SecretBytes::from_slice(bytes)) {
        Ok(key) => key,
        Err(_) => unreachable!("16 bytes are a two-key TDES key"),
    }
}

/// The PIN encryption key: the transaction key XOR `00000000000000FF 00000000000000FF`.
pub fn pin_key(transaction_key: &SymmetricKey) -> SymmetricKey {
    variant(transaction_key, [0, 0, 0, 0, 0, 0, 0, 0xFF])
}

/// The MAC key for requests (or both ways): XOR `000000000000FF00 000000000000FF00`.
pub fn mac_key(transaction_key: &SymmetricKey) -> SymmetricKey {
    variant(transaction_key, [0, 0, 0, 0, 0, 0, 0xFF, 0])
}

/// The MAC key for responses: XOR `00000000FF000000 00000000FF000000`.
pub fn mac_response_key(transaction_key: &SymmetricKey) -> SymmetricKey {
    variant(transaction_key, [0, 0, 0, 0, 0xFF, 0, 0, 0])
}

/// The data encryption key variant for requests (or both ways): XOR
/// `0000000000FF0000 0000000000FF0000`. This is the variant only: some terminals go on to
/// encrypt it under itself (a one-way step that X9.24-1-2009 does not define); do that at the
/// call site if the terminal does.
pub fn data_key(transaction_key: &SymmetricKey) -> SymmetricKey {
    variant(transaction_key, [0, 0, 0, 0, 0, 0xFF, 0, 0])
}

/// XORs `mask` into every 8-byte part of the key; the algorithm is kept.
fn variant(key: &SymmetricKey, mask: [u8; 8]) -> SymmetricKey {
    let mut out = key.clone_secret().into_secret();
    for (byte, m) in out.expose_secret_mut().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
    match SymmetricKey::new(key.algorithm(), out) {
        Ok(variant) => variant,
        Err(_) => unreachable!("a variant keeps the key's length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hex: &str) -> SymmetricKey {
        SymmetricKey::tdes_from_hex(hex).expect("test key")
    }

    const BDK: &str = "0123456789ABCDEFFEDCBA9876543210";

    #[test]
    fn ksn_counter_is_the_low_21_bits() {
        let ksn = Ksn::from_hex("FFFF9876543210E00001").expect("ksn");
        assert_eq!(ksn.counter(), 1);
        assert_eq!(ksn.initial().to_hex(), "FFFF9876543210E00000");
        let ksn = Ksn::from_hex("FFFF9876543210FFFFFF").expect("ksn");
        assert_eq!(ksn.counter(), 0x1F_FFFF);
        assert_eq!(ksn.initial().to_hex(), "FFFF9876543210E00000");
        assert_eq!(ksn.with_counter(0x12345).expect("fits").to_hex(), "FFFF9876543210E12345");
    }

    #[test]
    fn counter_beyond_21_bits_is_refused() {
        let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
        assert_eq!(ksn.with_counter(1 << 21), Err(DukptError::CounterTooLarge { counter: 1 << 21, bits: 21 }));
    }

    #[test]
    fn ksn_of_wrong_length_or_not_hex_is_refused() {
        assert!(matches!(Ksn::from_hex("FFFF"), Err(DukptError::IdentifierLength { .. })));
        assert!(matches!(Ksn::from_hex("FFFF9876543210E0000G"), Err(DukptError::IdentifierHex { .. })));
    }

    #[test]
    fn debug_of_a_ksn_shows_its_hex() {
        let ksn = Ksn::from_hex("ffff9876543210e00001").expect("ksn");
        assert_eq!(format!("{ksn:?}"), "Ksn(FFFF9876543210E00001)");
    }

    #[test]
    fn transaction_key_for_counter_zero_is_refused() {
        let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
        let ipek = derive_ipek(&key(BDK), &ksn).expect("ipek");
        assert_eq!(transaction_key(&ipek, &ksn), Err(DukptError::CounterZero));
    }

    #[test]
    fn transaction_key_for_a_counter_with_eleven_one_bits_is_refused() {
        let ksn = Ksn::from_hex("FFFF9876543210E007FF").expect("ksn");
        let ipek = derive_ipek(&key(BDK), &ksn).expect("ipek");
        assert_eq!(
            transaction_key(&ipek, &ksn),
            Err(DukptError::CounterTooManyOneBits { counter: 0x7FF, ones: 11, max: 10 })
        );
        let ten = ksn.with_counter(0x3FF).expect("fits");
        assert!(transaction_key(&ipek, &ten).is_ok());
    }

    #[test]
    fn ipek_from_an_aes_bdk_is_refused() {
        let bdk = SymmetricKey::aes_from_hex(BDK).expect("aes");
        let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
        assert_eq!(derive_ipek(&bdk, &ksn), Err(DukptError::BdkNotTdes(KeyAlgorithm::Aes128)));
    }

    #[test]
    fn three_key_bdk_with_equal_parts_gives_the_two_key_ipek() {
        // K1 K2 K1 as three-key TDES is the same cipher as two-key K1 K2, and the mask is
        // applied per part, so the extension agrees with the standard on such keys.
        let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
        let two = derive_ipek(&key(BDK), &ksn).expect("two-key");
        let three = derive_ipek(&key(&format!("{BDK}0123456789ABCDEF")), &ksn).expect("three-key");
        assert_eq!(two, three);
        assert_eq!(two.algorithm(), KeyAlgorithm::Tdes2);
    }

    #[test]
    fn variants_flip_one_byte_in_each_half() {
        let tk = key("042666B49184CFA368DE9628D0397BC9");
        let hex = |k: SymmetricKey| k.secret().to_hex_upper().to_string();
        assert_eq!(hex(pin_key(&tk)), "042666B49184CF5C68DE9628D0397B36");
        assert_eq!(hex(mac_key(&tk)), "042666B4918430A368DE9628D03984C9");
        assert_eq!(hex(mac_response_key(&tk)), "042666B46E84CFA368DE96282F397BC9");
        assert_eq!(hex(data_key(&tk)), "042666B4917BCFA368DE9628D0C67BC9");
    }
}
