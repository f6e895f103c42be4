//! The backend channel's messages: what an RKI backend (the key owner's or the organization's own
//! machine systems) asks over MQTT, what the gateway answers, and the events it reports.
//! `docs/PROTOCOL.md` §12 specifies them byte by byte. The identity and keys of a backend are in
//! [`crate::backend`].
//!
//! [`BackendRequest::validate`] and friends check sizes only, so that a frame within the limits
//! always decodes and reaches the gateway's answer. What a request *means* (a slot RKI may write,
//! an expiry in range, a non-empty target) is checked by [`BackendRequest::check`], whose refusal
//! the gateway sends back as [`Answer::Refused`].

use serde::{Deserialize, Serialize};

use super::{bytes, limits, short, InvalidBody};
use crate::terminal::KeySlot;
use crate::topic::validate_name;

/// Expiry of a task when the order says 0 (ARCHITECTURE.md, "Domain").
pub const EXPIRY_DAYS_DEFAULT: u16 = 30;
/// Longest expiry a task may ask for.
pub const EXPIRY_DAYS_MAX: u16 = 180;

/// 8. backend → gateway: one request, named by the backend's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRequest {
    /// Chosen by the backend, unique per backend and never 0 (0 marks, in
    /// [`Event::TaskCreated`], a task an operator created). A state-changing request repeated
    /// with the same id gets the first answer again and changes nothing.
    pub request_id: u64,
    pub request: Request,
}

/// What a backend may ask. Variant indices are stable; new requests are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// 0. Create a download task; answered by [`Answer::TaskCreated`]. Remembered by request id.
    CreateTask(TaskOrder),
    /// 1. What creating this task would do now; answered by [`Answer::Preview`]. Creates nothing.
    Preview(TaskOrder),
    /// 2. Stop a task: every open execution ends as terminated; answered by [`Answer::Stopped`].
    StopTask { task_id: u64 },
    /// 3. Unlock these devices; answered by [`Answer::Unlocked`].
    Unlock { sns: Vec<String> },
    /// 4. A task's state and counts; answered by [`Answer::TaskState`].
    QueryTask { task_id: u64 },
    /// 5. Acknowledges every event with `seq <= after` and asks for every later one; answered
    ///    by [`Answer::Events`] or [`Answer::Gap`].
    Events { after: u64 },
}

/// A download task, as [`Request::CreateTask`] and [`Request::Preview`] describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOrder {
    pub target: TaskTarget,
    /// The key source's name; empty for the key source assigned to each device (they must all
    /// share one).
    pub key_source: String,
    /// 1, 4 or 8 ([`KeySlot::is_writable_by_rki`]).
    pub slot: KeySlot,
    /// 0 for [`EXPIRY_DAYS_DEFAULT`]; at most [`EXPIRY_DAYS_MAX`].
    pub expiry_days: u16,
}

/// The devices a task is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskTarget {
    /// 0. These SNs, 1 to [`limits::TASK_DEVICES_MAX`], each a name, no repeats.
    Devices(Vec<String>),
    /// 1. Every device of the organization's group of this name.
    Group(String),
}

/// 9. gateway → backend: the answer to the request `request_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendAnswer {
    pub request_id: u64,
    pub answer: Answer,
}

/// The answers. Variant indices are stable; new answers are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// 0. The task exists, with one execution per ready device, persisted.
    TaskCreated { task_id: u64, executions: u32 },
    /// 1. `ready` devices would get an execution; `not_ready_total` would not, of which the
    ///    first [`limits::NOT_READY_LISTED_MAX`] are listed with their reasons.
    Preview { ready: u32, not_ready_total: u32, not_ready: Vec<NotReady> },
    /// 2. The task is stopped; `terminated` executions were open and are now terminated.
    Stopped { task_id: u64, terminated: u32 },
    /// 3. `unlocked` devices have an unlock pending (or were not locked); the SNs in `unknown`
    ///    are not devices of the organization and were skipped.
    Unlocked { unlocked: u32, unknown: Vec<String> },
    /// 4. The task's state (`"unfinished"` while an execution is open, else `"done"`) and how
    ///    many executions are in each state.
    TaskState { task_id: u64, state: String, counts: ExecutionCounts },
    /// 5. The events `after + 1 ..= last` follow on the events topic, in order (none when
    ///    `last == after`); later events follow as they happen.
    Events { after: u64, last: u64 },
    /// 6. The events after `after` are no longer all kept: the oldest the gateway still holds
    ///    has `seq == oldest` (`oldest > after + 1`). Nothing is sent; reconcile with
    ///    [`Request::QueryTask`], then ask `Events { after: oldest - 1 }`.
    Gap { after: u64, oldest: u64 },
    /// 7. Refused: a stable [`BackendRefusalCode`] number and a short English reason.
    Refused { code: u16, reason: String },
}

/// One device a task would not reach, and every reason why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotReady {
    pub sn: String,
    /// Each reason at most once, at most [`limits::NOT_READY_REASONS_MAX`].
    pub reasons: Vec<NotReadyReason>,
}

/// Why a device is not ready for a new download task (the task preview).
/// Indices are stable; new reasons are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NotReadyReason {
    /// 0. A key is already injected; unlock the device first.
    Locked,
    /// 1. No key source is assigned to the device, or another one than the order's.
    Unassigned,
    /// 2. A download task is already pending for the device.
    TaskPending,
    /// 3. The ROM is below the model's minimum.
    RomTooOld,
    /// 4. The key-injection app is too old for the portal region.
    AppTooOld,
    /// 5. A debug key remains on the device (slot 8), or it is in debug mode.
    DebugKeyPresent,
    /// 6. The device was never initialised with a GUDID.
    NotInitialised,
    /// 7. The device never reported its firmware. (The gateway counts such a device as ready,
    ///    since it may come online in time; the reason exists for completeness.)
    NeverSeen,
}

impl NotReadyReason {
    pub const ALL: [NotReadyReason; 8] = [
        NotReadyReason::Locked,
        NotReadyReason::Unassigned,
        NotReadyReason::TaskPending,
        NotReadyReason::RomTooOld,
        NotReadyReason::AppTooOld,
        NotReadyReason::DebugKeyPresent,
        NotReadyReason::NotInitialised,
        NotReadyReason::NeverSeen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotReadyReason::Locked => "locked",
            NotReadyReason::Unassigned => "unassigned",
            NotReadyReason::TaskPending => "task_pending",
            NotReadyReason::RomTooOld => "rom_too_old",
            NotReadyReason::AppTooOld => "app_too_old",
            NotReadyReason::DebugKeyPresent => "debug_key_present",
            NotReadyReason::NotInitialised => "not_initialised",
            NotReadyReason::NeverSeen => "never_seen",
        }
    }
}

/// How many executions of a task are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionCounts {
    /// Queued: persisted, not yet delivered.
    pub pending: u32,
    /// Delivered at least once, awaiting the device's ack.
    pub delivered: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub expired: u32,
    pub terminated: u32,
}

/// 11. gateway → backend: one event of the organization, numbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendEvent {
    /// Numbered per organization from 1, each event one above the previous one.
    pub seq: u64,
    pub event: Event,
}

/// The events. Variant indices are stable; new events are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// 0. A task was created: by the backend named `backend` (of this organization: this one or
    ///    another) for its request `request_id`, or by an operator (`backend` empty,
    ///    `request_id == 0`). Request ids are per backend, hence the name beside it.
    TaskCreated { task_id: u64, backend: String, request_id: u64, executions: u32 },
    /// 1. An execution ended; the download record in brief.
    ExecutionEnded {
        task_id: u64,
        execution_id: u64,
        sn: String,
        /// `"succeeded"`, `"failed"`, `"expired"` or `"terminated"`.
        outcome: String,
        /// The terminal's error code for `"failed"` (`docs/PROTOCOL.md` §6), else 0.
        error_code: i32,
        /// What `error_code` means ([`crate::terminal::result_meaning`]).
        meaning: String,
        /// KSN (TDES) or initial key ID (AES) of the installed key; empty unless succeeded.
        ksn: Vec<u8>,
        /// KCV of the installed key, 3 bytes; empty unless succeeded.
        kcv: Vec<u8>,
        /// When the execution ended: milliseconds since the UNIX epoch.
        at_ms: u64,
    },
    /// 2. The task's last open execution ended: the task is done.
    TaskDone { task_id: u64, succeeded: u32, failed: u32, expired: u32, terminated: u32 },
}

/// Why a backend request was refused: the stable numbers of [`Answer::Refused`]'s `code`.
/// Numbers are never reused; new codes are only ever appended. A backend MUST handle a number
/// it does not know as a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendRefusalCode {
    /// 1. Meaningless as asked: request id 0, an empty or repeated SN list, an empty group name.
    BadRequest,
    /// 2. No such task, group, key source or device in the organization.
    NotFound,
    /// 3. This backend may not do this (its credential was revoked or restricted).
    Forbidden,
    /// 4. The state forbids it (for instance, stopping a task another request is creating).
    Conflict,
    /// 5. The gateway cannot serve now (starting, store outage, overload). Nothing was done and
    ///    nothing is remembered: ask again, with the same request id.
    Unavailable,
    /// 6. `expiry_days` above [`EXPIRY_DAYS_MAX`].
    ExpiryOutOfRange,
    /// 7. A slot RKI may not write (anything but 1, 4, 8).
    SlotNotWritable,
    /// 8. `CreateTask`: no targeted device is ready (ask a `Preview` for the reasons).
    NoDeviceReady,
    /// 9. No key source named, and the devices have none or several assigned.
    NoKeySource,
    /// 10. The target holds more devices than one task may.
    TooManyDevices,
    /// 11. The request id was used before by this backend for a different request.
    RequestIdReused,
}

impl BackendRefusalCode {
    pub const ALL: [BackendRefusalCode; 11] = [
        BackendRefusalCode::BadRequest,
        BackendRefusalCode::NotFound,
        BackendRefusalCode::Forbidden,
        BackendRefusalCode::Conflict,
        BackendRefusalCode::Unavailable,
        BackendRefusalCode::ExpiryOutOfRange,
        BackendRefusalCode::SlotNotWritable,
        BackendRefusalCode::NoDeviceReady,
        BackendRefusalCode::NoKeySource,
        BackendRefusalCode::TooManyDevices,
        BackendRefusalCode::RequestIdReused,
    ];

    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            BackendRefusalCode::BadRequest => 1,
            BackendRefusalCode::NotFound => 2,
            BackendRefusalCode::Forbidden => 3,
            BackendRefusalCode::Conflict => 4,
            BackendRefusalCode::Unavailable => 5,
            BackendRefusalCode::ExpiryOutOfRange => 6,
            BackendRefusalCode::SlotNotWritable => 7,
            BackendRefusalCode::NoDeviceReady => 8,
            BackendRefusalCode::NoKeySource => 9,
            BackendRefusalCode::TooManyDevices => 10,
            BackendRefusalCode::RequestIdReused => 11,
        }
    }

    pub fn from_code(code: u16) -> Option<BackendRefusalCode> {
        BackendRefusalCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A stable, low-cardinality label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendRefusalCode::BadRequest => "bad_request",
            BackendRefusalCode::NotFound => "not_found",
            BackendRefusalCode::Forbidden => "forbidden",
            BackendRefusalCode::Conflict => "conflict",
            BackendRefusalCode::Unavailable => "unavailable",
            BackendRefusalCode::ExpiryOutOfRange => "expiry_out_of_range",
            BackendRefusalCode::SlotNotWritable => "slot_not_writable",
            BackendRefusalCode::NoDeviceReady => "no_device_ready",
            BackendRefusalCode::NoKeySource => "no_key_source",
            BackendRefusalCode::TooManyDevices => "too_many_devices",
            BackendRefusalCode::RequestIdReused => "request_id_reused",
        }
    }

    /// Whether the gateway remembers this refusal under the request id. Only `Unavailable` is
    /// forgotten: it says nothing was looked at, so asking again may succeed.
    pub fn is_remembered(self) -> bool {
        self != BackendRefusalCode::Unavailable
    }
}

impl Answer {
    /// A refusal with its code and reason, the reason cut to the 64-byte limit on a character
    /// boundary.
    pub fn refused(code: BackendRefusalCode, reason: &str) -> Answer {
        let mut end = reason.len().min(limits::SHORT_TEXT_LEN_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Answer::Refused { code: code.code(), reason: reason[..end].to_string() }
    }
}

impl Request {
    /// Whether the gateway remembers the answer under the request id (the request changes
    /// state). Read-only requests are answered afresh every time.
    pub fn changes_state(&self) -> bool {
        matches!(self, Request::CreateTask(_) | Request::StopTask { .. } | Request::Unlock { .. })
    }
}

fn names(field: &'static str, sns: &[String], max: usize) -> Result<(), InvalidBody> {
    if sns.len() > max {
        return Err(InvalidBody::TooLong(field));
    }
    sns.iter().try_for_each(|sn| validate_name(sn).map_err(|e| InvalidBody::Name(field, e)))
}

fn sn(field: &'static str, sn: &str) -> Result<(), InvalidBody> {
    validate_name(sn).map_err(|e| InvalidBody::Name(field, e))
}

impl TaskOrder {
    fn validate(&self) -> Result<(), InvalidBody> {
        short("key_source", &self.key_source)?;
        match &self.target {
            TaskTarget::Devices(sns) => names("target.devices", sns, limits::TASK_DEVICES_MAX),
            TaskTarget::Group(name) => short("target.group", name),
        }
    }

    /// What the order means, before the gateway looks anything up.
    fn check(&self) -> Result<(), BackendRefusalCode> {
        match &self.target {
            TaskTarget::Devices(sns) if sns.is_empty() || has_repeats(sns) => {
                return Err(BackendRefusalCode::BadRequest)
            }
            TaskTarget::Group(name) if name.is_empty() => return Err(BackendRefusalCode::BadRequest),
            _ => {}
        }
        if !self.slot.is_writable_by_rki() {
            return Err(BackendRefusalCode::SlotNotWritable);
        }
        if self.expiry_days > EXPIRY_DAYS_MAX {
            return Err(BackendRefusalCode::ExpiryOutOfRange);
        }
        Ok(())
    }

    /// The expiry in days, the default applied.
    pub fn expiry_days_effective(&self) -> u16 {
        if self.expiry_days == 0 {
            EXPIRY_DAYS_DEFAULT
        } else {
            self.expiry_days
        }
    }
}

fn has_repeats(sns: &[String]) -> bool {
    let mut sorted: Vec<&str> = sns.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

impl BackendRequest {
    /// Sizes only: see the module's doc.
    pub fn validate(&self) -> Result<(), InvalidBody> {
        match &self.request {
            Request::CreateTask(order) | Request::Preview(order) => order.validate(),
            Request::Unlock { sns } => names("sns", sns, limits::TASK_DEVICES_MAX),
            Request::StopTask { .. } | Request::QueryTask { .. } | Request::Events { .. } => Ok(()),
        }
    }

    /// What the request means, checked without the store: the refusal the gateway answers
    /// when the request cannot be served whatever the fleet's state.
    pub fn check(&self) -> Result<(), BackendRefusalCode> {
        if self.request_id == 0 {
            return Err(BackendRefusalCode::BadRequest);
        }
        match &self.request {
            Request::CreateTask(order) | Request::Preview(order) => order.check(),
            Request::Unlock { sns } if sns.is_empty() || has_repeats(sns) => Err(BackendRefusalCode::BadRequest),
            Request::Unlock { .. } | Request::StopTask { .. } | Request::QueryTask { .. } | Request::Events { .. } => {
                Ok(())
            }
        }
    }
}

impl BackendAnswer {
    pub fn validate(&self) -> Result<(), InvalidBody> {
        match &self.answer {
            Answer::Preview { not_ready, .. } => {
                if not_ready.len() > limits::NOT_READY_LISTED_MAX {
                    return Err(InvalidBody::TooLong("not_ready"));
                }
                for device in not_ready {
                    sn("not_ready.sn", &device.sn)?;
                    if device.reasons.len() > limits::NOT_READY_REASONS_MAX {
                        return Err(InvalidBody::TooLong("not_ready.reasons"));
                    }
                }
                Ok(())
            }
            Answer::Unlocked { unknown, .. } => names("unknown", unknown, limits::TASK_DEVICES_MAX),
            Answer::TaskState { state, .. } => short("state", state),
            Answer::Refused { reason, .. } => short("reason", reason),
            Answer::TaskCreated { .. } | Answer::Stopped { .. } | Answer::Events { .. } | Answer::Gap { .. } => Ok(()),
        }
    }
}

impl BackendEvent {
    pub fn validate(&self) -> Result<(), InvalidBody> {
        match &self.event {
            Event::ExecutionEnded { sn: device, outcome, meaning, ksn, kcv, .. } => {
                sn("sn", device)?;
                short("outcome", outcome)?;
                short("meaning", meaning)?;
                bytes("ksn", ksn, limits::KEY_ID_LEN_MAX)?;
                bytes("kcv", kcv, limits::KCV_LEN_MAX)
            }
            Event::TaskCreated { backend, .. } if !backend.is_empty() => {
                validate_name(backend).map_err(|e| InvalidBody::Name("backend", e))
            }
            Event::TaskCreated { .. } | Event::TaskDone { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::{result_meaning, TerminalError};

    fn order(target: TaskTarget, slot: u16, expiry_days: u16) -> TaskOrder {
        TaskOrder { target, key_source: String::new(), slot: KeySlot(slot), expiry_days }
    }

    fn request(request_id: u64, request: Request) -> BackendRequest {
        BackendRequest { request_id, request }
    }

    #[test]
    fn refusal_codes_are_stable_distinct_and_round_trip() {
        let numbers: Vec<u16> = BackendRefusalCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(numbers, (1..=11).collect::<Vec<u16>>(), "numbers are 1.. in declaration order, never reused");
        for code in BackendRefusalCode::ALL {
            assert_eq!(BackendRefusalCode::from_code(code.code()), Some(code));
            assert!(code.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(BackendRefusalCode::from_code(0), None);
        assert_eq!(BackendRefusalCode::from_code(12), None);
        assert!(!BackendRefusalCode::Unavailable.is_remembered());
        assert!(BackendRefusalCode::NoDeviceReady.is_remembered());
    }

    #[test]
    fn a_meaningless_request_is_refused_with_its_code() {
        let devices = || TaskTarget::Devices(vec!["SN1".into(), "SN2".into()]);
        let cases: Vec<(BackendRequest, Result<(), BackendRefusalCode>)> = vec![
            (request(1, Request::CreateTask(order(devices(), 1, 0))), Ok(())),
            (request(1, Request::Preview(order(TaskTarget::Group("g".into()), 8, 180))), Ok(())),
            (request(0, Request::QueryTask { task_id: 1 }), Err(BackendRefusalCode::BadRequest)),
            (
                request(1, Request::CreateTask(order(TaskTarget::Devices(vec![]), 1, 0))),
                Err(BackendRefusalCode::BadRequest),
            ),
            (
                request(1, Request::CreateTask(order(TaskTarget::Devices(vec!["A".into(), "A".into()]), 1, 0))),
                Err(BackendRefusalCode::BadRequest),
            ),
            (
                request(1, Request::Preview(order(TaskTarget::Group(String::new()), 1, 0))),
                Err(BackendRefusalCode::BadRequest),
            ),
            (request(1, Request::CreateTask(order(devices(), 9001, 0))), Err(BackendRefusalCode::SlotNotWritable)),
            (request(1, Request::CreateTask(order(devices(), 2, 0))), Err(BackendRefusalCode::SlotNotWritable)),
            (request(1, Request::CreateTask(order(devices(), 4, 181))), Err(BackendRefusalCode::ExpiryOutOfRange)),
            (request(1, Request::Unlock { sns: vec![] }), Err(BackendRefusalCode::BadRequest)),
            (request(1, Request::Unlock { sns: vec!["SN1".into()] }), Ok(())),
            (request(7, Request::Events { after: 0 }), Ok(())),
            (request(7, Request::StopTask { task_id: 0 }), Ok(())),
        ];
        for (req, expected) in cases {
            assert_eq!(req.check(), expected, "{req:?}");
            assert_eq!(req.validate(), Ok(()), "{req:?}: sizes are fine, the meaning is not");
        }
    }

    #[test]
    fn only_state_changing_requests_are_remembered() {
        let o = || order(TaskTarget::Group("g".into()), 1, 0);
        assert!(Request::CreateTask(o()).changes_state());
        assert!(Request::StopTask { task_id: 1 }.changes_state());
        assert!(Request::Unlock { sns: vec!["A".into()] }.changes_state());
        assert!(!Request::Preview(o()).changes_state());
        assert!(!Request::QueryTask { task_id: 1 }.changes_state());
        assert!(!Request::Events { after: 1 }.changes_state());
    }

    #[test]
    fn the_default_expiry_applies_to_zero() {
        assert_eq!(order(TaskTarget::Group("g".into()), 1, 0).expiry_days_effective(), 30);
        assert_eq!(order(TaskTarget::Group("g".into()), 1, 7).expiry_days_effective(), 7);
    }

    #[test]
    fn a_refusal_reason_is_cut_to_the_limit_on_a_character_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let Answer::Refused { code, reason } = Answer::refused(BackendRefusalCode::NotFound, &long) else {
            panic!("a refusal")
        };
        assert_eq!(code, 2);
        assert_eq!(reason.len(), 64);
        let short_one = Answer::refused(BackendRefusalCode::Conflict, "task is done");
        assert_eq!(short_one, Answer::Refused { code: 4, reason: "task is done".into() });
        let answer = BackendAnswer { request_id: 1, answer: Answer::refused(BackendRefusalCode::Forbidden, &long) };
        assert_eq!(answer.validate(), Ok(()));
    }

    #[test]
    fn every_terminal_meaning_fits_an_event() {
        for code in TerminalError::ALL.iter().map(|e| e.code()).chain([0, -42]) {
            assert!(result_meaning(code).len() <= limits::SHORT_TEXT_LEN_MAX, "{code}");
        }
    }

    #[test]
    fn sizes_past_each_limit_are_invalid() {
        let many = |n: usize| (0..n).map(|i| format!("SN{i}")).collect::<Vec<_>>();
        let over = limits::TASK_DEVICES_MAX + 1;
        let invalid_requests = [
            Request::CreateTask(order(TaskTarget::Devices(many(over)), 1, 0)),
            Request::Preview(order(TaskTarget::Devices(vec!["a/b".into()]), 1, 0)),
            Request::Preview(order(TaskTarget::Group("g".repeat(65)), 1, 0)),
            Request::CreateTask(TaskOrder {
                target: TaskTarget::Group("g".into()),
                key_source: "k".repeat(65),
                slot: KeySlot(1),
                expiry_days: 0,
            }),
            Request::Unlock { sns: many(over) },
            Request::Unlock { sns: vec![String::new()] },
        ];
        for r in invalid_requests {
            assert!(request(1, r.clone()).validate().is_err(), "{r:?}");
        }
        assert_eq!(request(1, Request::Unlock { sns: many(limits::TASK_DEVICES_MAX) }).validate(), Ok(()));

        let not_ready = |n: usize, reasons: usize| {
            (0..n)
                .map(|i| NotReady { sn: format!("SN{i}"), reasons: vec![NotReadyReason::Locked; reasons] })
                .collect::<Vec<_>>()
        };
        let answer = |answer: Answer| BackendAnswer { request_id: 1, answer };
        let invalid_answers = [
            Answer::Preview {
                ready: 0,
                not_ready_total: 2000,
                not_ready: not_ready(limits::NOT_READY_LISTED_MAX + 1, 1),
            },
            Answer::Preview {
                ready: 0,
                not_ready_total: 1,
                not_ready: not_ready(1, limits::NOT_READY_REASONS_MAX + 1),
            },
            Answer::Unlocked { unlocked: 0, unknown: many(over) },
            Answer::Unlocked { unlocked: 0, unknown: vec!["#".into()] },
            Answer::TaskState { task_id: 1, state: "s".repeat(65), counts: ExecutionCounts::default() },
            Answer::Refused { code: 1, reason: "r".repeat(65) },
        ];
        for a in invalid_answers {
            assert!(answer(a.clone()).validate().is_err(), "{a:?}");
        }

        let ended = |sn: &str, outcome: String, ksn: usize, kcv: usize| BackendEvent {
            seq: 1,
            event: Event::ExecutionEnded {
                task_id: 1,
                execution_id: 1,
                sn: sn.into(),
                outcome,
                error_code: 0,
                meaning: String::new(),
                ksn: vec![0; ksn],
                kcv: vec![0; kcv],
                at_ms: 0,
            },
        };
        assert_eq!(ended("SN1", "succeeded".into(), 16, 5).validate(), Ok(()));
        let created = |backend: &str| BackendEvent {
            seq: 1,
            event: Event::TaskCreated { task_id: 1, backend: backend.into(), request_id: 0, executions: 1 },
        };
        assert_eq!(created("").validate(), Ok(()), "an operator's task");
        assert_eq!(created("erp-1").validate(), Ok(()));
        assert!(created("erp/1").validate().is_err());
        for e in [
            ended("SN1", "succeeded".into(), 17, 3),
            ended("SN1", "succeeded".into(), 10, 6),
            ended("SN1", "x".repeat(65), 10, 3),
            ended("", "failed".into(), 0, 0),
        ] {
            assert!(e.validate().is_err(), "{e:?}");
        }
    }
}
