//! Single-block TDES and DES primitives over [`SymmetricKey`], used by KCV, DUKPT and TR-31.

use des::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use des::{Des, TdesEde2, TdesEde3};

use crate::keys::{KeyAlgorithm, SymmetricKey};

/// Encrypts one 8-byte block in place with a two- or three-key TDES key (EDE).
/// An AES key leaves the block unchanged; callers hold a TDES key by construction.
pub fn encrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) {
    let b = des::cipher::generic_array::GenericArray::from_mut_slice(block);
    match key.algorithm() {
        KeyAlgorithm::Tdes2 => {
            if let Ok(c) = TdesEde2::new_from_slice(key.expose_secret()) {
                c.encrypt_block(b)
            }
        }
        KeyAlgorithm::Tdes3 => {
            if let Ok(c) = TdesEde3::new_from_slice(key.expose_secret()) {
                c.encrypt_block(b)
            }
        }
        _ => debug_assert!(false, "encrypt_block needs a TDES key"),
    }
}

/// Decrypts one 8-byte block in place with a two- or three-key TDES key (EDE).
pub fn decrypt_block(key: &SymmetricKey, block: &mut [u8; 8]) {
    let b = des::cipher::generic_array::GenericArray::from_mut_slice(block);
    match key.algorithm() {
        KeyAlgorithm::Tdes2 => {
            if let Ok(c) = TdesEde2::new_from_slice(key.expose_secret()) {
                c.decrypt_block(b)
            }
        }
        KeyAlgorithm::Tdes3 => {
            if let Ok(c) = TdesEde3::new_from_slice(key.expose_secret()) {
                c.decrypt_block(b)
            }
        }
        _ => debug_assert!(false, "decrypt_block needs a TDES key"),
    }
}

/// Single DES encryption of one block with an 8-byte key (DUKPT's non-reversible key generation).
pub fn des_encrypt_block(key: &[u8; 8], block: &mut [u8; 8]) {
    let cipher = Des::new(des::cipher::generic_array::GenericArray::from_slice(key));
    cipher.encrypt_block(des::cipher::generic_array::GenericArray::from_mut_slice(block));
}
