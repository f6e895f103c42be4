//! Every wire message. Postcard-encoded, then sealed in a frame ([`crate::frame::seal`]).
//!
//! The encoding is postcard 1.x: integers are LEB128 varints (signed ones zigzag-encoded first),
//! `String`/`Vec<u8>` are a varint length then the bytes, fixed arrays are the raw bytes, `bool` and
//! `Option` tags are one byte, an enum is its varint variant index then its fields in order.
//! `docs/PROTOCOL.md` gives the byte layout of each message with worked examples.
//!
//! Types here are wire types: they carry no secret in the clear. Key material travels only inside
//! TR-31 key blocks (`Download::key_block`) and X25519 public keys.

use serde::{Deserialize, Serialize};

use crate::terminal::{InjectionType, KeySlot, KeyType, Region};
use crate::topic::{validate_name, SN_LEN_MAX};

mod backend;
pub use backend::{
    Answer, BackendAnswer, BackendEvent, BackendRefusalCode, BackendRequest, Event, ExecutionCounts, NotReady,
    NotReadyReason, Request, TaskOrder, TaskTarget,
};

/// Length limits, checked by [`Body::validate`] on every decoded message.
pub mod limits {
    /// Model, ROM, app version, device id and reason strings.
    pub const SHORT_TEXT_LEN_MAX: usize = 64;
    /// A TR-31 key block: a 32-byte key under AES with KS/IK/KC blocks fits well inside.
    pub const KEY_BLOCK_LEN_MAX: usize = 512;
    /// A KSN (10 bytes TDES) or AES DUKPT initial key ID (8 bytes) or AES KSN (12 bytes).
    pub const KEY_ID_LEN_MAX: usize = 16;
    /// A key check value: 3 bytes usually, 5 at most.
    pub const KCV_LEN_MAX: usize = 5;
    /// Slots a hello may report.
    pub const SLOTS_MAX: usize = 16;
    /// SNs one backend request may name (a task's `TaskTarget::Devices`, an `Unlock`), and SNs
    /// one answer may list (`Answer::Unlocked::unknown`).
    pub const TASK_DEVICES_MAX: usize = 1000;
    /// Not-ready devices one `Answer::Preview` lists; `not_ready_total` counts them all (a group
    /// may hold many more).
    pub const NOT_READY_LISTED_MAX: usize = 1000;
    /// Reasons one not-ready device may carry: each [`super::NotReadyReason`] at most once.
    pub const NOT_READY_REASONS_MAX: usize = 8;
}

/// The authenticated content of a frame: who it concerns, its counter, and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// The device's SN for the device channel (both directions: a message for or from another SN
    /// is refused), the organization's slug for the backend channel.
    pub party: String,
    /// Strictly increasing per sender and channel. The receiver refuses a counter not above the
    /// last one it accepted (replay).
    pub counter: u64,
    pub message: Message,
}

/// Every message, in one enum so the variant index is the message type on the wire.
/// Indices are stable: new variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// 0. terminal → gateway, on `init/{sn}`, tagged under the GUDID's MAC key.
    CreateKey(CreateKey),
    /// 1. gateway → terminal, on `dev/{sn}/down`, tagged under the GUDID's MAC key.
    CreateKeyAnswer(CreateKeyAnswer),
    /// 2. terminal → gateway, on `dev/{sn}/up`, signed with the device signing key.
    Hello(Hello),
    /// 3. terminal → gateway, on `dev/{sn}/up`, signed with the device signing key.
    Ack(Ack),
    /// 4. terminal → gateway: the last will, registered at CONNECT, signed; not counter-checked.
    Bye,
    /// 5. gateway → terminal, signed with the device signing key.
    Download(Download),
    /// 6. gateway → terminal, signed with the device signing key.
    Unlock(Unlock),
    /// 7. gateway → terminal: a request was refused. Informational; changes no state on the
    ///    terminal, so it may be tagged under the public refusal key when no shared key exists.
    Refusal(Refusal),
    /// 8. RKI backend → gateway, on `rki/v1/backend/{org}/{name}/req`, tagged under the
    ///    backend's MAC key ([`crate::backend::BackendSecret::mac_key`]). (Index 8 was a reserved
    ///    `TaskRequest` that no gateway ever served.)
    BackendRequest(BackendRequest),
    /// 9. gateway → RKI backend, on `rki/v1/backend/{org}/{name}/reply`, tagged under the same
    ///    key: the answer to one [`BackendRequest`]. (Was the reserved, never served `TaskEvent`.)
    BackendAnswer(BackendAnswer),
    /// 10. terminal → gateway, on `dev/{sn}/up`, signed with the device signing key: the terminal
    ///     did not act on a down frame whose tag verified (a replayed counter), and says why.
    DeviceRefusal(DeviceRefusal),
    /// 11. gateway → RKI backend, on `rki/v1/backend/{org}/{name}/events`, tagged under the
    ///     backend's MAC key: one numbered event of the organization.
    BackendEvent(BackendEvent),
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::CreateKey(_) => MessageKind::CreateKey,
            Message::CreateKeyAnswer(_) => MessageKind::CreateKeyAnswer,
            Message::Hello(_) => MessageKind::Hello,
            Message::Ack(_) => MessageKind::Ack,
            Message::Bye => MessageKind::Bye,
            Message::Download(_) => MessageKind::Download,
            Message::Unlock(_) => MessageKind::Unlock,
            Message::Refusal(_) => MessageKind::Refusal,
            Message::BackendRequest(_) => MessageKind::BackendRequest,
            Message::BackendAnswer(_) => MessageKind::BackendAnswer,
            Message::DeviceRefusal(_) => MessageKind::DeviceRefusal,
            Message::BackendEvent(_) => MessageKind::BackendEvent,
        }
    }
}

/// The message type, without its fields (for metrics labels and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    CreateKey,
    CreateKeyAnswer,
    Hello,
    Ack,
    Bye,
    Download,
    Unlock,
    Refusal,
    BackendRequest,
    BackendAnswer,
    DeviceRefusal,
    BackendEvent,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::CreateKey => "create_key",
            MessageKind::CreateKeyAnswer => "create_key_answer",
            MessageKind::Hello => "hello",
            MessageKind::Ack => "ack",
            MessageKind::Bye => "bye",
            MessageKind::Download => "download",
            MessageKind::Unlock => "unlock",
            MessageKind::Refusal => "refusal",
            MessageKind::BackendRequest => "backend_request",
            MessageKind::BackendAnswer => "backend_answer",
            MessageKind::DeviceRefusal => "device_refusal",
            MessageKind::BackendEvent => "backend_event",
        }
    }

    /// Whether the message travels on the backend channel (§12 of `docs/PROTOCOL.md`) rather
    /// than a device's topics. Backend frames may be larger ([`crate::frame::BACKEND_FRAME_LEN_MAX`]).
    pub fn is_backend(self) -> bool {
        matches!(self, MessageKind::BackendRequest | MessageKind::BackendAnswer | MessageKind::BackendEvent)
    }
}

/// Device initialisation request (after the Oxipay CreateKey operation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKey {
    /// SHA-256 over a label and the GUDID ([`crate::init::Gudid::id`]): names the GUDID without
    /// revealing it.
    pub gudid_id: [u8; 32],
    /// The terminal's own device id, echoed on later requests (`x_pos_device_id` in the design).
    pub x_pos_device_id: String,
    /// The terminal's ephemeral X25519 public key.
    pub device_public: [u8; 32],
}

/// The gateway's answer to a valid CreateKey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKeyAnswer {
    pub gudid_id: [u8; 32],
    /// The counter of the CreateKey answered, as a [`Refusal`] names the request it refuses. A
    /// terminal that retried its CreateKey holds several ephemeral keys: this says which one the
    /// answer's secrets are agreed with (docs/PROTOCOL.md §7.3).
    pub request_counter: u64,
    /// The gateway's ephemeral X25519 public key.
    pub gateway_public: [u8; 32],
}

/// One key slot as the terminal reports it ("key query").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: KeySlot,
    pub key_type: KeyType,
    /// KSN (TDES DUKPT) or initial key ID (AES DUKPT) of the key in the slot.
    pub key_id: Vec<u8>,
    pub kcv: Vec<u8>,
}

/// Presence: sent after every (re)connect, once the terminal has subscribed to its down topic.
/// It triggers (re)delivery of every open execution for the terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub model: String,
    pub rom_version: String,
    pub app_version: String,
    pub region: Region,
    pub debug_mode: bool,
    pub locked: bool,
    pub slots: Vec<SlotStatus>,
}

/// The terminal's signed answer to a [`Download`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub execution_id: u64,
    /// 0 on success, else the terminal's error code ([`crate::terminal::TerminalError`]).
    pub result: i32,
    pub slot: KeySlot,
    /// KSN or key ID of the installed key (empty on failure).
    pub key_id: Vec<u8>,
    /// KCV of the installed key, 3 bytes (empty on failure).
    pub kcv: Vec<u8>,
    pub injection: InjectionType,
}

/// A key to install: gateway → terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    pub execution_id: u64,
    pub slot: KeySlot,
    pub key_type: KeyType,
    /// ASCII TR-31 key block under the terminal's key-block protection key: version D (AES KBPK)
    /// or B (TDES KBPK).
    pub key_block: String,
    /// KSN (TDES) or initial key ID (AES) of the wrapped key, also carried in the block's KS/IK.
    pub key_id: Vec<u8>,
    /// The KCV (3 bytes) the terminal must find after unwrapping.
    pub kcv: Vec<u8>,
}

/// Clears the terminal's lock, so that another key can go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unlock {
    pub unlock_id: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalCode {
    UnknownGudid,
    GudidUsed,
    GudidExpired,
    GudidWrongDevice,
    BadTag,
    Malformed,
    Replay,
    UnknownDevice,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::UnknownGudid => "unknown_gudid",
            RefusalCode::GudidUsed => "gudid_used",
            RefusalCode::GudidExpired => "gudid_expired",
            RefusalCode::GudidWrongDevice => "gudid_wrong_device",
            RefusalCode::BadTag => "bad_tag",
            RefusalCode::Malformed => "malformed",
            RefusalCode::Replay => "replay",
            RefusalCode::UnknownDevice => "unknown_device",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The counter of the refused request.
    pub request_counter: u64,
    pub code: RefusalCode,
}

/// The down frame a terminal refused: what it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusedFrame {
    /// 0. a [`Download`] of this execution.
    Download { execution_id: u64 },
    /// 1. an [`Unlock`] with this id.
    Unlock { unlock_id: u64 },
}

/// Terminal → gateway: a down frame whose tag verified was not acted on. Without it a refused
/// download is visible only on the terminal, and the operator sees a delivery that never ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRefusal {
    /// The `counter` of the refused frame.
    pub refused_counter: u64,
    /// The last gateway counter the terminal accepted (a replay: the refused one is not above it).
    pub accepted_counter: u64,
    pub frame: RefusedFrame,
    /// Why: [`RefusalCode::Replay`] for a counter not above `accepted_counter`.
    pub code: RefusalCode,
}

/// Why a decoded body is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBody {
    #[error("party: {0}")]
    Party(crate::topic::NameError),
    #[error("field {0} is too long")]
    TooLong(&'static str),
    #[error("field {0}: {1}")]
    Name(&'static str, crate::topic::NameError),
}

pub(crate) fn short(field: &'static str, text: &str) -> Result<(), InvalidBody> {
    if text.len() > limits::SHORT_TEXT_LEN_MAX {
        return Err(InvalidBody::TooLong(field));
    }
    Ok(())
}

pub(crate) fn bytes(field: &'static str, value: &[u8], max: usize) -> Result<(), InvalidBody> {
    if value.len() > max {
        return Err(InvalidBody::TooLong(field));
    }
    Ok(())
}

impl Body {
    /// Checks every length limit and the party name. Run on every decoded body before use.
    pub fn validate(&self) -> Result<(), InvalidBody> {
        validate_name(&self.party).map_err(InvalidBody::Party)?;
        debug_assert!(self.party.len() <= SN_LEN_MAX);
        match &self.message {
            Message::CreateKey(m) => short("x_pos_device_id", &m.x_pos_device_id),
            Message::CreateKeyAnswer(_)
            | Message::Bye
            | Message::Unlock(_)
            | Message::Refusal(_)
            | Message::DeviceRefusal(_) => Ok(()),
            Message::Hello(m) => {
                short("model", &m.model)?;
                short("rom_version", &m.rom_version)?;
                short("app_version", &m.app_version)?;
                if m.slots.len() > limits::SLOTS_MAX {
                    return Err(InvalidBody::TooLong("slots"));
                }
                for slot in &m.slots {
                    bytes("slots.key_id", &slot.key_id, limits::KEY_ID_LEN_MAX)?;
                    bytes("slots.kcv", &slot.kcv, limits::KCV_LEN_MAX)?;
                }
                Ok(())
            }
            Message::Ack(m) => {
                bytes("key_id", &m.key_id, limits::KEY_ID_LEN_MAX)?;
                bytes("kcv", &m.kcv, limits::KCV_LEN_MAX)
            }
            Message::Download(m) => {
                if m.key_block.len() > limits::KEY_BLOCK_LEN_MAX {
                    return Err(InvalidBody::TooLong("key_block"));
                }
                bytes("key_id", &m.key_id, limits::KEY_ID_LEN_MAX)?;
                bytes("kcv", &m.kcv, limits::KCV_LEN_MAX)
            }
            Message::BackendRequest(m) => m.validate(),
            Message::BackendAnswer(m) => m.validate(),
            Message::BackendEvent(m) => m.validate(),
        }
    }
}
