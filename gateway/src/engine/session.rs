//! The per-device decisions, pure: what a device's frame means for its state, whether an ack ends
//! an execution and how, when a download is due again, which devices are ready for a task.
//!
//! Nothing here reads a clock, locks, logs, counts or touches the store: every function takes the
//! state and the time it needs and returns a decision, which the rooms around it carry out
//! (`inbound.rs` and `delivery.rs` write, publish and count). So every rule of the message path
//! is unit-tested here with plain values, in the shape of `device-sim/src/app.rs`.

use super::*;

/// Proof that an ack's slot, key ID and KCV match the execution's derivation. Only
/// [`check_ack`] makes one, and only [`AckOutcome::Succeeded`] holds one: a success cannot be
/// recorded without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KcvMatched(());

/// How a verified, matching ack ends its execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckOutcome {
    /// The terminal installed the key, and its KCV is the derivation's.
    Succeeded(KcvMatched),
    /// The terminal reported an error code (its meaning is in `rki_protocol::terminal`).
    Failed { result: i32 },
}

impl AckOutcome {
    /// The state the execution ends in.
    pub(super) fn state(self) -> ExecutionState {
        match self {
            AckOutcome::Succeeded(_) => ExecutionState::Succeeded,
            AckOutcome::Failed { .. } => ExecutionState::Failed,
        }
    }

    pub(super) fn succeeded(self) -> bool {
        matches!(self, AckOutcome::Succeeded(_))
    }
}

/// The checks of a verified ack against its execution. Success needs the slot, the key ID and the
/// KCV to match the derivation; an error code needs only the slot.
pub(super) fn check_ack(e: &OpenExecution, ack: &message::Ack) -> Result<AckOutcome, Rejection> {
    if ack.slot.0 != e.slot {
        return Err(Rejection::SlotMismatch);
    }
    if ack.result != 0 {
        return Ok(AckOutcome::Failed { result: ack.result });
    }
    if !rki_protocol::secret::ct_eq(&ack.key_id, &e.key_id) {
        return Err(Rejection::KeyIdMismatch);
    }
    let expected = Kcv::from_hex(&e.kcv);
    let given = Kcv::from_slice(&ack.kcv);
    match (expected, given) {
        (Some(expected), Some(given)) if expected.short() == given.short() => Ok(AckOutcome::Succeeded(KcvMatched(()))),
        _ => Err(Rejection::KcvMismatch),
    }
}

/// Opens a frame that came up on `sn`'s topic: it decodes and names `sn` as its party. Nothing in
/// it may be acted on before [`verify`]. A refusal comes with the message kind it is counted
/// under (`device` for a frame that does not decode).
pub(super) fn open_frame<'a>(sn: &str, payload: &'a [u8]) -> Result<frame::Unverified<'a>, (&'static str, Rejection)> {
    let unverified = frame::open(payload).map_err(|e| ("device", Rejection::Frame(e.reason())))?;
    if unverified.peek().party != sn {
        return Err((unverified.peek().message.kind().as_str(), Rejection::PartyMismatch));
    }
    Ok(unverified)
}

/// Checks the frame's tag under the device's signing key.
pub(super) fn verify(unverified: frame::Unverified<'_>, key: &MacKey) -> Result<frame::Verified, Rejection> {
    unverified.verify(key).map_err(|_| Rejection::BadMac)
}

/// What a verified device frame asks for, once its counter is checked against the last one the
/// device had accepted (docs/PROTOCOL.md §4.4).
#[derive(Debug)]
pub(super) enum DeviceMessage {
    /// Not counter-checked: compared with the latest hello's counter instead ([`bye_counts`]).
    Bye {
        counter: u64,
    },
    Hello {
        counter: u64,
        hello: message::Hello,
    },
    Ack {
        counter: u64,
        ack: message::Ack,
    },
    Refusal {
        counter: u64,
        refusal: message::DeviceRefusal,
    },
}

/// Sorts a verified body: a replayed counter and a message that does not travel up are refused.
pub(super) fn classify(body: Body, last_counter: u64) -> Result<DeviceMessage, Rejection> {
    let counter = body.counter;
    let fresh = counter > last_counter;
    match body.message {
        Message::Bye => Ok(DeviceMessage::Bye { counter }),
        Message::Hello(hello) if fresh => Ok(DeviceMessage::Hello { counter, hello }),
        Message::Ack(ack) if fresh => Ok(DeviceMessage::Ack { counter, ack }),
        Message::DeviceRefusal(refusal) if fresh => Ok(DeviceMessage::Refusal { counter, refusal }),
        Message::Hello(_) | Message::Ack(_) | Message::DeviceRefusal(_) => Err(Rejection::Replay),
        _ => Err(Rejection::WrongTopic),
    }
}

/// What a fresh, verified ack does to the device's open executions.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AckDecision {
    /// The open execution at `index` ends with `outcome`.
    End {
        index: usize,
        outcome: AckOutcome,
    },
    /// The execution is not open in this node's memory: the store says what it is
    /// ([`decide_closed_ack`]).
    NotOpenHere,
    Reject(Rejection),
}

pub(super) fn decide_ack(open: &[OpenExecution], ack: &message::Ack) -> AckDecision {
    let id = ack.execution_id as i64;
    match open.iter().position(|e| e.id == id) {
        None => AckDecision::NotOpenHere,
        Some(index) => match check_ack(&open[index], ack) {
            Ok(outcome) => AckDecision::End { index, outcome },
            Err(why) => AckDecision::Reject(why),
        },
    }
}

/// An ack of an execution that is not open in memory, given the store's row of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClosedAck {
    /// Another device's execution: refused.
    Foreign,
    /// Open in the store but not in this node's memory (another node made it): load it and
    /// decide again.
    LoadAndRetry,
    /// Already ended: an idempotent re-ack. Nothing changes but the device's counter.
    Duplicate,
}

pub(super) fn decide_closed_ack(
    row_device_id: i64,
    row_sn: &str,
    row_state: ExecutionState,
    device_id: i64,
    sn: &str,
) -> ClosedAck {
    if row_device_id != device_id || row_sn != sn {
        ClosedAck::Foreign
    } else if row_state.is_open() {
        ClosedAck::LoadAndRetry
    } else {
        ClosedAck::Duplicate
    }
}

/// A bye counts only if it is not older than the device's latest hello: the last will is sealed
/// at CONNECT with the counter that the session's first hello then carries (docs/PROTOCOL.md
/// §5.6), so a will of an earlier session, published late, is below the hello that followed it.
pub(super) fn bye_counts(counter: u64, hello_counter: u64) -> bool {
    counter >= hello_counter
}

/// Doubling backoff for re-delivery to an online device: 15 s, 30 s, … up to [`RETRY_MAX_MS`].
pub(super) fn retry_backoff_ms(initial_ms: i64, sends: u32) -> i64 {
    let doublings = sends.saturating_sub(1).min(16);
    (initial_ms << doublings).min(RETRY_MAX_MS)
}

/// Whether a download sent before is due again at `ticks` ([`Clock::ticks_ms`]).
pub(super) fn due_for_retry(e: &OpenExecution, ticks: i64, initial_ms: i64) -> bool {
    e.last_sent.is_some_and(|at| ticks - at >= retry_backoff_ms(initial_ms, e.sends))
}

/// Why a download is sent now, which decides whether its backoff applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendReason {
    /// The device said hello (or a task was just created for an online device): everything open
    /// goes out at once.
    Presence,
    /// A retry sweep: only the downloads whose backoff elapsed.
    Retry,
}

/// Whether this open execution is sent to its device now.
pub(super) fn deliverable(
    e: &OpenExecution,
    now: Millis,
    generation: i64,
    reason: SendReason,
    ticks: i64,
    initial_ms: i64,
) -> bool {
    if e.deadline <= now || e.generation != generation {
        // Expired (the sweep records it), or wrapped for an older initialisation (re-wrapped on
        // the next hello).
        return false;
    }
    match reason {
        SendReason::Presence => true,
        SendReason::Retry => e.last_sent.is_none() || due_for_retry(e, ticks, initial_ms),
    }
}

/// Why a device is not ready, in the order the portal shows them.
pub(super) fn readiness(d: &DeviceRow, key_source: Option<i64>, pending: bool) -> Vec<NotReady> {
    let mut reasons = Vec::new();
    if !d.initialised {
        reasons.push(NotReady::NotInitialised);
    }
    if d.locked {
        reasons.push(NotReady::Locked);
    }
    match (d.assigned_key_source, key_source) {
        (None, _) => reasons.push(NotReady::Unassigned),
        (Some(a), Some(k)) if a != k => reasons.push(NotReady::Unassigned),
        _ => {}
    }
    if pending {
        reasons.push(NotReady::TaskPending);
    }
    if d.debug_mode || d.debug_key_present {
        reasons.push(NotReady::DebugKeyPresent);
    }
    match (&d.model, &d.rom_version, &d.app_version, &d.region) {
        (Some(model), Some(rom), Some(app), Some(region)) => {
            let region = Region::parse(region).unwrap_or(Region::Eu);
            match firmware_refusal(model, rom, app, region) {
                Some(TerminalError::RomTooOld) => reasons.push(NotReady::RomTooOld),
                Some(TerminalError::AppTooOld) => reasons.push(NotReady::AppTooOld),
                _ => {}
            }
        }
        _ => reasons.push(NotReady::NeverSeen),
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ExecutionState::*;

    const SN: &str = "SN0001";

    fn open(id: i64, kcv: &str) -> OpenExecution {
        OpenExecution {
            id,
            org_id: 1,
            key_source_id: 1,
            slot: 1,
            key_type: "IPEK".into(),
            key_block: String::new(),
            key_id: vec![1; 10],
            kcv: kcv.into(),
            generation: 1,
            created_at: 0,
            deadline: 1_000_000,
            last_sent: None,
            sends: 0,
            hello_at: None,
        }
    }

    fn ack(id: u64, kcv: Vec<u8>, result: i32) -> message::Ack {
        message::Ack {
            execution_id: id,
            result,
            slot: KeySlot(1),
            key_id: vec![1; 10],
            kcv,
            injection: InjectionType::Auto,
        }
    }

    fn hello() -> message::Hello {
        message::Hello {
            model: "A920".into(),
            rom_version: "1".into(),
            app_version: "1".into(),
            region: Region::Eu,
            debug_mode: false,
            locked: false,
            slots: vec![],
        }
    }

    fn key(byte: u8) -> MacKey {
        MacKey::new(rki_protocol::secret::SecretBytes::from_vec(vec![byte; 32])).expect("key")
    }

    fn sealed(key: &MacKey, party: &str, counter: u64, message: Message) -> Vec<u8> {
        frame::seal(key, &Body { party: party.into(), counter, message }).expect("seal")
    }

    #[test]
    fn every_transition_is_the_one_the_domain_allows() {
        // The whole table: only an open execution changes, and only to another open state or
        // to an ending; nothing ever becomes queued again.
        for from in ExecutionState::ALL {
            for to in ExecutionState::ALL {
                let expected = matches!(from, Queued | Delivered) && to != Queued;
                assert_eq!(from.can_become(to), expected, "{from} -> {to}");
            }
        }
        // Both ack outcomes are endings an open execution may take, and nothing else may.
        let matched = check_ack(&open(1, "AABBCC"), &ack(1, vec![0xAA, 0xBB, 0xCC], 0)).expect("matches");
        let failed = check_ack(&open(1, "AABBCC"), &ack(1, vec![], -3000)).expect("an error code");
        for outcome in [matched, failed] {
            assert!(Queued.can_become(outcome.state()) && Delivered.can_become(outcome.state()));
            for ended in [Succeeded, Failed, Expired, Terminated] {
                assert!(!ended.can_become(outcome.state()), "{ended} -> {}", outcome.state());
            }
        }
        assert_eq!(matched.state(), Succeeded);
        assert_eq!(failed, AckOutcome::Failed { result: -3000 });
        assert_eq!(failed.state(), ExecutionState::Failed);
    }

    #[test]
    fn a_success_needs_the_slot_the_key_id_and_the_kcv() {
        let e = open(1, "AABBCC");
        assert!(check_ack(&e, &ack(1, vec![0xAA, 0xBB, 0xCC], 0)).expect("matches").succeeded());
        // A 5-byte KCV whose first three bytes match is the same check value.
        assert!(check_ack(&e, &ack(1, vec![0xAA, 0xBB, 0xCC, 0x01, 0x02], 0)).expect("matches").succeeded());
        assert_eq!(check_ack(&e, &ack(1, vec![0xAA, 0xBB, 0xCD], 0)), Err(Rejection::KcvMismatch));
        assert_eq!(check_ack(&e, &ack(1, vec![], 0)), Err(Rejection::KcvMismatch));
        let mut other_key = ack(1, vec![0xAA, 0xBB, 0xCC], 0);
        other_key.key_id = vec![2; 10];
        assert_eq!(check_ack(&e, &other_key), Err(Rejection::KeyIdMismatch));
        let mut other_slot = ack(1, vec![0xAA, 0xBB, 0xCC], 0);
        other_slot.slot = KeySlot(4);
        assert_eq!(check_ack(&e, &other_slot), Err(Rejection::SlotMismatch));
        // An error code needs no KCV, but still the slot.
        assert_eq!(check_ack(&e, &ack(1, vec![], -11208)), Ok(AckOutcome::Failed { result: -11208 }));
        let mut failed_elsewhere = ack(1, vec![], -1);
        failed_elsewhere.slot = KeySlot(8);
        assert_eq!(check_ack(&e, &failed_elsewhere), Err(Rejection::SlotMismatch));
    }

    #[test]
    fn a_frame_under_another_key_is_a_bad_mac() {
        let frame = sealed(&key(1), SN, 10, Message::Hello(hello()));
        let unverified = open_frame(SN, &frame).expect("decodes");
        assert_eq!(verify(unverified, &key(2)).err(), Some(Rejection::BadMac));
        let verified = verify(open_frame(SN, &frame).expect("decodes"), &key(1)).expect("verifies");
        assert_eq!(verified.body.counter, 10);
        // One flipped bit of the tag.
        let mut forged = frame.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(verify(open_frame(SN, &forged).expect("decodes"), &key(1)).err(), Some(Rejection::BadMac));
    }

    #[test]
    fn a_frame_for_another_device_or_not_a_frame_is_refused_before_any_key() {
        let frame = sealed(&key(1), "SN0002", 10, Message::Hello(hello()));
        assert_eq!(open_frame(SN, &frame).err(), Some(("hello", Rejection::PartyMismatch)));
        assert!(matches!(open_frame(SN, b"\x01\x05junk").err(), Some(("device", Rejection::Frame(_)))));
    }

    #[test]
    fn an_old_counter_is_a_replay_but_a_bye_is_not_counter_checked() {
        let body = |counter, message| Body { party: SN.into(), counter, message };
        for message in [
            Message::Hello(hello()),
            Message::Ack(ack(1, vec![], -1)),
            Message::DeviceRefusal(message::DeviceRefusal {
                refused_counter: 5,
                accepted_counter: 6,
                frame: RefusedFrame::Download { execution_id: 1 },
                code: RefusalCode::Replay,
            }),
        ] {
            // Equal to the last accepted counter, or below it: a replay.
            assert_eq!(classify(body(10, message.clone()), 10).err(), Some(Rejection::Replay));
            assert_eq!(classify(body(9, message.clone()), 10).err(), Some(Rejection::Replay));
            assert!(classify(body(11, message), 10).is_ok());
        }
        assert!(matches!(classify(body(1, Message::Bye), 10), Ok(DeviceMessage::Bye { counter: 1 })));
        // A message that travels down is not accepted up.
        let unlock = Message::Unlock(message::Unlock { unlock_id: 1 });
        assert_eq!(classify(body(11, unlock), 10).err(), Some(Rejection::WrongTopic));
    }

    #[test]
    fn a_late_will_does_not_mark_a_newer_session_offline() {
        assert!(bye_counts(20, 20));
        assert!(bye_counts(u64::MAX, 20));
        assert!(!bye_counts(19, 20));
    }

    #[test]
    fn an_ack_of_an_execution_not_open_here_is_decided_by_its_row() {
        let open_here = vec![open(1, "AABBCC"), open(2, "DDEEFF")];
        assert!(matches!(
            decide_ack(&open_here, &ack(2, vec![0xDD, 0xEE, 0xFF], 0)),
            AckDecision::End { index: 1, outcome: AckOutcome::Succeeded(_) }
        ));
        assert_eq!(
            decide_ack(&open_here, &ack(2, vec![0xAA, 0xBB, 0xCC], 0)),
            AckDecision::Reject(Rejection::KcvMismatch)
        );
        assert_eq!(decide_ack(&open_here, &ack(3, vec![0xAA, 0xBB, 0xCC], 0)), AckDecision::NotOpenHere);
        // Execution 3 belongs to another device (or to this SN's earlier registration).
        assert_eq!(decide_closed_ack(8, "SN0002", Delivered, 7, SN), ClosedAck::Foreign);
        assert_eq!(decide_closed_ack(8, SN, Succeeded, 7, SN), ClosedAck::Foreign);
        assert_eq!(decide_closed_ack(7, SN, Succeeded, 7, SN), ClosedAck::Duplicate);
        assert_eq!(decide_closed_ack(7, SN, Terminated, 7, SN), ClosedAck::Duplicate);
        assert_eq!(decide_closed_ack(7, SN, Queued, 7, SN), ClosedAck::LoadAndRetry);
    }

    #[test]
    fn retries_double_on_the_adjustable_clock_up_to_the_cap() {
        let clock = Clock::adjustable();
        let initial = RETRY_INITIAL_MS;
        let mut e = open(1, "AABBCC");
        // Never sent: a retry sweep sends it at once; a presence always does.
        assert!(deliverable(&e, 0, 1, SendReason::Retry, clock.ticks_ms(), initial));
        e.last_sent = Some(clock.ticks_ms());
        e.sends = 1;
        assert!(!due_for_retry(&e, clock.ticks_ms(), initial));
        assert!(deliverable(&e, 0, 1, SendReason::Presence, clock.ticks_ms(), initial));
        clock.advance(initial - 1_000).expect("advance");
        assert!(!due_for_retry(&e, clock.ticks_ms(), initial));
        clock.advance(1_000).expect("advance");
        assert!(due_for_retry(&e, clock.ticks_ms(), initial));
        assert!(deliverable(&e, 0, 1, SendReason::Retry, clock.ticks_ms(), initial));
        // Sent again: the next one waits twice as long.
        e.last_sent = Some(clock.ticks_ms());
        e.sends = 2;
        clock.advance(initial).expect("advance");
        assert!(!due_for_retry(&e, clock.ticks_ms(), initial));
        clock.advance(initial).expect("advance");
        assert!(due_for_retry(&e, clock.ticks_ms(), initial));
        assert_eq!(retry_backoff_ms(initial, 1), initial);
        assert_eq!(retry_backoff_ms(initial, 3), 4 * initial);
        assert_eq!(retry_backoff_ms(initial, 100), RETRY_MAX_MS);
        assert_eq!(retry_backoff_ms(initial, u32::MAX), RETRY_MAX_MS);
    }

    #[test]
    fn an_expired_or_outdated_download_is_not_sent() {
        let e = open(1, "AABBCC");
        assert!(!deliverable(&e, e.deadline, 1, SendReason::Presence, 0, RETRY_INITIAL_MS));
        assert!(deliverable(&e, e.deadline - 1, 1, SendReason::Presence, 0, RETRY_INITIAL_MS));
        // Wrapped for the device's first initialisation; it has initialised again since.
        assert!(!deliverable(&e, 0, 2, SendReason::Presence, 0, RETRY_INITIAL_MS));
    }
}
