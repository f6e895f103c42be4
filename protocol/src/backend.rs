//! An RKI backend's identity and keys (`docs/PROTOCOL.md` §12.1).
//!
//! An organization's admin creates a backend credential with a *name* (1 to 64 of
//! `A-Z a-z 0-9 . _ -`). The gateway draws a [`BackendSecret`] of 32 random bytes and shows it once,
//! as 64 lower-case hex digits. Everything the backend needs follows from the secret, the
//! organization's slug and the name, by one-way, domain-separated derivations bound to both:
//!
//! ```text
//! MQTT user name = client id = "backend@" || org || "~" || name
//! MQTT password = lower-case hex(HMAC-SHA256(secret, "rki/v1 backend mqtt password" || org || 00 || name))
//! frame MAC key = HMAC-SHA256(secret, "rki/v1 backend mac key" || org || 00 || name)
//! ```
//!
//! The gateway therefore never needs the secret after it has shown it: it keeps the MAC key
//! (sealed under its master key) and a hash of the password. `~` and `@` are outside the name
//! alphabet, and `00` is not a name byte, so neither the client id nor the HMAC input is
//! ambiguous.
//!
//! Why `~` between the organization and the name: the identity must be one string that Mosquitto's
//! password file (`user:hash`, split at the first `:`), its ACL file (`user …`), its dynamic
//! security plugin and an MQTT client id all take as it is. `:` breaks the password file; `/`, `+`
//! and `#` are topic syntax (Mosquitto refuses `%u`/`%c` substitution for ids holding them);
//! `.`, `_` and `-` are name characters; a second `@` would read as an e-mail address. `~` is
//! printable ASCII, unreserved in URLs (RFC 3986), needs no quoting mid-word in a shell, and is
//! not a name character.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::frame::{MacKey, MAC_KEY_LEN};
use crate::message::Request;
use crate::secret::SecretBytes;
use crate::topic::{validate_name, NameError};

/// Length of a backend secret in bytes.
pub const BACKEND_SECRET_LEN: usize = 32;
/// The prefix of a backend's MQTT client id and user name.
pub const CLIENT_ID_PREFIX: &str = "backend@";
/// Between the organization and the name in a backend's client id (see the module's doc for why).
pub const CLIENT_ID_SEPARATOR: char = '~';
/// The label of [`BackendSecret::mqtt_password`]'s HMAC input.
pub const MQTT_PASSWORD_LABEL: &[u8] = b"rki/v1 backend mqtt password";
/// The label of [`BackendSecret::mac_key`]'s HMAC input.
pub const MAC_KEY_LABEL: &[u8] = b"rki/v1 backend mac key";

/// Events one `Answer::Events` announces at most: `last <= after + EVENTS_BATCH_MAX`, so that one
/// request never makes the gateway publish an unbounded backlog at once.
pub const EVENTS_BATCH_MAX: u64 = 1000;
/// The gateway keeps every event at least this long; older ones may be gone (`Answer::Gap`).
pub const EVENTS_RETAINED_DAYS_MIN: u64 = 7;
/// The gateway remembers the answer of a state-changing request at least this long, across
/// restarts and nodes; a backend retries well within it.
pub const REQUESTS_REMEMBERED_DAYS_MIN: u64 = 30;
/// The label of [`request_digest`].
pub const REQUEST_DIGEST_LABEL: &[u8] = b"rki/v1 backend request";

/// What the gateway remembers of a request beside its id, to tell a repeat (same digest: the
/// first answer again) from a reused id (another digest: `request_id_reused`):
/// `SHA-256("rki/v1 backend request" || postcard(request))`, over the canonical re-encoding, so
/// that two encodings of one request are the same request.
pub fn request_digest(request: &Request) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(REQUEST_DIGEST_LABEL);
    // Encoding a decoded request cannot fail: postcard fails only on unsupported types.
    hash.update(postcard::to_stdvec(request).unwrap_or_default());
    hash.finalize().into()
}

/// Why a backend client id or secret does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendIdError {
    #[error("a backend client id is backend@{{org}}~{{name}}")]
    NotBackend,
    #[error("organization: {0}")]
    Org(NameError),
    #[error("backend name: {0}")]
    Name(NameError),
    #[error("a backend secret is {} hex digits", BACKEND_SECRET_LEN * 2)]
    BadSecret,
}

/// The `{org}` and `{name}` of a backend's client id `backend@{org}~{name}`, both checked names,
/// borrowed: what a broker's access check needs on every message, without allocating.
pub fn client_id_parts(client_id: &str) -> Result<(&str, &str), BackendIdError> {
    let rest = client_id.strip_prefix(CLIENT_ID_PREFIX).ok_or(BackendIdError::NotBackend)?;
    let (org, name) = rest.split_once(CLIENT_ID_SEPARATOR).ok_or(BackendIdError::NotBackend)?;
    validate_name(org).map_err(BackendIdError::Org)?;
    validate_name(name).map_err(BackendIdError::Name)?;
    Ok((org, name))
}

/// A backend identity: the organization's slug and the credential's name, both valid names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    org: String,
    name: String,
}

impl BackendId {
    pub fn new(org: &str, name: &str) -> Result<Self, BackendIdError> {
        validate_name(org).map_err(BackendIdError::Org)?;
        validate_name(name).map_err(BackendIdError::Name)?;
        Ok(Self { org: org.to_string(), name: name.to_string() })
    }

    /// Parses `backend@{org}~{name}`, the MQTT client id and user name of a backend.
    pub fn parse_client_id(client_id: &str) -> Result<Self, BackendIdError> {
        let (org, name) = client_id_parts(client_id)?;
        Self::new(org, name)
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `backend@{org}~{name}`: both the MQTT client id and the user name.
    pub fn client_id(&self) -> String {
        format!("{CLIENT_ID_PREFIX}{}{CLIENT_ID_SEPARATOR}{}", self.org, self.name)
    }

    /// The HMAC input after a label: `org || 00 || name`.
    fn binding(&self) -> Vec<u8> {
        [self.org.as_bytes(), &[0], self.name.as_bytes()].concat()
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.client_id())
    }
}

/// The 32-byte secret of a backend credential, shown once. Zeroized on drop, redacted in
/// `Debug`, compared in constant time.
#[derive(PartialEq, Eq)]
pub struct BackendSecret(SecretBytes);

impl BackendSecret {
    pub fn random() -> Result<Self, getrandom::Error> {
        Ok(Self(SecretBytes::random(BACKEND_SECRET_LEN)?))
    }

    pub fn from_secret(secret: SecretBytes) -> Result<Self, BackendIdError> {
        if secret.len() != BACKEND_SECRET_LEN {
            return Err(BackendIdError::BadSecret);
        }
        Ok(Self(secret))
    }

    /// Parses the text form: 64 hex digits, either case, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<Self, BackendIdError> {
        let text = text.trim();
        if text.len() != BACKEND_SECRET_LEN * 2 {
            return Err(BackendIdError::BadSecret);
        }
        SecretBytes::from_hex(text).map(Self).map_err(|_| BackendIdError::BadSecret)
    }

    /// The text form, to show once to the admin who created the credential: 64 lower-case hex
    /// digits.
    pub fn expose_text(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.to_hex_upper().to_ascii_lowercase())
    }

    fn derive(&self, label: &[u8], id: &BackendId) -> SecretBytes {
        // The secret is the HMAC key; MacKey::new takes exactly 32 bytes, which it has.
        let key = match MacKey::new(self.0.clone_secret()) {
            Ok(key) => key,
            Err(_) => return SecretBytes::zeroed(0),
        };
        let tag = Zeroizing::new(key.tag(&[label, &id.binding()]));
        SecretBytes::from_slice(tag.as_slice())
    }

    /// The MQTT password of the identity `id`: 64 lower-case hex digits (ASCII).
    pub fn mqtt_password(&self, id: &BackendId) -> SecretBytes {
        let raw = self.derive(MQTT_PASSWORD_LABEL, id);
        let text = Zeroizing::new(raw.to_hex_upper().to_ascii_lowercase());
        SecretBytes::from_slice(text.as_bytes())
    }

    /// The HMAC-SHA256 key of every frame between the backend `id` and the gateway, both ways.
    pub fn mac_key(&self, id: &BackendId) -> MacKey {
        let raw = self.derive(MAC_KEY_LABEL, id);
        debug_assert_eq!(raw.len(), MAC_KEY_LEN);
        MacKey::new(raw).unwrap_or_else(|_| MacKey::public_refusal_key())
    }
}

impl fmt::Debug for BackendSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendSecret([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn id(org: &str, name: &str) -> BackendId {
        BackendId::new(org, name).expect("valid names")
    }

    #[test]
    fn a_client_id_round_trips_and_parses_unambiguously() {
        let acme = id("acme", "erp-1.prod");
        assert_eq!(acme.client_id(), "backend@acme~erp-1.prod");
        assert_eq!(acme.to_string(), acme.client_id());
        assert!(!acme.client_id().contains(':'), "Mosquitto's password file splits a line at ':'");
        assert_eq!(BackendId::parse_client_id(&acme.client_id()), Ok(acme));
        let cases = [
            ("acme", BackendIdError::NotBackend),
            ("init@SN1", BackendIdError::NotBackend),
            ("backend@acme", BackendIdError::NotBackend),
            ("backend@acme:erp", BackendIdError::NotBackend),
            ("backend@:erp", BackendIdError::NotBackend),
            ("backend@~erp", BackendIdError::Org(NameError::Empty)),
            ("backend@acme~", BackendIdError::Name(NameError::Empty)),
            ("backend@acme~erp~2", BackendIdError::Name(NameError::BadCharacter)),
            ("backend@acme~erp:2", BackendIdError::Name(NameError::BadCharacter)),
            ("backend@ac/me~erp", BackendIdError::Org(NameError::BadCharacter)),
            ("backend@acme~+", BackendIdError::Name(NameError::BadCharacter)),
            ("Backend@acme~erp", BackendIdError::NotBackend),
        ];
        for (text, error) in cases {
            assert_eq!(BackendId::parse_client_id(text), Err(error), "{text}");
        }
        let long = "n".repeat(65);
        assert_eq!(BackendId::new("acme", &long), Err(BackendIdError::Name(NameError::TooLong)));
    }

    #[test]
    fn the_secret_text_round_trips_in_lower_case() {
        let secret = BackendSecret::parse(SECRET).expect("secret");
        assert_eq!(secret.expose_text().as_str(), SECRET);
        assert_eq!(BackendSecret::parse(&format!(" {} \n", SECRET.to_uppercase())), Ok(secret));
        for bad in ["", "00", &SECRET[..63], &format!("{SECRET}00"), &SECRET.replace('0', "g")] {
            assert_eq!(BackendSecret::parse(bad), Err(BackendIdError::BadSecret), "{bad}");
        }
        assert!(BackendSecret::from_secret(SecretBytes::zeroed(16)).is_err());
        let random = BackendSecret::random().expect("random");
        assert_ne!(random, BackendSecret::random().expect("random"));
        assert_eq!(random.expose_text().len(), 64);
    }

    #[test]
    fn a_repeated_request_has_the_same_digest_and_another_request_another() {
        use crate::message::{TaskOrder, TaskTarget};
        use crate::terminal::KeySlot;
        let order = |slot| TaskOrder {
            target: TaskTarget::Devices(vec!["SN1".into()]),
            key_source: String::new(),
            slot: KeySlot(slot),
            expiry_days: 0,
        };
        let digest = request_digest(&Request::CreateTask(order(1)));
        assert_eq!(digest, request_digest(&Request::CreateTask(order(1))));
        assert_ne!(digest, request_digest(&Request::CreateTask(order(4))));
        assert_ne!(digest, request_digest(&Request::Preview(order(1))));
    }

    #[test]
    fn debug_of_a_secret_shows_no_key_bytes() {
        let secret = BackendSecret::parse(SECRET).expect("secret");
        let shown = format!("{secret:?}");
        assert!(shown.contains("REDACTED") && !shown.contains("0001") && !shown.contains("1e1f"), "{shown}");
        let key = secret.mac_key(&id("acme", "erp"));
        let hex_key = hex::encode(key.expose_secret());
        assert!(!format!("{key:?}").contains(&hex_key[..8]));
    }

    #[test]
    fn derivations_are_bound_to_the_label_the_org_and_the_name() {
        let secret = BackendSecret::parse(SECRET).expect("secret");
        let acme = id("acme", "erp");
        let password = secret.mqtt_password(&acme);
        assert_eq!(password.len(), 64);
        assert!(password.expose_secret().iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
        let mac = secret.mac_key(&acme);
        assert_ne!(hex::encode(mac.expose_secret()).as_bytes(), password.expose_secret(), "domain separated");
        // "ab" + "c" and "a" + "bc" differ thanks to the 00 separator.
        let (left, right) = (id("ab", "c"), id("a", "bc"));
        assert_ne!(secret.mac_key(&left), secret.mac_key(&right));
        assert_ne!(secret.mqtt_password(&left), secret.mqtt_password(&right));
        assert_ne!(secret.mac_key(&acme), secret.mac_key(&id("acme", "erp2")));
        assert_ne!(secret.mac_key(&acme), secret.mac_key(&id("acme2", "erp")));
        let other = BackendSecret::random().expect("random");
        assert_ne!(other.mac_key(&acme), mac);
        assert_eq!(secret.mac_key(&acme), mac, "deterministic");
        assert_eq!(secret.mqtt_password(&acme), password, "deterministic");
    }
}
