//! Device initialisation crypto: the GUDID and the authenticated X25519 key agreement that gives a
//! terminal its secrets without any secret crossing the wire.
//!
//! 1. An operator provisions a [`Gudid`] (128 random bits) for one SN. The gateway keeps only
//!    [`Gudid::id`] (to find it) and [`Gudid::mac_key`] (to check tags), both one-way hashes.
//! 2. The terminal sends `CreateKey { gudid_id, x_pos_device_id, device_public }` tagged under the
//!    GUDID's MAC key. The gateway answers `CreateKeyAnswer { gudid_id, request_counter,
//!    gateway_public }`, tagged under the same key; `request_counter` names the CreateKey answered,
//!    whose ephemeral key and body the terminal then derives with.
//! 3. Both sides compute the X25519 shared secret and run HKDF-SHA256 with the GUDID MAC key as
//!    salt and a hash of both exact body encodings (the transcript) in every `info`, giving the
//!    [`DeviceSecrets`].
//!
//! A passive observer who knows the GUDID (the technician who typed it) sees both public keys but
//! neither private key, so cannot compute the shared secret, hence none of the device secrets.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::frame::{MacKey, MAC_KEY_LEN};
use crate::keys::{KeyAlgorithm, SymmetricKey};
use crate::secret::SecretBytes;

/// GUDID length in bytes (128 bits).
pub const GUDID_LEN: usize = 16;
/// The label of [`Gudid::bootstrap_password`]'s HMAC input, before the SN.
pub const BOOTSTRAP_PASSWORD_LABEL: &[u8] = b"rki/v1 bootstrap password";
/// A GUDID is valid for 72 hours after provisioning.
pub const GUDID_VALIDITY_SECONDS: u64 = 72 * 3600;

/// A globally unique device ID: single-use, shown once to the operator, typed by the technician.
/// Text form: 32 upper-case hex digits in four dash-separated groups of eight.
pub struct Gudid(SecretBytes);

impl Gudid {
    pub fn random() -> Result<Self, getrandom::Error> {
        Ok(Self(SecretBytes::random(GUDID_LEN)?))
    }

    /// Parses the text form; dashes, spaces and case are ignored.
    pub fn parse(text: &str) -> Result<Self, InitError> {
        let digits: Zeroizing<String> = Zeroizing::new(text.chars().filter(|c| !matches!(c, '-' | ' ')).collect());
        if digits.len() != GUDID_LEN * 2 {
            return Err(InitError::BadGudid);
        }
        let bytes = SecretBytes::from_hex(&digits).map_err(|_| InitError::BadGudid)?;
        Ok(Self(bytes))
    }

    /// The text form, to show once to the operator who provisioned it.
    pub fn expose_text(&self) -> Zeroizing<String> {
        let hex = self.0.to_hex_upper();
        Zeroizing::new(format!("{}-{}-{}-{}", &hex[0..8], &hex[8..16], &hex[16..24], &hex[24..32]))
    }

    /// Public name of the GUDID: `SHA-256("rki/v1 gudid id" || gudid)`.
    pub fn id(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"rki/v1 gudid id");
        hash.update(self.0.expose_secret());
        hash.finalize().into()
    }

    /// The MQTT password of the bootstrap identity `init@{SN}`, which proves at CONNECT that the
    /// terminal holds a live GUDID for that SN: `HMAC-SHA256(key = GUDID, "rki/v1 bootstrap
    /// password" || SN)` as 64 upper-case hex digits (ASCII). The gateway stores only a salted
    /// one-way hash of it, so neither the store nor the GUDID's two public hashes yield it.
    pub fn bootstrap_password(&self, sn: &str) -> SecretBytes {
        type HmacSha256 = Hmac<Sha256>;
        // HMAC takes a key of any length; a 16-byte GUDID never fails.
        let mut mac = match <HmacSha256 as Mac>::new_from_slice(self.0.expose_secret()) {
            Ok(mac) => mac,
            Err(_) => return SecretBytes::zeroed(0),
        };
        mac.update(BOOTSTRAP_PASSWORD_LABEL);
        mac.update(sn.as_bytes());
        let tag = Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()));
        SecretBytes::from_vec(SecretBytes::from_slice(tag.as_slice()).to_hex_upper().as_bytes().to_vec())
    }

    /// The key CreateKey and its answer are tagged under: `SHA-256("rki/v1 gudid mac" || gudid)`.
    pub fn mac_key(&self) -> MacKey {
        let mut hash = Sha256::new();
        hash.update(b"rki/v1 gudid mac");
        hash.update(self.0.expose_secret());
        let digest = Zeroizing::new(<[u8; 32]>::from(hash.finalize()));
        MacKey::new(SecretBytes::from_slice(digest.as_slice())).unwrap_or_else(|_| unreachable_key())
    }
}

// MacKey::new only fails on a length other than 32, and SHA-256 gives 32 bytes.
fn unreachable_key() -> MacKey {
    MacKey::public_refusal_key()
}

impl fmt::Debug for Gudid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gudid([REDACTED])")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("a GUDID is 32 hex digits")]
    BadGudid,
    #[error("the peer's public key gives a non-contributory (low-order) shared secret")]
    NonContributory,
    #[error("no randomness available from the operating system")]
    Random,
}

/// One side's ephemeral X25519 key pair, used for exactly one initialisation.
pub struct Ephemeral {
    secret: StaticSecret,
}

impl Ephemeral {
    pub fn random() -> Result<Self, InitError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(bytes.as_mut()).map_err(|_| InitError::Random)?;
        Ok(Self { secret: StaticSecret::from(*bytes) })
    }

    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }
}

impl fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ephemeral(public: {})", hex::encode_upper(self.public()))
    }
}

/// The secrets a device holds after initialisation, and the gateway holds for it.
#[derive(Debug)]
pub struct DeviceSecrets {
    /// HMAC-SHA256 key of every later message, both directions.
    pub signing_key: MacKey,
    /// AES-256 key-block protection key, for TR-31 version D blocks.
    pub kbpk_aes: SymmetricKey,
    /// Three-key TDES key-block protection key, for TR-31 version B blocks.
    pub kbpk_tdes: SymmetricKey,
    /// The device's MQTT password: 64 upper-case hex characters.
    pub mqtt_password: SecretBytes,
}

impl DeviceSecrets {
    /// The key-block protection key for a wrapped key of `algorithm`: version D (AES KBPK) for
    /// AES keys, version B (TDES KBPK) for TDES keys.
    pub fn kbpk_for(&self, algorithm: KeyAlgorithm) -> &SymmetricKey {
        if algorithm.is_aes() {
            &self.kbpk_aes
        } else {
            &self.kbpk_tdes
        }
    }
}

/// Hash of the exact CreateKey and CreateKeyAnswer body encodings, length-prefixed.
pub fn transcript_hash(create_key_body: &[u8], answer_body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"rki/v1 init transcript");
    hash.update((create_key_body.len() as u32).to_be_bytes());
    hash.update(create_key_body);
    hash.update((answer_body.len() as u32).to_be_bytes());
    hash.update(answer_body);
    hash.finalize().into()
}

/// Both sides call this with their own ephemeral secret and the peer's public key.
pub fn derive_device_secrets(
    own: Ephemeral,
    peer_public: &[u8; 32],
    gudid_mac_key: &MacKey,
    create_key_body: &[u8],
    answer_body: &[u8],
) -> Result<DeviceSecrets, InitError> {
    let shared = own.secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(InitError::NonContributory);
    }
    let transcript = transcript_hash(create_key_body, answer_body);
    let hkdf = Hkdf::<Sha256>::new(Some(gudid_mac_key.expose_secret()), shared.as_bytes());
    let expand = |label: &[u8], len: usize| -> SecretBytes {
        let mut out = SecretBytes::zeroed(len);
        let info = [label, &transcript[..]].concat();
        // Expand fails only for outputs longer than 255 hash lengths; ours are at most 32 bytes.
        let _ = hkdf.expand(&info, out.expose_secret_mut());
        out
    };
    let signing_key =
        MacKey::new(expand(b"rki/v1 device signing key", MAC_KEY_LEN)).map_err(|_| InitError::NonContributory)?;
    let kbpk_aes = SymmetricKey::new(KeyAlgorithm::Aes256, expand(b"rki/v1 kbpk aes256", 32))
        .map_err(|_| InitError::NonContributory)?;
    let kbpk_tdes = SymmetricKey::new(KeyAlgorithm::Tdes3, expand(b"rki/v1 kbpk tdes3", 24))
        .map_err(|_| InitError::NonContributory)?;
    let raw = expand(b"rki/v1 mqtt password", 32);
    let mqtt_password = SecretBytes::from_vec(raw.to_hex_upper().as_bytes().to_vec());
    Ok(DeviceSecrets { signing_key, kbpk_aes, kbpk_tdes, mqtt_password })
}

/// SHA-256 of an MQTT password: what the gateway stores to check CONNECT.
pub fn password_hash(password: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"rki/v1 mqtt password");
    hash.update(password);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_secrets() {
        let gudid = Gudid::random().expect("gudid");
        let device = Ephemeral::random().expect("device");
        let gateway = Ephemeral::random().expect("gateway");
        let (dp, gp) = (device.public(), gateway.public());
        let d = derive_device_secrets(device, &gp, &gudid.mac_key(), b"req", b"ans").expect("d");
        let g = derive_device_secrets(gateway, &dp, &gudid.mac_key(), b"req", b"ans").expect("g");
        assert_eq!(d.signing_key, g.signing_key);
        assert_eq!(d.kbpk_aes, g.kbpk_aes);
        assert_eq!(d.kbpk_tdes, g.kbpk_tdes);
        assert_eq!(d.mqtt_password, g.mqtt_password);
        assert_ne!(d.signing_key.expose_secret(), d.kbpk_aes.expose_secret());
    }

    #[test]
    fn a_different_transcript_gives_different_secrets() {
        let gudid = Gudid::random().expect("gudid");
        let device = Ephemeral::random().expect("device");
        let gateway = Ephemeral::random().expect("gateway");
        let gp = gateway.public();
        let dp = device.public();
        let d = derive_device_secrets(device, &gp, &gudid.mac_key(), b"req", b"ans").expect("d");
        let g = derive_device_secrets(gateway, &dp, &gudid.mac_key(), b"req", b"tampered").expect("g");
        assert_ne!(d.signing_key, g.signing_key);
    }

    #[test]
    fn gudid_text_round_trips_and_bad_text_is_refused() {
        let gudid = Gudid::random().expect("gudid");
        let text = gudid.expose_text();
        assert_eq!(text.len(), 35);
        let again = Gudid::parse(&text.to_lowercase()).expect("parse");
        assert_eq!(again.id(), gudid.id());
        assert!(Gudid::parse("1234").is_err());
        assert!(Gudid::parse(&"Z".repeat(32)).is_err());
        assert!(!format!("{gudid:?}").contains(&text[..8]));
    }

    #[test]
    fn the_bootstrap_password_depends_on_the_gudid_and_the_sn() {
        let gudid = Gudid::parse("0F1E2D3C-4B5A6978-8796A5B4-C3D2E1F0").expect("gudid");
        let password = gudid.bootstrap_password("SN1");
        assert_eq!(password.expose_secret().len(), 64);
        assert!(password.expose_secret().iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()));
        assert_ne!(password, gudid.bootstrap_password("SN2"));
        assert_ne!(password, Gudid::random().expect("gudid").bootstrap_password("SN1"));
        assert_eq!(password, gudid.bootstrap_password("SN1"), "deterministic");
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let gudid = Gudid::random().expect("gudid");
        let own = Ephemeral::random().expect("own");
        let zero = [0u8; 32];
        assert_eq!(
            derive_device_secrets(own, &zero, &gudid.mac_key(), b"", b"").err(),
            Some(InitError::NonContributory)
        );
    }
}
