//! The signed envelope around every message.
//!
//! On the wire a frame is the postcard encoding of
//! `{ version: u8, body: bytes (varint length + bytes), tag: [u8; 32] }` where `body` is the postcard
//! encoding of a [`Body`] and `tag = HMAC-SHA256(key, [version] || body)` (RFC 2104), computed over
//! the exact body bytes received, never over a re-encoding.
//!
//! Receiving is two steps, so that nothing unverified can be acted on:
//! 1. [`open`] checks the size, the version, and decodes and validates the body. The result,
//!    [`Unverified`], lets the receiver read the party and counter to find the key, nothing more.
//! 2. [`Unverified::verify`] checks the tag in constant time and yields a [`Verified`] body, which
//!    holds a [`MacVerified`] proof that only this module can create.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::message::{Body, InvalidBody};
use crate::secret::{ct_eq, SecretBytes};

/// The only frame version this crate speaks.
pub const FRAME_VERSION: u8 = 1;
/// Largest frame accepted or produced. A hello with 16 slots or a download with an AES-256 key
/// block is well under 1 KiB; the limit leaves room and bounds the decoder's work.
pub const FRAME_LEN_MAX: usize = 4096;
/// Largest frame on the backend channel (`docs/PROTOCOL.md` §12): a request naming 1000 SNs of 64
/// characters, or a preview listing 1000 not-ready devices with every reason, is about 75 KiB;
/// the limit leaves room and still bounds the decoder's work. Device frames keep
/// [`FRAME_LEN_MAX`].
pub const BACKEND_FRAME_LEN_MAX: usize = 128 * 1024;
/// HMAC-SHA256 tag length.
pub const TAG_LEN: usize = 32;
/// Length of every HMAC key used on the wire.
pub const MAC_KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// An HMAC-SHA256 key of 32 bytes: a device signing key, a GUDID's MAC key, or a backend key.
#[derive(Debug, PartialEq, Eq)]
pub struct MacKey(SecretBytes);

impl MacKey {
    pub fn new(secret: SecretBytes) -> Result<Self, FrameError> {
        if secret.len() != MAC_KEY_LEN {
            return Err(FrameError::KeyLength(secret.len()));
        }
        Ok(Self(secret))
    }

    pub fn random() -> Result<Self, getrandom::Error> {
        Ok(Self(SecretBytes::random(MAC_KEY_LEN)?))
    }

    /// The key under which [`crate::message::Refusal`]s are tagged when the receiver shares no
    /// key with the gateway. It is public (SHA-256 of a fixed label): such a tag proves nothing,
    /// and a refusal changes no state.
    pub fn public_refusal_key() -> Self {
        let digest = Sha256::digest(b"rki/v1 public refusal key");
        Self(SecretBytes::from_slice(&digest))
    }

    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    pub fn clone_secret(&self) -> Self {
        Self(self.0.clone_secret())
    }

    /// HMAC-SHA256 of `parts`, concatenated.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = match <HmacSha256 as Mac>::new_from_slice(self.0.expose_secret()) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; this arm cannot run.
            Err(_) => return [0u8; TAG_LEN],
        };
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// Why a frame was refused. Each variant is a metrics label ([`FrameError::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds its channel's limit ({FRAME_LEN_MAX} or {BACKEND_FRAME_LEN_MAX} bytes)")]
    Oversized(usize),
    #[error("frame is not valid postcard or has trailing bytes")]
    Malformed,
    #[error("unknown frame version {0}")]
    UnknownVersion(u8),
    #[error("body is not a valid message")]
    BadBody,
    #[error("invalid body: {0}")]
    InvalidBody(InvalidBody),
    #[error("tag does not verify")]
    BadTag,
    #[error("a MAC key must be {MAC_KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
}

impl FrameError {
    /// A stable, low-cardinality label.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Oversized(_) => "oversized",
            FrameError::Malformed => "malformed",
            FrameError::UnknownVersion(_) => "unknown_version",
            FrameError::BadBody => "malformed",
            FrameError::InvalidBody(_) => "invalid_body",
            FrameError::BadTag => "bad_mac",
            FrameError::KeyLength(_) => "bad_key",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WireFrame<'a> {
    version: u8,
    #[serde(borrow)]
    body: &'a [u8],
    tag: [u8; TAG_LEN],
}

/// The frame limit of a body's channel: [`BACKEND_FRAME_LEN_MAX`] for the backend messages,
/// [`FRAME_LEN_MAX`] for every other.
pub fn frame_len_max(body: &Body) -> usize {
    if body.message.kind().is_backend() {
        BACKEND_FRAME_LEN_MAX
    } else {
        FRAME_LEN_MAX
    }
}

/// Encodes `body` and tags it under `key`. The frame must fit its channel's limit
/// ([`frame_len_max`]).
pub fn seal(key: &MacKey, body: &Body) -> Result<Vec<u8>, FrameError> {
    let body_bytes = postcard::to_stdvec(body).map_err(|_| FrameError::Malformed)?;
    let tag = key.tag(&[&[FRAME_VERSION], &body_bytes]);
    let frame = WireFrame { version: FRAME_VERSION, body: &body_bytes, tag };
    let bytes = postcard::to_stdvec(&frame).map_err(|_| FrameError::Malformed)?;
    if bytes.len() > frame_len_max(body) {
        return Err(FrameError::Oversized(bytes.len()));
    }
    Ok(bytes)
}

/// A frame that decoded and validated, whose tag is not yet checked. Read the party and the
/// counter to find the key; act on nothing else.
#[derive(Debug)]
pub struct Unverified<'a> {
    body_bytes: &'a [u8],
    tag: [u8; TAG_LEN],
    body: Body,
}

/// Proof that a tag verified. Only [`Unverified::verify`] creates one.
#[derive(Debug, Clone, Copy)]
pub struct MacVerified(());

/// A body whose tag verified under the key the receiver chose.
#[derive(Debug)]
pub struct Verified {
    pub body: Body,
    pub proof: MacVerified,
}

/// Decodes a frame from a device's topics: size (at most [`FRAME_LEN_MAX`]), structure,
/// version, then the body, then the body's limits.
pub fn open(bytes: &[u8]) -> Result<Unverified<'_>, FrameError> {
    open_within(bytes, FRAME_LEN_MAX)
}

/// [`open`] for the backend channel, whose frames may reach [`BACKEND_FRAME_LEN_MAX`]. The
/// receiver still checks that the message is one its topic carries.
pub fn open_backend(bytes: &[u8]) -> Result<Unverified<'_>, FrameError> {
    open_within(bytes, BACKEND_FRAME_LEN_MAX)
}

fn open_within(bytes: &[u8], len_max: usize) -> Result<Unverified<'_>, FrameError> {
    if bytes.len() > len_max {
        return Err(FrameError::Oversized(bytes.len()));
    }
    let (frame, rest): (WireFrame<'_>, &[u8]) = postcard::take_from_bytes(bytes).map_err(|_| FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed);
    }
    if frame.version != FRAME_VERSION {
        return Err(FrameError::UnknownVersion(frame.version));
    }
    let (body, rest): (Body, &[u8]) = postcard::take_from_bytes(frame.body).map_err(|_| FrameError::BadBody)?;
    if !rest.is_empty() {
        return Err(FrameError::BadBody);
    }
    body.validate().map_err(FrameError::InvalidBody)?;
    Ok(Unverified { body_bytes: frame.body, tag: frame.tag, body })
}

impl<'a> Unverified<'a> {
    /// The decoded body, for choosing the key. Not authenticated.
    pub fn peek(&self) -> &Body {
        &self.body
    }

    /// The exact body bytes the tag covers (the key-agreement transcript uses them).
    pub fn body_bytes(&self) -> &'a [u8] {
        self.body_bytes
    }

    /// Checks the tag in constant time.
    pub fn verify(self, key: &MacKey) -> Result<Verified, FrameError> {
        let expected = key.tag(&[&[FRAME_VERSION], self.body_bytes]);
        if !ct_eq(&expected, &self.tag) {
            return Err(FrameError::BadTag);
        }
        Ok(Verified { body: self.body, proof: MacVerified(()) })
    }
}

/// The exact body bytes inside an encoded frame (for transcripts); `None` if it does not decode.
pub fn body_bytes_of(frame: &[u8]) -> Option<&[u8]> {
    open(frame).ok().map(|u| u.body_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ack, Message};
    use crate::terminal::{InjectionType, KeySlot};

    fn key(byte: u8) -> MacKey {
        MacKey::new(SecretBytes::from_slice(&[byte; 32])).expect("key")
    }

    fn ack_body() -> Body {
        Body {
            party: "SN0001".into(),
            counter: 7,
            message: Message::Ack(Ack {
                execution_id: 42,
                result: 0,
                slot: KeySlot::PRODUCTION,
                key_id: vec![0xFF; 10],
                kcv: vec![1, 2, 3],
                injection: InjectionType::Auto,
            }),
        }
    }

    #[test]
    fn sealed_frame_opens_and_verifies_under_the_same_key() {
        let bytes = seal(&key(1), &ack_body()).expect("seal");
        let verified = open(&bytes).expect("open").verify(&key(1)).expect("verify");
        assert_eq!(verified.body, ack_body());
    }

    #[test]
    fn frame_under_another_key_is_refused() {
        let bytes = seal(&key(1), &ack_body()).expect("seal");
        assert_eq!(open(&bytes).expect("open").verify(&key(2)).err(), Some(FrameError::BadTag));
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let bytes = seal(&key(1), &ack_body()).expect("seal");
        for i in 0..bytes.len() * 8 {
            let mut tampered = bytes.clone();
            tampered[i / 8] ^= 1 << (i % 8);
            let outcome = open(&tampered).and_then(|u| u.verify(&key(1)));
            assert!(outcome.is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn trailing_bytes_unknown_versions_and_oversized_frames_are_refused() {
        let mut bytes = seal(&key(1), &ack_body()).expect("seal");
        bytes.push(0);
        assert_eq!(open(&bytes).err(), Some(FrameError::Malformed));
        let mut bytes = seal(&key(1), &ack_body()).expect("seal");
        bytes[0] = 2;
        assert_eq!(open(&bytes).err(), Some(FrameError::UnknownVersion(2)));
        assert_eq!(open(&vec![0u8; FRAME_LEN_MAX + 1]).err(), Some(FrameError::Oversized(FRAME_LEN_MAX + 1)));
        assert_eq!(open(&[]).err(), Some(FrameError::Malformed));
    }

    /// The largest body each backend limit allows, every string at its longest.
    fn largest_backend_bodies() -> Vec<Body> {
        use crate::message::{
            limits, Answer, BackendAnswer, BackendRequest, NotReady, NotReadyReason, Request, TaskOrder, TaskTarget,
        };
        let sn = |i: usize| format!("{i:0>64}");
        let sns: Vec<String> = (0..limits::TASK_DEVICES_MAX).map(sn).collect();
        let party = "o".repeat(64);
        let body = |message| Body { party: party.clone(), counter: u64::MAX, message };
        let order = TaskOrder {
            target: TaskTarget::Devices(sns.clone()),
            key_source: "k".repeat(limits::SHORT_TEXT_LEN_MAX),
            slot: KeySlot(u16::MAX),
            expiry_days: u16::MAX,
        };
        let not_ready = (0..limits::NOT_READY_LISTED_MAX)
            .map(|i| NotReady { sn: sn(i), reasons: NotReadyReason::ALL[..limits::NOT_READY_REASONS_MAX].to_vec() })
            .collect();
        vec![
            body(Message::BackendRequest(BackendRequest { request_id: u64::MAX, request: Request::CreateTask(order) })),
            body(Message::BackendRequest(BackendRequest {
                request_id: u64::MAX,
                request: Request::Unlock { sns: sns.clone() },
            })),
            body(Message::BackendAnswer(BackendAnswer {
                request_id: u64::MAX,
                answer: Answer::Preview { ready: u32::MAX, not_ready_total: u32::MAX, not_ready },
            })),
            body(Message::BackendAnswer(BackendAnswer {
                request_id: u64::MAX,
                answer: Answer::Unlocked { unlocked: u32::MAX, unknown: sns },
            })),
        ]
    }

    #[test]
    fn the_largest_valid_backend_messages_fit_a_backend_frame() {
        for body in largest_backend_bodies() {
            assert_eq!(body.validate(), Ok(()));
            let bytes = seal(&key(1), &body).expect("within BACKEND_FRAME_LEN_MAX");
            assert!(bytes.len() > FRAME_LEN_MAX, "a device frame could carry it: the larger limit is not needed");
            assert_eq!(open(&bytes).err(), Some(FrameError::Oversized(bytes.len())), "not on a device topic");
            let verified = open_backend(&bytes).expect("open").verify(&key(1)).expect("verify");
            assert_eq!(verified.body, body);
        }
        assert_eq!(
            open_backend(&vec![0u8; BACKEND_FRAME_LEN_MAX + 1]).err(),
            Some(FrameError::Oversized(BACKEND_FRAME_LEN_MAX + 1))
        );
    }

    #[test]
    fn a_device_message_keeps_the_device_limit_when_sealed() {
        use crate::message::Download;
        let body = Body {
            party: "SN1".into(),
            counter: 1,
            message: Message::Download(Download {
                execution_id: 1,
                slot: KeySlot::PRODUCTION,
                key_type: crate::terminal::KeyType::Ipek,
                key_block: "B".repeat(FRAME_LEN_MAX),
                key_id: vec![],
                kcv: vec![],
            }),
        };
        assert!(matches!(seal(&key(1), &body), Err(FrameError::Oversized(_))));
    }

    #[test]
    fn mac_keys_must_be_32_bytes() {
        assert_eq!(MacKey::new(SecretBytes::zeroed(16)).err(), Some(FrameError::KeyLength(16)));
    }
}
