//! Single-block TDES and DES primitives over [`SymmetricKey`], used by KCV, DUKPT and TR-31.
//!
//! The TDES functions refuse a key that is not TDES with [`TdesError`], in every build: an AES key
//! handed here by mistake must never leave the block untouched and let the caller read plaintext
//! as if it were ciphertext (a KCV of zeros, an IPEK half equal to the KSN).

use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use des::{Des, TdesEde2, TdesEde3};

use crate::keys::{KeyAlgorithm, SymmetricKey};

/// Why a TDES block operation was refused. The block is left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TdesError {
    #[error("a TDES block operation needs a two- or three-key TDES key, got {0}")]
    NotTdes(KeyAlgorithm),
}

/// A scheduled two- or three-key TDES (EDE) cipher.
enum Tdes {
    Two(TdesEde2),
    Three(TdesEde3),
}

impl Tdes {
    fn new(key: &SymmetricKey) -> Result<Self, TdesError> {
        let refused = TdesError::NotTdes(key.algorithm());
        match key.algorithm() {
            KeyAlgorithm::Tdes2 => TdesEde2::new_from_slice(key.expose_secret()).map(Tdes::Two).map_err(|_| refused),
            KeyAlgorithm::Tdes3 => TdesEde3::new_from_slice(key.expose_secret()).map(Tdes::Three).map_err(|_| refused),
            KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => Err(refused),
        }
    }
}

/// Encrypts one 8-byte block in place with a two- or three-key TDES key (EDE). Any other key is
/// refused and the block left unchanged.
pub fn encrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) -> Result<(), TdesError> {
    let b = GenericArray::from_mut_slice(block);
    match Tdes::new(key)? {
        Tdes::Two(c) => c.encrypt_block(b),
        Tdes::Three(c) => c.encrypt_block(b),
    }
    Ok(())
}

/// Decrypts one 8-byte block in place with a two- or three-key TDES key (EDE). Any other key is
/// refused and the block left unchanged.
pub fn decrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) -> Result<(), TdesError> {
    let b = GenericArray::from_mut_slice(block);
    match Tdes::new(key)? {
        Tdes::Two(c) => c.decrypt_block(b),
        Tdes::Three(c) => c.decrypt_block(b),
    }
    Ok(())
}

/// Single DES encryption of one block with an 8-byte key (DUKPT's non-reversible key generation).
pub fn des_encrypt_block(key: &[u8; 8], block: &mut [u8; 8]) {
    let cipher = Des::new(GenericArray::from_slice(key));
    cipher.encrypt_block(GenericArray::from_mut_slice(block));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretBytes;

    #[test]
    fn an_aes_key_is_refused_and_the_block_left_unchanged() {
        let aes = SymmetricKey::aes(SecretBytes::from_slice(&[7; 16])).expect("aes");
        let mut block = [1u8; 8];
        assert_eq!(encrypt_block(&aes, &mut block), Err(TdesError::NotTdes(KeyAlgorithm::Aes128)));
        assert_eq!(decrypt_block(&aes, &mut block), Err(TdesError::NotTdes(KeyAlgorithm::Aes128)));
        assert_eq!(block, [1u8; 8]);
    }

    #[test]
    fn decrypt_inverts_encrypt_for_two_and_three_key_tdes() {
        for len in [16usize, 24] {
            let key = SymmetricKey::tdes(SecretBytes::from_vec((1..=len as u8).collect())).expect("tdes");
            let mut block = *b"RKI TDES";
            encrypt_block(&key, &mut block).expect("encrypt");
            assert_ne!(&block, b"RKI TDES");
            decrypt_block(&key, &mut block).expect("decrypt");
            assert_eq!(&block, b"RKI TDES");
        }
    }
}
