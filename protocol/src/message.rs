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
    /// Devices one backend task request may name.
    pub const TASK_DEVICES_MAX: usize = 1000;
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
    /// 8. RKI backend → gateway, signed with the organization's backend key.
    TaskRequest(TaskRequest),
    /// 9. gateway → RKI backend, signed with the organization's backend key.
    TaskEvent(TaskEvent),
    /// 10. terminal → gateway, on `dev/{sn}/up`, signed with the device signing key: the terminal
    ///     did not act on a down frame whose tag verified (a replayed counter), and says why.
    DeviceRefusal(DeviceRefusal),
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
            Message::TaskRequest(_) => MessageKind::TaskRequest,
            Message::TaskEvent(_) => MessageKind::TaskEvent,
            Message::DeviceRefusal(_) => MessageKind::DeviceRefusal,
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
    TaskRequest,
    TaskEvent,
    DeviceRefusal,
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
            MessageKind::TaskRequest => "task_request",
            MessageKind::TaskEvent => "task_event",
            MessageKind::DeviceRefusal => "device_refusal",
        }
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

/// The RKI backend asks for a download task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The backend's idempotency key: a repeated request id creates nothing new.
    pub request_id: u64,
    pub target: TaskTarget,
    pub key_source: String,
    pub slot: KeySlot,
    /// 0 means the default (30 days); at most 180.
    pub expiry_days: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskTarget {
    Devices(Vec<String>),
    Group(String),
}

/// The gateway tells the backend what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskEvent {
    Created { request_id: u64, task_id: u64, executions: u32 },
    Rejected { request_id: u64, reason: String },
    ExecutionEnded { task_id: u64, execution_id: u64, sn: String, state: String, result: i32, kcv: Vec<u8> },
}

/// Why a decoded body is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBody {
    #[error("party: {0}")]
    Party(crate::topic::NameError),
    #[error("field {0} is too long")]
    TooLong(&'static str),
}

fn short(field: &'static str, text: &str) -> Result<(), InvalidBody> {
    if text.len() > limits::SHORT_TEXT_LEN_MAX {
        return Err(InvalidBody::TooLong(field));
    }
    Ok(())
}

fn bytes(field: &'static str, value: &[u8], max: usize) -> Result<(), InvalidBody> {
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
            Message::TaskRequest(m) => {
                short("key_source", &m.key_source)?;
                match &m.target {
                    TaskTarget::Devices(sns) => {
                        if sns.len() > limits::TASK_DEVICES_MAX {
                            return Err(InvalidBody::TooLong("target.devices"));
                        }
                        for sn in sns {
                            validate_name(sn).map_err(InvalidBody::Party)?;
                        }
                        Ok(())
                    }
                    TaskTarget::Group(name) => short("target.group", name),
                }
            }
            Message::TaskEvent(event) => match event {
                TaskEvent::Rejected { reason, .. } => short("reason", reason),
                TaskEvent::ExecutionEnded { sn, state, kcv, .. } => {
                    short("sn", sn)?;
                    short("state", state)?;
                    bytes("kcv", kcv, limits::KCV_LEN_MAX)
                }
                TaskEvent::Created { .. } => Ok(()),
            },
        }
    }
}
