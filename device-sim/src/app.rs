//! The terminal's key-injection app: what it accepts from the gateway and what it decides. Pure:
//! no I/O, no clock, no MQTT. [`crate::device`] feeds it frames and carries out its decisions.
//!
//! Receiving is two steps, as in the protocol crate: [`accept_down_frame`] decodes, checks the
//! party, verifies the tag under the key the message needs and checks the replay counter, and only
//! then hands out a [`DownCommand`]; a refused frame changes nothing but a counter.

use rki_protocol::frame::{self, MacKey};
use rki_protocol::init::DeviceSecrets;
use rki_protocol::message::{Ack, Download, Message, Refusal, SlotStatus, Unlock};
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
pub fn accept_down_frame(
    state: &TerminalState,
    bytes: &[u8],
) -> Result<(DownCommand, Option<u64>), Rejection> {
    let unverified = frame::open(bytes).map_err(|_| Rejection::Malformed)?;
    if unverified.peek().party != state.sn {
        return Err(Rejection::ForeignParty);
    }
    let secrets = state.secrets.as_ref();
    match &unverified.peek().message {
        Message::Refusal(_) => {
            // Under the signing key if the gateway knows us, else under the public refusal key.
            // `verify` consumes the frame, so the signing-key trial opens the bytes a second time.
            let by_signing_key = secrets.and_then(|s| {
                frame::open(bytes)
                    .ok()
                    .and_then(|u| u.verify(&s.signing_key).ok())
            });
            let verified = match by_signing_key {
                Some(verified) => verified,
                None => unverified
                    .verify(&MacKey::public_refusal_key())
                    .map_err(|_| Rejection::BadTag)?,
            };
            match verified.body.message {
                Message::Refusal(refusal) => Ok((DownCommand::Refusal(refusal), None)),
                _ => Err(Rejection::Unexpected),
            }
        }
        Message::Download(_) | Message::Unlock(_) => {
            let secrets = secrets.ok_or(Rejection::BadTag)?;
            let verified = unverified
                .verify(&secrets.signing_key)
                .map_err(|_| Rejection::BadTag)?;
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
pub fn decide(
    state: &TerminalState,
    download: &Download,
    forced_failure: Option<TerminalError>,
) -> Decision {
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
fn check_and_unwrap(
    state: &TerminalState,
    download: &Download,
) -> Result<SlotStatus, TerminalError> {
    if !download.slot.is_writable_by_rki() {
        return Err(TerminalError::SlotNotWritable);
    }
    if let Some(error) = firmware_refusal(
        state.model.name(),
        &state.rom_version,
        &state.app_version,
        state.region,
    ) {
        return Err(error);
    }
    if state.debug_mode || state.has_debug_key() {
        return Err(TerminalError::DebugKeyPresent);
    }
    if state.locked {
        return Err(TerminalError::DeviceLocked);
    }
    let secrets = state
        .secrets
        .as_ref()
        .ok_or(TerminalError::KeyRecordNotFound)?;
    let kcv = unwrap_and_check(secrets, download).ok_or(TerminalError::KeyRecordNotFound)?;
    Ok(SlotStatus {
        slot: download.slot,
        key_type: download.key_type,
        key_id: download.key_id.clone(),
        kcv,
    })
}

/// Unwraps the key block under the KBPK its version calls for, checks the usage is a DUKPT
/// initial key and that the key's check value is the one announced (in constant time). Returns
/// the 3-byte KCV; the clear key is dropped (and zeroized) here.
fn unwrap_and_check(secrets: &DeviceSecrets, download: &Download) -> Option<Vec<u8>> {
    let version = download
        .key_block
        .bytes()
        .next()
        .and_then(Version::from_byte)?;
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
    let download = state
        .kept_download
        .clone()
        .ok_or(ForceError::NothingToForce)?;
    let record = check_and_unwrap(state, &download).map_err(ForceError::Refused)?;
    let decision = Decision::Install(record.clone());
    let ack = decision.ack(&download, InjectionType::Manual);
    state.install(record);
    state.locked = true;
    state.kept_download = None;
    state.record_answer(ack.clone());
    Ok(ack)
}
