//! The terminal's key-injection app: what it accepts from the gateway and what it decides. Pure:
//! no I/O, no clock, no MQTT. [`crate::device`] feeds it frames and carries out its decisions.
//!
//! Receiving is two steps, as in the protocol crate: [`accept_down_frame`] decodes, checks the
//! party, verifies the tag under the key the message needs and checks the replay counter, and only
//! then hands out a [`DownCommand`]; a refused frame changes nothing but a counter.

use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::DeviceSecrets;
use rki_protocol::message::{
    Ack, DeviceRefusal, Download, Message, Refusal, RefusalCode, RefusedFrame, SlotStatus, Unlock,
};
use rki_protocol::secret::ct_eq;
use rki_protocol::terminal::{firmware_refusal, InjectionType, TerminalError};
use rki_protocol::tr31::{self, Version};
use rki_protocol::{KcvLen, SymmetricKey};

use crate::state::TerminalState;

/// The TR-31 key usage of a DUKPT initial key, the only usage the app installs.
const KEY_USAGE_DUKPT_INITIAL_KEY: [u8; 2] = *b"B1";

/// Why a down frame was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    BadTag,
    ForeignParty,
    Replay,
    /// A message that has no business on the down topic now (e.g. a hello, or a CreateKeyAnswer
    /// outside an initialisation).
    Unexpected,
}

/// A down frame that passed every check, with the verified counter to record.
#[derive(Debug)]
pub enum DownCommand {
    Download(Download),
    Unlock(Unlock),
    /// Informational: counted, changes no state, so it may come under the public refusal key
    /// and is not counter-checked.
    Refusal(Refusal),
}

/// Decodes and checks a frame from the down topic. On success the caller must record the
/// returned counter (for a download or an unlock) as the last accepted down counter.
pub fn accept_down_frame(state: &TerminalState, bytes: &[u8]) -> Result<(DownCommand, Option<u64>), Rejection> {
    let unverified = frame::open(bytes).map_err(|_| Rejection::Malformed)?;
    if unverified.peek().party != state.sn {
        return Err(Rejection::ForeignParty);
    }
    let secrets = state.secrets.as_ref();
    match &unverified.peek().message {
        Message::Refusal(_) => {
            // Under the signing key if the gateway knows us, else under the public refusal key.
            // `verify` consumes the frame, so the signing-key trial opens the bytes a second time.
            let by_signing_key =
                secrets.and_then(|s| frame::open(bytes).ok().and_then(|u| u.verify(&s.signing_key).ok()));
            let verified = match by_signing_key {
                Some(verified) => verified,
                None => unverified.verify(&MacKey::public_refusal_key()).map_err(|_| Rejection::BadTag)?,
            };
            match verified.body.message {
                Message::Refusal(refusal) => Ok((DownCommand::Refusal(refusal), None)),
                _ => Err(Rejection::Unexpected),
            }
        }
        Message::Download(_) | Message::Unlock(_) => {
            let secrets = secrets.ok_or(Rejection::BadTag)?;
            let verified = unverified.verify(&secrets.signing_key).map_err(|_| Rejection::BadTag)?;
            let counter = verified.body.counter;
            if counter <= state.last_down_counter {
                return Err(Rejection::Replay);
            }
            match verified.body.message {
                Message::Download(download) => Ok((DownCommand::Download(download), Some(counter))),
                Message::Unlock(unlock) => Ok((DownCommand::Unlock(unlock), Some(counter))),
                _ => Err(Rejection::Unexpected),
            }
        }
        _ => Err(Rejection::Unexpected),
    }
}

/// The signed refusal a terminal sends for a down frame refused as a replay: a `Download` or an
/// `Unlock` whose tag verified under its signing key but whose counter is not above the last one it
/// accepted. `None` for anything else: a frame that does not verify proves nothing about who sent
/// it, and answering it would give a forger an oracle.
pub fn replay_refusal(state: &TerminalState, bytes: &[u8]) -> Option<DeviceRefusal> {
    let unverified = frame::open(bytes).ok()?;
    if unverified.peek().party != state.sn {
        return None;
    }
    let verified = unverified.verify(&state.secrets.as_ref()?.signing_key).ok()?;
    let refused_counter = verified.body.counter;
    if refused_counter > state.last_down_counter {
        return None;
    }
    let frame = match verified.body.message {
        Message::Download(d) => RefusedFrame::Download { execution_id: d.execution_id },
        Message::Unlock(u) => RefusedFrame::Unlock { unlock_id: u.unlock_id },
        _ => return None,
    };
    Some(DeviceRefusal { refused_counter, accepted_counter: state.last_down_counter, frame, code: RefusalCode::Replay })
}

/// What the app decides about a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already answered: send the same ack again. Never inject twice.
    Duplicate(Ack),
    /// Refused with a terminal error code.
    Refused(TerminalError),
    /// Install this key record.
    Install(SlotStatus),
}

impl Decision {
    /// The ack this decision answers the download with.
    pub fn ack(&self, download: &Download, injection: InjectionType) -> Ack {
        match self {
            Decision::Duplicate(ack) => ack.clone(),
            Decision::Refused(error) => Ack {
                execution_id: download.execution_id,
                result: error.code(),
                slot: download.slot,
                key_id: Vec::new(),
                kcv: Vec::new(),
                injection,
            },
            Decision::Install(record) => Ack {
                execution_id: download.execution_id,
                result: 0,
                slot: record.slot,
                key_id: record.key_id.clone(),
                kcv: record.kcv.clone(),
                injection,
            },
        }
    }
}

/// Decides on a download, in the terminal's order: a duplicate is answered as before; then the
/// slot, the firmware, debug mode or a debug key, the lock, and finally the key block itself.
/// `forced_failure` (a test knob) overrides everything but the duplicate check.
pub fn decide(state: &TerminalState, download: &Download, forced_failure: Option<TerminalError>) -> Decision {
    if let Some(answer) = state.answered(download.execution_id) {
        return Decision::Duplicate(answer.ack.clone());
    }
    if let Some(error) = forced_failure {
        return Decision::Refused(error);
    }
    match check_and_unwrap(state, download) {
        Ok(record) => Decision::Install(record),
        Err(error) => Decision::Refused(error),
    }
}

/// Every check a download (auto or forced) must pass, in order, ending with the key block.
fn check_and_unwrap(state: &TerminalState, download: &Download) -> Result<SlotStatus, TerminalError> {
    if !download.slot.is_writable_by_rki() {
        return Err(TerminalError::SlotNotWritable);
    }
    if let Some(error) = firmware_refusal(state.model.name(), &state.rom_version, &state.app_version, state.region) {
        return Err(error);
    }
    if state.debug_mode || state.has_debug_key() {
        return Err(TerminalError::DebugKeyPresent);
    }
    if state.locked {
        return Err(TerminalError::DeviceLocked);
    }
    let secrets = state.secrets.as_ref().ok_or(TerminalError::KeyRecordNotFound)?;
    let kcv = unwrap_and_check(secrets, download).ok_or(TerminalError::KeyRecordNotFound)?;
    Ok(SlotStatus { slot: download.slot, key_type: download.key_type, key_id: download.key_id.clone(), kcv })
}

/// Unwraps the key block under the KBPK its version calls for, checks the usage is a DUKPT
/// initial key and that the key's check value is the one announced (in constant time). Returns
/// the 3-byte KCV; the clear key is dropped (and zeroized) here.
fn unwrap_and_check(secrets: &DeviceSecrets, download: &Download) -> Option<Vec<u8>> {
    let version = download.key_block.bytes().next().and_then(Version::from_byte)?;
    let kbpk = match version {
        Version::D => &secrets.kbpk_aes,
        Version::B => &secrets.kbpk_tdes,
        // Legacy versions A and C are never shipped to this terminal.
        Version::A | Version::C => return None,
    };
    let (header, key) = tr31::unwrap(kbpk, &download.key_block).ok()?;
    if header.key_usage() != KEY_USAGE_DUKPT_INITIAL_KEY {
        return None;
    }
    let key = match header.algorithm() {
        b'T' => SymmetricKey::tdes(key).ok()?,
        b'A' => SymmetricKey::aes(key).ok()?,
        _ => return None,
    };
    let kcv = key.kcv(KcvLen::Three);
    ct_eq(kcv.as_bytes(), &download.kcv).then(|| kcv.as_bytes().to_vec())
}

/// Applies a decision to the state: installs the key (and locks the terminal) or keeps the
/// refused download for a manual injection, and records the ack. Returns the ack to send.
pub fn apply(state: &mut TerminalState, download: Download, decision: &Decision) -> Ack {
    let ack = decision.ack(&download, InjectionType::Auto);
    match decision {
        Decision::Duplicate(_) => return ack,
        Decision::Install(record) => {
            state.install(record.clone());
            state.locked = true;
            state.kept_download = None;
        }
        Decision::Refused(_) => state.kept_download = Some(download),
    }
    state.record_answer(ack.clone());
    ack
}

/// Why a manual injection did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForceError {
    #[error("no refused download is kept on the terminal: nothing to force")]
    NothingToForce,
    #[error("the kept download cannot be forced: {0}")]
    Refused(TerminalError),
}

/// Forces the kept (refused) download locally, as a technician does from the key-injection app.
/// On success the key is installed, the terminal locked, and the execution's ack replaced by a
/// manual one, to be sent; on failure nothing changes.
pub fn force_manual(state: &mut TerminalState) -> Result<Ack, ForceError> {
    let download = state.kept_download.clone().ok_or(ForceError::NothingToForce)?;
    let record = check_and_unwrap(state, &download).map_err(ForceError::Refused)?;
    let decision = Decision::Install(record.clone());
    let ack = decision.ack(&download, InjectionType::Manual);
    state.install(record);
    state.locked = true;
    state.kept_download = None;
    state.record_answer(ack.clone());
    Ok(ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceProfile;
    use rki_protocol::dukpt::derive_ipek;
    use rki_protocol::dukpt::tdes::Ksn;
    use rki_protocol::init::{derive_device_secrets, Ephemeral, Gudid};
    use rki_protocol::message::Body;
    use rki_protocol::terminal::{KeySlot, KeyType, Model};
    use rki_protocol::tr31::{DukptInitialKeyId, Header};

    fn terminal() -> TerminalState {
        let profile = DeviceProfile::new("APP0001", Model::P3).expect("profile");
        let mut state = TerminalState::factory(&profile);
        let gudid = Gudid::random().expect("gudid");
        let (a, b) = (Ephemeral::random().expect("a"), Ephemeral::random().expect("b"));
        state.secrets = Some(derive_device_secrets(a, &b.public(), &gudid.mac_key(), b"c", b"a").expect("secrets"));
        state
    }

    fn download(state: &TerminalState, execution_id: u64, slot: KeySlot) -> Download {
        let bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
        let ksn = Ksn::from_hex("FFFF9876543210E00000").expect("ksn");
        let ipek = derive_ipek(&bdk, &ksn).expect("ipek");
        let kcv = ipek.kcv(KcvLen::Three);
        let header = Header::dukpt_initial_key(Version::B, DukptInitialKeyId::Tdes(ksn), Some(&kcv)).expect("header");
        let kbpk = &state.secrets.as_ref().expect("secrets").kbpk_tdes;
        let block = tr31::wrap(kbpk, &header, ipek.secret(), &mut |b| b.fill(0x5A)).expect("wrap");
        Download {
            execution_id,
            slot,
            key_type: KeyType::Ipek,
            key_block: block,
            key_id: ksn.as_bytes().to_vec(),
            kcv: kcv.as_bytes().to_vec(),
        }
    }

    /// The terminal checks in a fixed order; with several causes present, the first one wins.
    #[test]
    fn refusals_follow_the_terminals_order_slot_firmware_debug_lock_key() {
        type Setup = fn(&mut TerminalState, &mut Download);
        let cases: [(&str, Setup, Option<TerminalError>); 9] = [
            ("all fine", |_, _| {}, None),
            (
                "reserved slot, with everything else wrong too",
                |s, d| {
                    d.slot = KeySlot::HARDWARE_CERTIFICATE;
                    s.rom_version = "1.0.0".into();
                    s.debug_mode = true;
                    s.locked = true;
                    d.kcv[0] ^= 1;
                },
                Some(TerminalError::SlotNotWritable),
            ),
            (
                "old ROM before debug and lock",
                |s, _| {
                    s.rom_version = "3.0.14".into();
                    s.debug_mode = true;
                    s.locked = true;
                },
                Some(TerminalError::RomTooOld),
            ),
            (
                "old app before debug",
                |s, _| {
                    s.app_version = "1.5.0".into();
                    s.debug_mode = true;
                },
                Some(TerminalError::AppTooOld),
            ),
            ("unparsable ROM is too old", |s, _| s.rom_version = "latest".into(), Some(TerminalError::RomTooOld)),
            (
                "debug before lock",
                |s, _| {
                    s.debug_mode = true;
                    s.locked = true;
                },
                Some(TerminalError::DebugKeyPresent),
            ),
            (
                "lock before the key block",
                |s, d| {
                    s.locked = true;
                    d.kcv[0] ^= 1;
                },
                Some(TerminalError::DeviceLocked),
            ),
            (
                "legacy version A block",
                |_, d| d.key_block.replace_range(0..1, "A"),
                Some(TerminalError::KeyRecordNotFound),
            ),
            ("short KCV", |_, d| d.kcv.truncate(2), Some(TerminalError::KeyRecordNotFound)),
        ];
        for (name, setup, expected) in cases {
            let mut state = terminal();
            let mut download = download(&state, 1, KeySlot::PRODUCTION);
            setup(&mut state, &mut download);
            let decision = decide(&state, &download, None);
            match expected {
                None => assert!(matches!(decision, Decision::Install(_)), "{name}: {decision:?}"),
                Some(error) => assert_eq!(decision, Decision::Refused(error), "{name}"),
            }
        }
    }

    #[test]
    fn an_installed_key_locks_the_terminal_and_a_redelivery_is_a_duplicate() {
        let mut state = terminal();
        let download = download(&state, 7, KeySlot::PRODUCTION);
        let decision = decide(&state, &download, None);
        let ack = apply(&mut state, download.clone(), &decision);
        assert_eq!(ack.result, 0);
        assert_eq!(ack.kcv, download.kcv);
        assert!(state.locked);
        // Locked now, but the same execution is answered as before, not refused.
        assert_eq!(decide(&state, &download, None), Decision::Duplicate(ack.clone()));
        assert_eq!(decide(&state, &download, Some(TerminalError::DeviceLocked)), Decision::Duplicate(ack));
        let mut other = download;
        other.execution_id = 8;
        assert_eq!(decide(&state, &other, None), Decision::Refused(TerminalError::DeviceLocked));
    }

    #[test]
    fn a_refused_download_is_kept_and_forcing_it_needs_the_cause_gone() {
        let mut state = terminal();
        state.debug_mode = true;
        let download = download(&state, 9, KeySlot::PRODUCTION);
        let decision = decide(&state, &download, None);
        apply(&mut state, download, &decision);
        assert_eq!(force_manual(&mut state), Err(ForceError::Refused(TerminalError::DebugKeyPresent)));
        state.debug_mode = false;
        let ack = force_manual(&mut state).expect("forced");
        assert_eq!((ack.result, ack.injection), (0, InjectionType::Manual));
        assert_eq!(state.answered(9).map(|a| a.ack.clone()), Some(ack));
        assert_eq!(force_manual(&mut state), Err(ForceError::NothingToForce));
    }

    #[test]
    fn down_frames_need_the_signing_key_the_own_party_and_a_fresh_counter() {
        let mut state = terminal();
        let key = state.secrets.as_ref().expect("secrets").signing_key.clone_secret();
        let body = |party: &str, counter| Body {
            party: party.into(),
            counter,
            message: Message::Unlock(Unlock { unlock_id: 1 }),
        };
        let seal = |key: &MacKey, body: &Body| frame::seal(key, body).expect("seal");
        state.last_down_counter = 10;
        let good = seal(&key, &body("APP0001", 11));
        assert!(matches!(accept_down_frame(&state, &good), Ok((DownCommand::Unlock(_), Some(11)))));
        let cases = [
            (seal(&key, &body("APP0001", 10)), Rejection::Replay),
            (seal(&key, &body("APP0002", 11)), Rejection::ForeignParty),
            (seal(&MacKey::public_refusal_key(), &body("APP0001", 11)), Rejection::BadTag),
            (vec![1, 2, 3], Rejection::Malformed),
        ];
        for (bytes, rejection) in cases {
            assert_eq!(accept_down_frame(&state, &bytes).err(), Some(rejection));
        }
        // Before initialisation there is no key a download or unlock could verify under.
        state.secrets = None;
        assert_eq!(accept_down_frame(&state, &good).err(), Some(Rejection::BadTag));
    }

    #[test]
    fn only_a_verified_replay_gets_a_signed_refusal_naming_the_frame() {
        let mut state = terminal();
        let key = state.secrets.as_ref().expect("secrets").signing_key.clone_secret();
        state.last_down_counter = 10;
        let unlock = |party: &str, counter| {
            let body = Body { party: party.into(), counter, message: Message::Unlock(Unlock { unlock_id: 5 }) };
            frame::seal(&key, &body).expect("seal")
        };
        let refusal = replay_refusal(&state, &unlock("APP0001", 9)).expect("a replay is refused with a reason");
        assert_eq!(
            refusal,
            DeviceRefusal {
                refused_counter: 9,
                accepted_counter: 10,
                frame: RefusedFrame::Unlock { unlock_id: 5 },
                code: RefusalCode::Replay
            }
        );
        let d = download(&state, 12, KeySlot::PRODUCTION);
        let body = Body { party: "APP0001".into(), counter: 10, message: Message::Download(d) };
        let refused = replay_refusal(&state, &frame::seal(&key, &body).expect("seal")).expect("refused");
        assert_eq!(refused.frame, RefusedFrame::Download { execution_id: 12 });
        // A fresh frame, another party's, or one under another key gets no answer.
        assert_eq!(replay_refusal(&state, &unlock("APP0001", 11)), None);
        assert_eq!(replay_refusal(&state, &unlock("APP0002", 9)), None);
        let forged = Body { party: "APP0001".into(), counter: 9, message: Message::Unlock(Unlock { unlock_id: 5 }) };
        assert_eq!(replay_refusal(&state, &frame::seal(&MacKey::public_refusal_key(), &forged).expect("seal")), None);
    }
}
