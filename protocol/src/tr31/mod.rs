//! ASC X9 TR-31:2018 key blocks: a key, its header (usage, algorithm, mode of use, …) and a MAC
//! binding the two, under a key block protection key (KBPK).
//!
//! ## Layout
//! - [`header`]: [`Header`], [`HeaderBuilder`], [`OptionalBlock`], the usage table.
//! - `cipher`: keyed block ciphers, CBC, CMAC, KBEK/KBAK derivation.
//! - this module: [`wrap`], [`unwrap`], [`Version`], [`Tr31Error`].
//!
//! ## Versions
//! | version | KBPK | binding                          | MAC                        | wrap |
//! |---------|------|----------------------------------|----------------------------|------|
//! | `A`     | TDES | variant: KBPK XOR `E`/`M`        | CBC-MAC, 4 bytes           | no   |
//! | `B`     | TDES | CMAC-TDES derivation (§5.3.2)    | CMAC, 8 bytes, the CBC IV  | yes  |
//! | `C`     | TDES | variant: KBPK XOR `0x45`/`0x4D`  | CBC-MAC, 4 bytes           | no   |
//! | `D`     | AES  | CMAC-AES derivation (§5.3.2)     | CMAC, 16 bytes, the CBC IV | yes  |
//!
//! Versions A and C are read for legacy blocks only: [`wrap`] refuses them
//! ([`Tr31Error::WrapVersionUnsupported`]), as TR-31:2018 deprecates A and the gateway ships B
//! for TDES and D for AES.
//!
//! ## Payload
//! The encrypted payload is the key length in bits (2 bytes), the key, and random padding to a
//! whole number of cipher blocks. [`wrap`] pads the key field to the longest key of its algorithm
//! (24 bytes for `T`, 32 for `A`) so a block does not tell two-key from three-key TDES or the AES
//! key size.
//!
//! ## Unwrap order
//! Structure first (length digits, header, hex), then the KBPK against the version, then the
//! MAC, compared in constant time; only a `MacVerified` proof lets the decrypted length field and
//! key be read.

mod cipher;
pub mod header;

use std::fmt;

use zeroize::Zeroizing;

use self::cipher::{BlockKeys, TdesBlockKeysPair, VariantKeys, BLOCK_LEN_MAX};
use self::header::{is_upper_hex, KEY_BLOCK_LEN_MAX};
pub use self::header::{DukptInitialKeyId, Header, HeaderBuilder, OptionalBlock};
use crate::keys::{KeyAlgorithm, SymmetricKey};
use crate::secret::{ct_eq, SecretBytes};

/// The key block version: the first character of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    A,
    B,
    C,
    D,
}

impl Version {
    pub fn as_byte(self) -> u8 {
        match self {
            Version::A => b'A',
            Version::B => b'B',
            Version::C => b'C',
            Version::D => b'D',
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'A' => Some(Version::A),
            b'B' => Some(Version::B),
            b'C' => Some(Version::C),
            b'D' => Some(Version::D),
            _ => None,
        }
    }

    /// The cipher block the header and the payload are aligned to.
    pub fn block_len(self) -> usize {
        match self {
            Version::A | Version::B | Version::C => 8,
            Version::D => 16,
        }
    }

    /// Bytes of MAC at the end of a block.
    pub fn mac_len(self) -> usize {
        match self {
            Version::A | Version::C => 4,
            Version::B => 8,
            Version::D => 16,
        }
    }

    fn kbpk_kind(self) -> &'static str {
        match self {
            Version::A | Version::B | Version::C => "TDES",
            Version::D => "AES",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", char::from(self.as_byte()))
    }
}

/// Why a key block or header was refused, or could not be made. No variant carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tr31Error {
    #[error("key block of {len} characters is shorter than the {min}-character header")]
    TooShort { len: usize, min: usize },
    #[error("key block of {len} characters is longer than the {max} four length digits allow")]
    TooLong { len: usize, max: usize },
    #[error("character at offset {offset} is not printable ASCII")]
    NotPrintable { offset: usize },
    #[error("unknown key block version {0:?}")]
    UnknownVersion(char),
    #[error("length field {0:?} is not four decimal digits")]
    LengthDigits(String),
    #[error("length field says {declared} characters but the key block has {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("unknown key usage {0:?}")]
    UnknownKeyUsage(String),
    #[error("unknown algorithm {0:?}")]
    UnknownAlgorithm(char),
    #[error("unknown mode of use {0:?}")]
    UnknownModeOfUse(char),
    #[error("key usage {usage} does not allow algorithm {algorithm:?}")]
    AlgorithmNotAllowed { usage: String, algorithm: char },
    #[error("key usage {usage} does not allow mode of use {mode:?}")]
    ModeOfUseNotAllowed { usage: String, mode: char },
    #[error("key version number {0:?} is not two alphanumeric characters")]
    KeyVersionNumber(String),
    #[error("unknown exportability {0:?}")]
    UnknownExportability(char),
    #[error("optional block count {0:?} is not two decimal digits")]
    OptionalBlockCount(String),
    #[error("reserved field is {0:?}, not \"00\"")]
    ReservedField(String),
    #[error("optional block {index} runs past the end of the text")]
    OptionalBlockTruncated { index: usize },
    #[error("optional block ID {id:?} is not two alphanumeric characters")]
    OptionalBlockId { id: String },
    #[error("optional block {id} has an invalid length field")]
    OptionalBlockLength { id: String },
    #[error("optional block {id}: {reason}")]
    OptionalBlockData { id: String, reason: &'static str },
    #[error("optional block {0} appears twice")]
    DuplicateOptionalBlock(String),
    #[error("the padding block PB must be the last optional block")]
    PaddingBlockNotLast,
    #[error("the padding block PB is added by format, not by the caller")]
    PaddingBlockIsAutomatic,
    #[error("{count} optional blocks, at most {max}")]
    TooManyOptionalBlocks { count: usize, max: usize },
    #[error("{len} characters after the header")]
    TrailingData { len: usize },
    #[error("header of {len} characters is not a whole number of {block_len}-byte cipher blocks")]
    HeaderNotAligned { len: usize, block_len: usize },
    #[error("payload character at offset {offset} is not upper-case hex")]
    PayloadNotHex { offset: usize },
    #[error("payload of {len} hex digits is not whole {block_len}-byte blocks and a {mac_len}-byte MAC")]
    PayloadLength { len: usize, block_len: usize, mac_len: usize },
    #[error("version {version} key blocks need a {expected} KBPK, got {got}")]
    KbpkAlgorithm { version: Version, expected: &'static str, got: KeyAlgorithm },
    #[error("key block MAC does not verify")]
    MacMismatch,
    #[error("key length field of {bits} bits does not fit the {available}-byte payload")]
    KeyLengthField { bits: usize, available: usize },
    #[error("a {len}-byte key is not valid for algorithm {algorithm:?}")]
    KeyLength { algorithm: char, len: usize },
    #[error("version {0} key blocks are unwrapped only; wrap with version B (TDES) or D (AES)")]
    WrapVersionUnsupported(Version),
}

/// Proof that a key block's MAC verified. Only [`verify_mac`] makes one, and reading the
/// decrypted payload needs one, so no path trusts a decrypted key before its MAC is checked.
struct MacVerified(());

fn verify_mac(computed: &[u8], received: &[u8]) -> Result<MacVerified, Tr31Error> {
    if ct_eq(computed, received) {
        Ok(MacVerified(()))
    } else {
        Err(Tr31Error::MacMismatch)
    }
}

/// Key lengths a header's algorithm allows: TDES one-, two- or three-key, AES 128/192/256,
/// single DES, and for the others (HMAC, RSA, EC, DSA) anything from one byte.
fn check_key_len(algorithm: u8, len: usize) -> Result<(), Tr31Error> {
    let valid = match algorithm {
        b'T' => matches!(len, 8 | 16 | 24),
        b'A' => matches!(len, 16 | 24 | 32),
        b'D' => len == 8,
        _ => len > 0,
    };
    if valid {
        Ok(())
    } else {
        Err(Tr31Error::KeyLength { algorithm: char::from(algorithm), len })
    }
}

/// The length the key field is padded to before the random padding: the longest key of the
/// algorithm, so the block does not reveal the key's size.
fn masked_key_len(algorithm: u8, len: usize) -> usize {
    match algorithm {
        b'T' => len.max(24),
        b'A' => len.max(32),
        _ => len,
    }
}

fn check_kbpk(version: Version, kbpk: &SymmetricKey) -> Result<(), Tr31Error> {
    if cipher::kbpk_fits(version, kbpk) {
        Ok(())
    } else {
        Err(Tr31Error::KbpkAlgorithm { version, expected: version.kbpk_kind(), got: kbpk.algorithm() })
    }
}

/// Wraps `key` under `kbpk` as a version B or D key block with `header`.
///
/// The length digits are computed, whatever the header was parsed from; a `PB` padding block is
/// added if the header needs one. `rng` fills the payload padding. The key's length must suit
/// the header's algorithm (`T`: 8, 16 or 24 bytes; `A`: 16, 24 or 32).
pub fn wrap(
    kbpk: &SymmetricKey,
    header: &Header,
    key: &SecretBytes,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<String, Tr31Error> {
    seal_one(Unsealed::new(kbpk, header, key, rng), kbpk)
}

fn seal_one(unsealed: Result<Unsealed, Tr31Error>, kbpk: &SymmetricKey) -> Result<String, Tr31Error> {
    let unsealed = unsealed?;
    let keys = unsealed.block_keys(kbpk)?;
    Ok(unsealed.seal(&keys))
}

/// Wraps two keys, each under its own KBPK: the same two results as [`wrap`] called on `first`
/// then on `second` with the same `rng`. When the two have the same shape (version B, TDES KBPKs
/// of one length, header and payload of one length: every terminal of one task), their TDES
/// work is interleaved block by block ([`TdesSchedule::encrypt_pair`](crate::des_core)): a
/// TR-31 B wrap is one long chain of dependent block encryptions, and two independent chains
/// keep the core busy where one leaves it waiting. Otherwise the two are wrapped in turn.
pub fn wrap_pair(
    first: (&SymmetricKey, &Header, &SecretBytes),
    second: (&SymmetricKey, &Header, &SecretBytes),
    rng: &mut dyn FnMut(&mut [u8]),
) -> [Result<String, Tr31Error>; 2] {
    let a = Unsealed::new(first.0, first.1, first.2, rng);
    let b = Unsealed::new(second.0, second.1, second.2, rng);
    let (mut a, mut b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => return [seal_one(a, first.0), seal_one(b, second.0)],
    };
    let same_shape = a.version == Version::B
        && b.version == Version::B
        && first.0.algorithm() == second.0.algorithm()
        && a.header_text.len() == b.header_text.len()
        && a.payload.len() == b.payload.len();
    if same_shape {
        if let Some(keys) = TdesBlockKeysPair::derive(first.0, second.0) {
            let message = |u: &Unsealed| {
                let mut m = Zeroizing::new(Vec::with_capacity(u.header_text.len() + u.payload.len()));
                m.extend_from_slice(u.header_text.as_bytes());
                m.extend_from_slice(u.payload.expose_secret());
                m
            };
            let [mac_a, mac_b] = keys.tag([&message(&a), &message(&b)]);
            keys.cbc_encrypt([&mac_a, &mac_b], [a.payload.expose_secret_mut(), b.payload.expose_secret_mut()]);
            return [Ok(a.format(&mac_a)), Ok(b.format(&mac_b))];
        }
    }
    [seal_one(Ok(a), first.0), seal_one(Ok(b), second.0)]
}

/// A key block before its MAC and encryption: the formatted header and the clear payload.
struct Unsealed {
    version: Version,
    mac_len: usize,
    total_len: usize,
    header_text: String,
    payload: SecretBytes,
}

impl Unsealed {
    /// Every check of [`wrap`] before any cipher work, and the payload with its padding.
    fn new(
        kbpk: &SymmetricKey,
        header: &Header,
        key: &SecretBytes,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Self, Tr31Error> {
        let version = header.version();
        if matches!(version, Version::A | Version::C) {
            return Err(Tr31Error::WrapVersionUnsupported(version));
        }
        check_kbpk(version, kbpk)?;
        check_key_len(header.algorithm(), key.len())?;
        let key_bits = u16::try_from(key.len() * 8)
            .map_err(|_| Tr31Error::KeyLength { algorithm: char::from(header.algorithm()), len: key.len() })?;

        let block_len = version.block_len();
        let mac_len = version.mac_len();
        let field_len = 2 + masked_key_len(header.algorithm(), key.len());
        let payload_len = field_len.div_ceil(block_len) * block_len;
        let total_len = header.encoded_len() + 2 * (payload_len + mac_len);
        if total_len > KEY_BLOCK_LEN_MAX {
            return Err(Tr31Error::TooLong { len: total_len, max: KEY_BLOCK_LEN_MAX });
        }
        let header_text = header.format(total_len)?;

        let mut payload = SecretBytes::zeroed(payload_len);
        {
            let bytes = payload.expose_secret_mut();
            bytes[..2].copy_from_slice(&key_bits.to_be_bytes());
            bytes[2..2 + key.len()].copy_from_slice(key.expose_secret());
            rng(&mut bytes[2 + key.len()..]);
        }
        Ok(Self { version, mac_len, total_len, header_text, payload })
    }

    fn block_keys(&self, kbpk: &SymmetricKey) -> Result<BlockKeys, Tr31Error> {
        let version = self.version;
        BlockKeys::derive(kbpk).ok_or(Tr31Error::KbpkAlgorithm {
            version,
            expected: version.kbpk_kind(),
            got: kbpk.algorithm(),
        })
    }

    /// MAC over header and clear payload, then the payload encrypted with the MAC as its IV.
    fn seal(mut self, keys: &BlockKeys) -> String {
        let block_len = self.version.block_len();
        let mac = keys.authentication.tag(&[self.header_text.as_bytes(), self.payload.expose_secret()]);
        keys.encryption.cbc_encrypt(&mac[..block_len], self.payload.expose_secret_mut());
        self.format(&mac)
    }

    /// The key block text: header, encrypted payload and MAC in upper-case hex.
    fn format(self, mac: &[u8]) -> String {
        let mut block = self.header_text;
        block.reserve_exact(self.total_len - block.len());
        push_upper_hex(&mut block, self.payload.expose_secret());
        push_upper_hex(&mut block, &mac[..self.mac_len]);
        debug_assert_eq!(block.len(), self.total_len);
        block
    }
}

fn push_upper_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0F)]));
    }
}

/// Unwraps a key block of any version: the header and the key, once every check has passed
/// (see the module docs for the order). Never panics, whatever `block` holds.
pub fn unwrap(kbpk: &SymmetricKey, block: &str) -> Result<(Header, SecretBytes), Tr31Error> {
    unwrap_inner(kbpk, None, block)
}

/// A KBPK with its derived block keys, for unwrapping many key blocks under one KBPK (the
/// gateway's master key opening every sealed key): [`PreparedKbpk::unwrap`] is [`unwrap`]
/// without deriving the KBEK and KBAK (or the variant keys) again for every block. Holds key
/// material; its `Debug` prints none of it.
pub struct PreparedKbpk {
    kbpk: SymmetricKey,
    binding: Option<BlockKeys>,
    variant: Option<VariantKeys>,
}

impl fmt::Debug for PreparedKbpk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreparedKbpk({})", self.kbpk.algorithm())
    }
}

impl PreparedKbpk {
    /// Derives the keys of the derivation binding method (versions B and D) and, for a TDES
    /// KBPK, those of the variant method (A and C).
    pub fn new(kbpk: &SymmetricKey) -> Self {
        let variant = if kbpk.algorithm().is_tdes() { VariantKeys::derive(kbpk) } else { None };
        Self { kbpk: kbpk.clone_secret(), binding: BlockKeys::derive(kbpk), variant }
    }

    /// Exactly [`unwrap`] under this KBPK: the same checks, in the same order, with the same
    /// errors.
    pub fn unwrap(&self, block: &str) -> Result<(Header, SecretBytes), Tr31Error> {
        unwrap_inner(&self.kbpk, Some(self), block)
    }
}

fn unwrap_inner(
    kbpk: &SymmetricKey,
    prepared: Option<&PreparedKbpk>,
    block: &str,
) -> Result<(Header, SecretBytes), Tr31Error> {
    let text = block.as_bytes();
    if text.len() > KEY_BLOCK_LEN_MAX {
        return Err(Tr31Error::TooLong { len: text.len(), max: KEY_BLOCK_LEN_MAX });
    }
    let parsed = header::parse_prefix(text)?;
    if parsed.declared_len != text.len() {
        return Err(Tr31Error::LengthMismatch { declared: parsed.declared_len, actual: text.len() });
    }
    let header = parsed.header;
    let version = header.version();
    let block_len = version.block_len();
    if parsed.text_len % block_len != 0 {
        return Err(Tr31Error::HeaderNotAligned { len: parsed.text_len, block_len });
    }
    check_kbpk(version, kbpk)?;

    let (header_text, payload_hex) = text.split_at(parsed.text_len.min(text.len()));
    let mac_len = version.mac_len();
    let payload = split_payload(payload_hex, parsed.text_len, block_len, mac_len)?;

    let (mut secret, mac) = (payload.encrypted, payload.mac);
    let verified = match version {
        Version::A | Version::C => {
            let refused = || Tr31Error::KbpkAlgorithm { version, expected: version.kbpk_kind(), got: kbpk.algorithm() };
            let derived;
            let keys = match prepared {
                Some(prepared) => prepared.variant.as_ref().ok_or_else(refused)?,
                None => {
                    derived = VariantKeys::derive(kbpk).ok_or_else(refused)?;
                    &derived
                }
            };
            // The variant MAC covers the header text and the encrypted payload, so it is checked
            // before decryption.
            let computed = keys.tag(&[header_text, secret.expose_secret()]);
            let verified = verify_mac(&computed[..mac_len], &mac[..mac_len])?;
            keys.encryption.cbc_decrypt(header_text.get(..8).unwrap_or(&[0; 8]), secret.expose_secret_mut());
            verified
        }
        Version::B | Version::D => {
            let refused = || Tr31Error::KbpkAlgorithm { version, expected: version.kbpk_kind(), got: kbpk.algorithm() };
            let derived;
            let keys = match prepared {
                Some(prepared) => prepared.binding.as_ref().ok_or_else(refused)?,
                None => {
                    derived = BlockKeys::derive(kbpk).ok_or_else(refused)?;
                    &derived
                }
            };
            // The derivation MAC covers the header and the clear payload, and is the CBC IV:
            // decrypt, then check before reading a byte of the result.
            keys.encryption.cbc_decrypt(&mac[..block_len], secret.expose_secret_mut());
            let computed = Zeroizing::new(keys.authentication.tag(&[header_text, secret.expose_secret()]));
            verify_mac(&computed[..mac_len], &mac[..mac_len])?
        }
    };
    let key = key_from_payload(&secret, header.algorithm(), verified)?;
    Ok((header, key))
}

struct Payload {
    encrypted: SecretBytes,
    mac: [u8; BLOCK_LEN_MAX],
}

/// Checks the payload's charset and shape and decodes it: whole cipher blocks of encrypted key
/// field (at least one), then the MAC.
fn split_payload(hex: &[u8], offset: usize, block_len: usize, mac_len: usize) -> Result<Payload, Tr31Error> {
    if let Some(at) = hex.iter().position(|b| !is_upper_hex(std::slice::from_ref(b))) {
        return Err(Tr31Error::PayloadNotHex { offset: offset + at });
    }
    let shape_error = Tr31Error::PayloadLength { len: hex.len(), block_len, mac_len };
    if hex.len() % 2 != 0 {
        return Err(shape_error);
    }
    let encrypted_len = (hex.len() / 2).checked_sub(mac_len).ok_or(shape_error.clone())?;
    if encrypted_len == 0 || encrypted_len % block_len != 0 {
        return Err(shape_error);
    }
    let (encrypted_hex, mac_hex) = hex.split_at(2 * encrypted_len);
    let mut encrypted = SecretBytes::zeroed(encrypted_len);
    hex::decode_to_slice(encrypted_hex, encrypted.expose_secret_mut())
        .map_err(|_| Tr31Error::PayloadNotHex { offset })?;
    let mut mac = [0u8; BLOCK_LEN_MAX];
    let mac_slot = mac.get_mut(..mac_len).ok_or(Tr31Error::PayloadNotHex { offset })?;
    hex::decode_to_slice(mac_hex, mac_slot).map_err(|_| Tr31Error::PayloadNotHex { offset })?;
    Ok(Payload { encrypted, mac })
}

/// Reads the key out of a verified clear payload: a length in bits, whole bytes, within the
/// payload, valid for the header's algorithm.
fn key_from_payload(payload: &SecretBytes, algorithm: u8, _verified: MacVerified) -> Result<SecretBytes, Tr31Error> {
    let bytes = payload.expose_secret();
    let available = bytes.len().saturating_sub(2);
    let bits = match bytes {
        [high, low, ..] => usize::from(u16::from_be_bytes([*high, *low])),
        _ => return Err(Tr31Error::KeyLengthField { bits: 0, available }),
    };
    if bits % 8 != 0 || bits / 8 > available {
        return Err(Tr31Error::KeyLengthField { bits, available });
    }
    let len = bits / 8;
    check_key_len(algorithm, len)?;
    let key = bytes.get(2..2 + len).ok_or(Tr31Error::KeyLengthField { bits, available })?;
    Ok(SecretBytes::from_slice(key))
}

/// For a test's sake only: version A and C blocks are never produced in production. `field` is
/// the clear payload (length, key, padding), a whole number of TDES blocks.
#[cfg(test)]
fn wrap_variant(kbpk: &SymmetricKey, header: &Header, field: &[u8]) -> Result<String, Tr31Error> {
    let total_len = header.encoded_len() + 2 * field.len() + 8;
    let header_text = header.format(total_len)?;
    let mut payload = field.to_vec();
    let keys = VariantKeys::derive(kbpk).ok_or(Tr31Error::MacMismatch)?;
    keys.encryption.cbc_encrypt(&header_text.as_bytes()[..8], &mut payload);
    let mac = keys.tag(&[header_text.as_bytes(), &payload]);
    let mut block = header_text;
    push_upper_hex(&mut block, &payload);
    push_upper_hex(&mut block, &mac[..4]);
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tdes(hex: &str) -> SymmetricKey {
        SymmetricKey::tdes_from_hex(hex).expect("tdes")
    }

    fn aes(hex: &str) -> SymmetricKey {
        SymmetricKey::aes_from_hex(hex).expect("aes")
    }

    fn zeros(buf: &mut [u8]) {
        buf.fill(0);
    }

    const VERSION_A: &str = "A0072P0TE00E0000F5161ED902807AF26F1D62263644BD24192FDB3193C730301CEE8701";
    const VERSION_A_KBPK: &str = "89E88CF7931444F334BD7547FC3F380C";
    const VERSION_B: &str = "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E";
    const VERSION_B_KBPK: &str = "DD7515F2BFC17F85CE48F3CA25CB21F6";

    #[test]
    fn published_version_a_block_unwraps() {
        let (header, key) = unwrap(&tdes(VERSION_A_KBPK), VERSION_A).expect("unwrap");
        assert_eq!(header.key_usage_str(), "P0");
        assert_eq!(key.to_hex_upper().as_str(), "F039121BEC83D26B169BDCD5B22AAF8F");
    }

    #[test]
    fn key_block_with_flipped_mac_is_refused() {
        let mut text = VERSION_B.to_string();
        let last = if text.ends_with('E') { "F" } else { "E" };
        text.replace_range(text.len() - 1.., last);
        assert_eq!(unwrap(&tdes(VERSION_B_KBPK), &text).map(|_| ()), Err(Tr31Error::MacMismatch));
    }

    #[test]
    fn key_block_under_the_wrong_kbpk_is_refused() {
        let wrong = tdes("00112233445566778899AABBCCDDEEFF");
        assert_eq!(unwrap(&wrong, VERSION_B).map(|_| ()), Err(Tr31Error::MacMismatch));
    }

    #[test]
    fn version_b_block_under_an_aes_kbpk_is_refused() {
        let kbpk = aes(VERSION_B_KBPK);
        assert_eq!(
            unwrap(&kbpk, VERSION_B).map(|_| ()),
            Err(Tr31Error::KbpkAlgorithm { version: Version::B, expected: "TDES", got: KeyAlgorithm::Aes128 })
        );
    }

    #[test]
    fn length_digits_that_disagree_with_the_block_are_refused() {
        let text = VERSION_B.replacen("0080", "0081", 1);
        assert_eq!(
            unwrap(&tdes(VERSION_B_KBPK), &text).map(|_| ()),
            Err(Tr31Error::LengthMismatch { declared: 81, actual: 80 })
        );
    }

    #[test]
    fn lower_case_payload_is_refused() {
        let text = VERSION_B.replacen("94B4", "94b4", 1);
        assert_eq!(unwrap(&tdes(VERSION_B_KBPK), &text).map(|_| ()), Err(Tr31Error::PayloadNotHex { offset: 18 }));
    }

    #[test]
    fn payload_that_is_not_whole_cipher_blocks_is_refused() {
        let mut text = VERSION_B[..VERSION_B.len() - 2].to_string();
        text.replace_range(1..5, &format!("{:04}", text.len()));
        assert!(matches!(unwrap(&tdes(VERSION_B_KBPK), &text), Err(Tr31Error::PayloadLength { .. })));
    }

    #[test]
    fn wrap_of_version_a_or_c_is_refused() {
        for version in [Version::A, Version::C] {
            let header = Header::parse("B0000P0TE00E0000").expect("header").with_version(version);
            let key = SecretBytes::from_slice(&[1; 16]);
            assert_eq!(
                wrap(&tdes(VERSION_B_KBPK), &header, &key, &mut zeros),
                Err(Tr31Error::WrapVersionUnsupported(version))
            );
        }
    }

    #[test]
    fn key_too_short_for_its_algorithm_is_refused_at_wrap() {
        let header = Header::parse("D0000P0AE00E0000").expect("header");
        let key = SecretBytes::from_slice(&[1; 8]);
        assert_eq!(
            wrap(&aes(VERSION_B_KBPK), &header, &key, &mut zeros),
            Err(Tr31Error::KeyLength { algorithm: 'A', len: 8 })
        );
    }

    #[test]
    fn wrapped_tdes_keys_of_every_length_have_the_same_block_length() {
        let header = Header::parse("B0000P0TE00E0000").expect("header");
        let lengths: Vec<usize> = [8usize, 16, 24]
            .iter()
            .map(|len| {
                let key = SecretBytes::from_slice(&vec![3; *len]);
                wrap(&tdes(VERSION_B_KBPK), &header, &key, &mut zeros).expect("wrap").len()
            })
            .collect();
        assert_eq!(lengths, vec![96, 96, 96]);
    }

    #[test]
    fn version_c_block_round_trips_through_the_variant_method() {
        let kbpk = tdes(VERSION_A_KBPK);
        let header = Header::parse("C0000P0TE00E0000").expect("header");
        let key = [0x5Au8; 16];
        let mut field = vec![0x00, 0x80];
        field.extend_from_slice(&key);
        field.extend_from_slice(&[0; 6]);
        let block = wrap_variant(&kbpk, &header, &field).expect("wrap");
        let (parsed, unwrapped) = unwrap(&kbpk, &block).expect("unwrap");
        assert_eq!(parsed.version(), Version::C);
        assert_eq!(unwrapped.expose_secret(), &key);
        let mut tampered = block.clone();
        tampered.replace_range(20..21, if &block[20..21] == "0" { "1" } else { "0" });
        assert_eq!(unwrap(&kbpk, &tampered).map(|_| ()), Err(Tr31Error::MacMismatch));
    }

    #[test]
    fn decrypted_key_length_field_beyond_the_payload_is_refused_after_the_mac() {
        // A correctly MACed version C block whose length field claims 0x0800 bits.
        let kbpk = tdes(VERSION_A_KBPK);
        let header = Header::parse("C0000P0TE00E0000").expect("header");
        let mut field = vec![0x08, 0x00];
        field.extend_from_slice(&[0; 22]);
        let block = wrap_variant(&kbpk, &header, &field).expect("wrap");
        assert!(matches!(unwrap(&kbpk, &block), Err(Tr31Error::KeyLengthField { .. })), "{block}");
    }
}
