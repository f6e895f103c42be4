//! Single-block TDES and DES primitives over [`SymmetricKey`], used by KCV, DUKPT and TR-31.
//!
//! The TDES functions refuse a key that is not TDES with [`TdesError`], in every build: an AES key
//! handed here by mistake must never leave the block untouched and let the caller read plaintext
//! as if it were ciphertext (a KCV of zeros, an IPEK half equal to the KSN).

use crate::des_core::{DesSchedule, TdesSchedule};
use crate::keys::{KeyAlgorithm, SymmetricKey};

/// Why a TDES block operation was refused. The block is left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TdesError {
    #[error("a TDES block operation needs a two- or three-key TDES key, got {0}")]
    NotTdes(KeyAlgorithm),
}

/// Schedules a two- or three-key TDES (EDE) key; any other key is refused.
fn schedule(key: &SymmetricKey) -> Result<TdesSchedule, TdesError> {
    let refused = TdesError::NotTdes(key.algorithm());
    match key.algorithm() {
        KeyAlgorithm::Tdes2 | KeyAlgorithm::Tdes3 => TdesSchedule::new(key.expose_secret()).ok_or(refused),
        KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => Err(refused),
    }
}

/// Encrypts one 8-byte block in place with a two- or three-key TDES key (EDE). Any other key is
/// refused and the block left unchanged.
pub fn encrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) -> Result<(), TdesError> {
    schedule(key)?.encrypt(block);
    Ok(())
}

/// Decrypts one 8-byte block in place with a two- or three-key TDES key (EDE). Any other key is
/// refused and the block left unchanged.
pub fn decrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) -> Result<(), TdesError> {
    schedule(key)?.decrypt(block);
    Ok(())
}

/// Single DES encryption of one block with an 8-byte key (DUKPT's non-reversible key generation).
pub fn des_encrypt_block(key: &[u8; 8], block: &mut [u8; 8]) {
    DesSchedule::new(key).encrypt(block);
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
