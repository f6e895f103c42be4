//! The block-cipher machinery of TR-31: one keyed cipher per key, CBC in place, CMAC, and the two
//! ways of turning a KBPK into a key block encryption key (KBEK) and authentication key (KBAK).
//!
//! Each key is scheduled once per wrap or unwrap: the KBPK once for the derivation, the KBEK and
//! the KBAK once each, however many blocks they then process.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use zeroize::Zeroizing;

use super::Version;
use crate::des_core::TdesSchedule;
use crate::keys::{KeyAlgorithm, SymmetricKey};

/// The largest cipher block (AES); TDES uses the first 8 bytes of a buffer this size.
pub(super) const BLOCK_LEN_MAX: usize = 16;

/// A scheduled block cipher.
pub(super) enum Cipher {
    Tdes(TdesSchedule),
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
}

impl Cipher {
    /// Schedules `key` as `algorithm`; `None` if the length does not fit the algorithm.
    pub(super) fn new(algorithm: KeyAlgorithm, key: &[u8]) -> Option<Self> {
        Some(match algorithm {
            KeyAlgorithm::Tdes2 if key.len() == 16 => Cipher::Tdes(TdesSchedule::new(key)?),
            KeyAlgorithm::Tdes3 if key.len() == 24 => Cipher::Tdes(TdesSchedule::new(key)?),
            KeyAlgorithm::Tdes2 | KeyAlgorithm::Tdes3 => return None,
            KeyAlgorithm::Aes128 => Cipher::Aes128(Aes128::new_from_slice(key).ok()?),
            KeyAlgorithm::Aes192 => Cipher::Aes192(Aes192::new_from_slice(key).ok()?),
            KeyAlgorithm::Aes256 => Cipher::Aes256(Aes256::new_from_slice(key).ok()?),
        })
    }

    pub(super) fn from_key(key: &SymmetricKey) -> Option<Self> {
        Self::new(key.algorithm(), key.expose_secret())
    }

    pub(super) fn block_len(&self) -> usize {
        match self {
            Cipher::Tdes(_) => 8,
            Cipher::Aes128(_) | Cipher::Aes192(_) | Cipher::Aes256(_) => 16,
        }
    }

    /// Encrypts one block in place; a slice of any other length is left alone (callers iterate
    /// with `chunks_exact(block_len)`, so that never happens).
    pub(super) fn encrypt(&self, block: &mut [u8]) {
        if block.len() != self.block_len() {
            debug_assert!(false, "encrypt of a {}-byte block", block.len());
            return;
        }
        match self {
            Cipher::Tdes(c) => {
                if let Ok(block) = <&mut [u8; 8]>::try_from(block) {
                    c.encrypt(block);
                }
            }
            Cipher::Aes128(c) => c.encrypt_block(GenericArray::from_mut_slice(block)),
            Cipher::Aes192(c) => c.encrypt_block(GenericArray::from_mut_slice(block)),
            Cipher::Aes256(c) => c.encrypt_block(GenericArray::from_mut_slice(block)),
        }
    }

    pub(super) fn decrypt(&self, block: &mut [u8]) {
        if block.len() != self.block_len() {
            debug_assert!(false, "decrypt of a {}-byte block", block.len());
            return;
        }
        match self {
            Cipher::Tdes(c) => {
                if let Ok(block) = <&mut [u8; 8]>::try_from(block) {
                    c.decrypt(block);
                }
            }
            Cipher::Aes128(c) => c.decrypt_block(GenericArray::from_mut_slice(block)),
            Cipher::Aes192(c) => c.decrypt_block(GenericArray::from_mut_slice(block)),
            Cipher::Aes256(c) => c.decrypt_block(GenericArray::from_mut_slice(block)),
        }
    }

    /// CBC encryption in place; `data` is a whole number of blocks, `iv` one block.
    pub(super) fn cbc_encrypt(&self, iv: &[u8], data: &mut [u8]) {
        let len = self.block_len();
        let mut chain = [0u8; BLOCK_LEN_MAX];
        chain[..len].copy_from_slice(&iv[..len]);
        for block in data.chunks_exact_mut(len) {
            xor_into(block, &chain[..len]);
            self.encrypt(block);
            chain[..len].copy_from_slice(block);
        }
    }

    /// CBC decryption in place; `data` is a whole number of blocks, `iv` one block.
    pub(super) fn cbc_decrypt(&self, iv: &[u8], data: &mut [u8]) {
        let len = self.block_len();
        let mut chain = [0u8; BLOCK_LEN_MAX];
        chain[..len].copy_from_slice(&iv[..len]);
        let mut cipher_text = [0u8; BLOCK_LEN_MAX];
        for block in data.chunks_exact_mut(len) {
            cipher_text[..len].copy_from_slice(block);
            self.decrypt(block);
            xor_into(block, &chain[..len]);
            chain[..len].copy_from_slice(&cipher_text[..len]);
        }
    }
}

fn xor_into(target: &mut [u8], mask: &[u8]) {
    for (t, m) in target.iter_mut().zip(mask) {
        *t ^= m;
    }
}

/// CMAC (NIST SP 800-38B) under one scheduled cipher, with its subkeys computed once.
pub(super) struct Cmac {
    cipher: Cipher,
    k1: Zeroizing<[u8; BLOCK_LEN_MAX]>,
    k2: Zeroizing<[u8; BLOCK_LEN_MAX]>,
}

impl Cmac {
    pub(super) fn new(cipher: Cipher) -> Self {
        let len = cipher.block_len();
        let mut k1 = Zeroizing::new([0u8; BLOCK_LEN_MAX]);
        cipher.encrypt(&mut k1[..len]);
        double(&mut k1[..len]);
        let mut k2 = k1.clone();
        double(&mut k2[..len]);
        Self { cipher, k1, k2 }
    }

    pub(super) fn block_len(&self) -> usize {
        self.cipher.block_len()
    }

    /// The full-length tag of the concatenation of `parts`, in the first `block_len` bytes.
    pub(super) fn tag(&self, parts: &[&[u8]]) -> [u8; BLOCK_LEN_MAX] {
        let len = self.block_len();
        let mut state = [0u8; BLOCK_LEN_MAX];
        let mut pending = Zeroizing::new([0u8; BLOCK_LEN_MAX]);
        let mut filled = 0;
        for part in parts {
            for &byte in *part {
                // A full block is only processed once more data follows: the last block is
                // treated differently.
                if filled == len {
                    xor_into(&mut state[..len], &pending[..len]);
                    self.cipher.encrypt(&mut state[..len]);
                    filled = 0;
                }
                pending[filled] = byte;
                filled += 1;
            }
        }
        if filled == len {
            xor_into(&mut pending[..len], &self.k1[..len]);
        } else {
            pending[filled] = 0x80;
            pending[filled + 1..len].fill(0);
            xor_into(&mut pending[..len], &self.k2[..len]);
        }
        xor_into(&mut state[..len], &pending[..len]);
        self.cipher.encrypt(&mut state[..len]);
        state
    }
}

/// Multiplication by x in GF(2^64) or GF(2^128), the CMAC subkey step.
fn double(block: &mut [u8]) {
    let carry = block.first().map_or(0, |b| b >> 7);
    let mut next_bit = 0;
    for byte in block.iter_mut().rev() {
        let out = *byte >> 7;
        *byte = (*byte << 1) | next_bit;
        next_bit = out;
    }
    let polynomial = if block.len() == 8 { 0x1B } else { 0x87 };
    if let Some(last) = block.last_mut() {
        *last ^= polynomial * carry;
    }
}

/// The KBEK and KBAK of one wrap or unwrap, scheduled.
pub(super) struct BlockKeys {
    pub(super) encryption: Cipher,
    pub(super) authentication: Cmac,
}

impl BlockKeys {
    /// The key derivation binding method of TR-31:2018 §5.3.2, for versions B (TDES) and D
    /// (AES): each key is CMAC under the KBPK of 8 bytes of derivation data per cipher block of
    /// output: counter (from 1), key usage (`0000` KBEK, `0001` KBAK), separator `00`, algorithm
    /// (`0000` 2TDEA, `0001` 3TDEA, `0002`-`0004` AES-128/192/256) and length in bits. The KBEK
    /// and KBAK have the KBPK's algorithm and length.
    pub(super) fn derive(kbpk: &SymmetricKey) -> Option<Self> {
        let algorithm = kbpk.algorithm();
        let key_len = algorithm.key_len();
        let cmac = Cmac::new(Cipher::from_key(kbpk)?);
        let block_len = cmac.block_len();
        let (encryption, authentication) = if let Cipher::Tdes(tdes) = &cmac.cipher {
            // Every block of both keys is the CMAC of one complete block, E(KBPK, data XOR K1):
            // independent encryptions, done two at a time.
            let mut blocks = tdes_derivation_blocks(algorithm, &cmac.k1[..])?;
            let blocks = &mut blocks[..2 * key_len / 8];
            tdes.encrypt_each(blocks);
            let (encryption, authentication) = tdes_keys_from_blocks(blocks)?;
            (Cipher::Tdes(encryption), Cipher::Tdes(authentication))
        } else {
            let derive_one = |usage: u8| -> Option<Cipher> {
                let mut key = Zeroizing::new([0u8; 32]);
                for (index, chunk) in key[..key_len].chunks_mut(block_len).enumerate() {
                    let tag = Zeroizing::new(cmac.tag(&[&derivation_data(algorithm, usage, index)?]));
                    chunk.copy_from_slice(&tag[..chunk.len()]);
                }
                Cipher::new(algorithm, &key[..key_len])
            };
            (derive_one(0)?, derive_one(1)?)
        };
        let authentication = Cmac::new(authentication);
        Some(Self { encryption, authentication })
    }
}

/// The 8 bytes of derivation data of block `index` (from 0) of the KBEK (`usage` 0) or the KBAK
/// (1): counter (from 1), key usage (`0000` KBEK, `0001` KBAK), separator `00`, algorithm
/// (`0000` 2TDEA, `0001` 3TDEA, `0002`-`0004` AES-128/192/256) and length in bits.
fn derivation_data(algorithm: KeyAlgorithm, usage: u8, index: usize) -> Option<[u8; 8]> {
    let indicator: u8 = match algorithm {
        KeyAlgorithm::Tdes2 => 0,
        KeyAlgorithm::Tdes3 => 1,
        KeyAlgorithm::Aes128 => 2,
        KeyAlgorithm::Aes192 => 3,
        KeyAlgorithm::Aes256 => 4,
    };
    let bits = u16::try_from(algorithm.key_len() * 8).ok()?.to_be_bytes();
    let counter = u8::try_from(index + 1).ok()?;
    Some([counter, 0, usage, 0, 0, indicator, bits[0], bits[1]])
}

/// The KBEK blocks then the KBAK blocks of a TDES KBPK, each `data XOR K1`, ready to be
/// encrypted under the KBPK (the first `2 * key_len / 8` are used).
fn tdes_derivation_blocks(algorithm: KeyAlgorithm, k1: &[u8]) -> Option<Zeroizing<[[u8; 8]; 6]>> {
    let per_key = algorithm.key_len() / 8;
    let mut blocks = Zeroizing::new([[0u8; 8]; 6]);
    for (i, block) in blocks.get_mut(..2 * per_key)?.iter_mut().enumerate() {
        *block = derivation_data(algorithm, u8::from(i >= per_key), i % per_key)?;
        xor_into(block, &k1[..8]);
    }
    Some(blocks)
}

/// The KBEK and KBAK scheduled from their encrypted derivation blocks (KBEK's first).
fn tdes_keys_from_blocks(blocks: &[[u8; 8]]) -> Option<(TdesSchedule, TdesSchedule)> {
    let mut keys = Zeroizing::new([0u8; 48]);
    for (chunk, block) in keys.chunks_exact_mut(8).zip(blocks) {
        chunk.copy_from_slice(block);
    }
    let key_len = blocks.len() * 4;
    Some((TdesSchedule::new(&keys[..key_len])?, TdesSchedule::new(&keys[key_len..2 * key_len])?))
}

/// CMAC subkeys K1 and K2 of a TDES key from L = E(K, 0).
fn tdes_subkeys(l: &[u8; 8]) -> (Zeroizing<[u8; 8]>, Zeroizing<[u8; 8]>) {
    let mut k1 = Zeroizing::new(*l);
    double(&mut k1[..]);
    let mut k2 = k1.clone();
    double(&mut k2[..]);
    (k1, k2)
}

/// The block keys of two TDES KBPKs of one length, derived and used together: every block
/// encryption of one is paired with the same step of the other ([`TdesSchedule::encrypt_pair`]).
/// Gives exactly the keys, MACs and ciphertexts of two [`BlockKeys`].
pub(super) struct TdesBlockKeysPair {
    encryption: [TdesSchedule; 2],
    authentication: [TdesSchedule; 2],
    /// CMAC subkeys of the two KBAKs.
    k1: [Zeroizing<[u8; 8]>; 2],
    k2: [Zeroizing<[u8; 8]>; 2],
}

impl TdesBlockKeysPair {
    /// `None` unless both KBPKs are TDES of one algorithm (two-key or three-key).
    pub(super) fn derive(a: &SymmetricKey, b: &SymmetricKey) -> Option<Self> {
        let algorithm = a.algorithm();
        if !algorithm.is_tdes() || b.algorithm() != algorithm {
            return None;
        }
        let (kbpk_a, kbpk_b) = (TdesSchedule::new(a.expose_secret())?, TdesSchedule::new(b.expose_secret())?);
        // L = E(K, 0) of each key, the source of its CMAC subkeys: zeroized like them.
        let mut l = Zeroizing::new([[0u8; 8]; 2]);
        let [l_a, l_b] = &mut *l;
        kbpk_a.encrypt_pair(l_a, &kbpk_b, l_b);
        let (k1_a, _) = tdes_subkeys(l_a);
        let (k1_b, _) = tdes_subkeys(l_b);
        let used = 2 * algorithm.key_len() / 8;
        let mut blocks_a = tdes_derivation_blocks(algorithm, &k1_a[..])?;
        let mut blocks_b = tdes_derivation_blocks(algorithm, &k1_b[..])?;
        for (x, y) in blocks_a[..used].iter_mut().zip(blocks_b[..used].iter_mut()) {
            kbpk_a.encrypt_pair(x, &kbpk_b, y);
        }
        let (encryption_a, authentication_a) = tdes_keys_from_blocks(&blocks_a[..used])?;
        let (encryption_b, authentication_b) = tdes_keys_from_blocks(&blocks_b[..used])?;
        let [l_a, l_b] = &mut *l;
        *l_a = [0; 8];
        *l_b = [0; 8];
        authentication_a.encrypt_pair(l_a, &authentication_b, l_b);
        let ((k1_a, k2_a), (k1_b, k2_b)) = (tdes_subkeys(l_a), tdes_subkeys(l_b));
        Some(Self {
            encryption: [encryption_a, encryption_b],
            authentication: [authentication_a, authentication_b],
            k1: [k1_a, k1_b],
            k2: [k2_a, k2_b],
        })
    }

    /// The two CMACs, each under its own KBAK. The messages have one length (the caller checks:
    /// a difference panics).
    pub(super) fn tag(&self, messages: [&[u8]; 2]) -> [[u8; 8]; 2] {
        let [a, b] = messages;
        assert_eq!(a.len(), b.len(), "paired CMAC of messages of different lengths");
        // Every block but the last is chained as it is; the last gets K1 (complete) or the
        // 0x80 padding and K2.
        let before_last = a.len().saturating_sub(1) / 8;
        let mut state = [[0u8; 8]; 2];
        for i in 0..before_last {
            xor_into(&mut state[0], &a[8 * i..8 * i + 8]);
            xor_into(&mut state[1], &b[8 * i..8 * i + 8]);
            let [x, y] = &mut state;
            self.authentication[0].encrypt_pair(x, &self.authentication[1], y);
        }
        for (lane, message) in [a, b].into_iter().enumerate() {
            let rest = &message[8 * before_last..];
            let mut last = Zeroizing::new([0u8; 8]);
            last[..rest.len()].copy_from_slice(rest);
            if rest.len() == 8 {
                xor_into(&mut last[..], &self.k1[lane][..]);
            } else {
                last[rest.len()] = 0x80;
                xor_into(&mut last[..], &self.k2[lane][..]);
            }
            xor_into(&mut state[lane], &last[..]);
        }
        let [x, y] = &mut state;
        self.authentication[0].encrypt_pair(x, &self.authentication[1], y);
        state
    }

    /// CBC encryption in place of two payloads of one length (whole blocks), each under its own
    /// KBEK with its own IV (the caller checks the lengths: a difference panics).
    pub(super) fn cbc_encrypt(&self, ivs: [&[u8; 8]; 2], data: [&mut [u8]; 2]) {
        let [a, b] = data;
        assert!(a.len() == b.len() && a.len() % 8 == 0, "paired CBC of payloads of different lengths");
        let (mut chain_a, mut chain_b) = (*ivs[0], *ivs[1]);
        for (x, y) in a.chunks_exact_mut(8).zip(b.chunks_exact_mut(8)) {
            xor_into(&mut chain_a, x);
            xor_into(&mut chain_b, y);
            self.encryption[0].encrypt_pair(&mut chain_a, &self.encryption[1], &mut chain_b);
            x.copy_from_slice(&chain_a);
            y.copy_from_slice(&chain_b);
        }
    }
}

/// The KBEK and KBAK of the key variant binding method (versions A and C): the
/// KBPK with every byte XORed with `E` (0x45) and `M` (0x4D), and its MAC, TDES CBC-MAC
/// (ISO 9797-1 algorithm 1, zero IV) over the header text and the encrypted payload bytes,
/// truncated to four bytes.
pub(super) struct VariantKeys {
    pub(super) encryption: Cipher,
    authentication: Cipher,
}

impl VariantKeys {
    const ENCRYPTION_VARIANT: u8 = b'E';
    const AUTHENTICATION_VARIANT: u8 = b'M';

    pub(super) fn derive(kbpk: &SymmetricKey) -> Option<Self> {
        let variant = |mask: u8| -> Option<Cipher> {
            let mut key = Zeroizing::new([0u8; 24]);
            let len = kbpk.len();
            for (k, b) in key.iter_mut().zip(kbpk.expose_secret()) {
                *k = b ^ mask;
            }
            Cipher::new(kbpk.algorithm(), key.get(..len)?)
        };
        Some(Self {
            encryption: variant(Self::ENCRYPTION_VARIANT)?,
            authentication: variant(Self::AUTHENTICATION_VARIANT)?,
        })
    }

    /// CBC-MAC with a zero IV of the concatenation of `parts`, each a whole number of blocks.
    pub(super) fn tag(&self, parts: &[&[u8]]) -> [u8; 8] {
        let mut state = [0u8; 8];
        for part in parts {
            for block in part.chunks_exact(8) {
                xor_into(&mut state, block);
                self.authentication.encrypt(&mut state);
            }
        }
        state
    }
}

/// The version a KBPK algorithm can protect, for error messages and checks.
pub(super) fn kbpk_fits(version: Version, kbpk: &SymmetricKey) -> bool {
    match version {
        Version::A | Version::B | Version::C => kbpk.algorithm().is_tdes(),
        Version::D => kbpk.algorithm().is_aes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmac::Mac;

    #[test]
    fn cmac_agrees_with_the_cmac_crate_on_every_length() {
        let key = [0x2Bu8; 16];
        let message: Vec<u8> = (0u8..70).collect();
        let ours = Cmac::new(Cipher::new(KeyAlgorithm::Aes128, &key).expect("aes"));
        for len in 0..message.len() {
            let mut theirs = <cmac::Cmac<Aes128> as cmac::digest::KeyInit>::new_from_slice(&key).expect("key");
            theirs.update(&message[..len]);
            let expected = theirs.finalize().into_bytes();
            let (a, b) = message[..len].split_at(len / 3);
            assert_eq!(&ours.tag(&[a, b])[..16], expected.as_slice(), "length {len}");
        }
    }

    #[test]
    fn tdes_cmac_agrees_with_the_cmac_crate() {
        let key: Vec<u8> = (1u8..=24).collect();
        let ours = Cmac::new(Cipher::new(KeyAlgorithm::Tdes3, &key).expect("tdes"));
        for len in [0usize, 1, 7, 8, 9, 16, 23] {
            let message = vec![0xA5u8; len];
            let mut theirs = <cmac::Cmac<des::TdesEde3> as cmac::digest::KeyInit>::new_from_slice(&key).expect("key");
            theirs.update(&message);
            let expected = theirs.finalize().into_bytes();
            assert_eq!(&ours.tag(&[&message])[..8], expected.as_slice(), "length {len}");
        }
    }

    #[test]
    fn cbc_decrypt_inverts_cbc_encrypt() {
        let cipher = Cipher::new(KeyAlgorithm::Tdes2, &[7u8; 16]).expect("tdes");
        let mut data: Vec<u8> = (0u8..32).collect();
        cipher.cbc_encrypt(&[9u8; 8], &mut data);
        assert_ne!(data, (0u8..32).collect::<Vec<u8>>());
        cipher.cbc_decrypt(&[9u8; 8], &mut data);
        assert_eq!(data, (0u8..32).collect::<Vec<u8>>());
    }
}
