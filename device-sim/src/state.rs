//! What a terminal keeps across a power cycle ([`TerminalState`]), and how it is stored.
//!
//! The domain type holds the device secrets in their secret types. The storage type
//! ([`StoredState`]) is the only one with serde derives: it carries secrets as hex strings that are
//! zeroized on drop, and exists only for the time of a read or a write.
//!
//! No clear key bytes are stored: a key slot holds the key's type, key ID (KSN) and KCV, the
//! record a terminal's "Key Query" screen shows. The state file stands in for the terminal's
//! secure element (it holds the signing key and the key-block protection keys), so it is written
//! with mode 0600.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rki_protocol::frame::MacKey;
use rki_protocol::init::DeviceSecrets;
use rki_protocol::message::{Ack, Download, SlotStatus};
use rki_protocol::terminal::{InjectionType, KeySlot, KeyType, Model, Region};
use rki_protocol::{KeyAlgorithm, SecretBytes, SymmetricKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::config::DeviceProfile;

/// Executions whose ack the terminal remembers, to answer a duplicate delivery with the same ack.
/// The oldest confirmed ones are forgotten first; an execution redelivered after that many newer
/// ones would be treated as new (and refused as locked if a key went on since).
pub const ANSWERED_EXECUTIONS_MAX: usize = 64;
/// Key-slot records a terminal holds (the protocol's hello limit).
pub const SLOTS_MAX: usize = rki_protocol::message::limits::SLOTS_MAX;
/// The version of the state file format.
const STATE_FORMAT: u32 = 1;
/// A state file larger than this is not ours.
const STATE_FILE_LEN_MAX: u64 = 256 * 1024;

/// The key ID of the debug key a factory profile can place in slot 8.
const DEBUG_KEY_ID: [u8; 10] = [0xFF, 0xFF, 0x98, 0x76, 0x54, 0x32, 0x10, 0xE0, 0x00, 0x00];
/// Its KCV (the TDES test key 0123456789ABCDEFFEDCBA9876543210).
const DEBUG_KEY_KCV: [u8; 3] = [0x08, 0xD7, 0xB4];

/// One execution the terminal answered, and whether the broker confirmed its ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsweredExecution {
    pub ack: Ack,
    /// The broker acknowledged (PUBACK) a publish of this ack. Until then it is re-sent after
    /// every hello.
    pub confirmed: bool,
}

/// What survives a power cycle.
#[derive(Debug)]
pub struct TerminalState {
    pub sn: String,
    pub model: Model,
    pub rom_version: String,
    pub app_version: String,
    pub region: Region,
    pub x_pos_device_id: String,
    pub debug_mode: bool,
    pub locked: bool,
    /// Occupied slots, sorted by slot, one record per slot.
    pub slots: Vec<SlotStatus>,
    pub secrets: Option<DeviceSecrets>,
    /// The last up-frame counter used (see [`crate::counter::UpCounter`]).
    pub last_up_counter: u64,
    /// The last down-frame counter accepted; a down frame must carry a higher one.
    pub last_down_counter: u64,
    /// Oldest first, at most [`ANSWERED_EXECUTIONS_MAX`].
    pub answered: VecDeque<AnsweredExecution>,
    /// The last refused download, kept so a technician can force it locally.
    pub kept_download: Option<Download>,
}

impl TerminalState {
    /// The state of a terminal fresh from the factory.
    pub fn factory(profile: &DeviceProfile) -> Self {
        let mut slots = Vec::new();
        if profile.debug_key() {
            slots.push(SlotStatus {
                slot: KeySlot::DEBUG,
                key_type: KeyType::Ipek,
                key_id: DEBUG_KEY_ID.to_vec(),
                kcv: DEBUG_KEY_KCV.to_vec(),
            });
        }
        Self {
            sn: profile.sn().to_string(),
            model: profile.model(),
            rom_version: profile.rom_version().to_string(),
            app_version: profile.app_version().to_string(),
            region: profile.region(),
            x_pos_device_id: profile.x_pos_device_id().to_string(),
            debug_mode: profile.debug_mode(),
            locked: profile.is_locked(),
            slots,
            secrets: None,
            last_up_counter: 0,
            last_down_counter: 0,
            answered: VecDeque::new(),
            kept_download: None,
        }
    }

    pub fn slot(&self, slot: KeySlot) -> Option<&SlotStatus> {
        self.slots.iter().find(|s| s.slot == slot)
    }

    /// Puts a key record in its slot, replacing what was there.
    pub fn install(&mut self, record: SlotStatus) {
        self.slots.retain(|s| s.slot != record.slot);
        self.slots.push(record);
        self.slots.sort_by_key(|s| s.slot);
        debug_assert!(self.slots.len() <= SLOTS_MAX);
    }

    /// Empties a slot; whether it held a key.
    pub fn reset_slot(&mut self, slot: KeySlot) -> bool {
        let before = self.slots.len();
        self.slots.retain(|s| s.slot != slot);
        self.slots.len() != before
    }

    pub fn answered(&self, execution_id: u64) -> Option<&AnsweredExecution> {
        self.answered.iter().find(|a| a.ack.execution_id == execution_id)
    }

    /// Records the ack of an execution (replacing an earlier one for the same execution, as a
    /// manual injection does), unconfirmed. Forgets the oldest confirmed answers beyond the limit.
    pub fn record_answer(&mut self, ack: Ack) {
        self.answered.retain(|a| a.ack.execution_id != ack.execution_id);
        self.answered.push_back(AnsweredExecution { ack, confirmed: false });
        while self.answered.len() > ANSWERED_EXECUTIONS_MAX {
            match self.answered.iter().position(|a| a.confirmed) {
                Some(index) => {
                    self.answered.remove(index);
                }
                // Every remembered ack is still unconfirmed: keep them all rather than lose one.
                None => break,
            }
        }
    }

    /// Marks an execution's ack confirmed by the broker; whether it changed anything.
    pub fn confirm(&mut self, execution_id: u64) -> bool {
        match self.answered.iter_mut().find(|a| a.ack.execution_id == execution_id) {
            Some(answer) if !answer.confirmed => {
                answer.confirmed = true;
                true
            }
            _ => false,
        }
    }

    pub fn unconfirmed(&self) -> impl Iterator<Item = &Ack> {
        self.answered.iter().filter(|a| !a.confirmed).map(|a| &a.ack)
    }

    /// A debug key sits in slot 8.
    pub fn has_debug_key(&self) -> bool {
        self.slot(KeySlot::DEBUG).is_some()
    }

    /// Checks the invariants a stored state must hold; run before writing and after reading.
    pub fn check(&self) -> Result<(), String> {
        rki_protocol::topic::validate_name(&self.sn).map_err(|e| format!("sn: {e}"))?;
        if self.slots.len() > SLOTS_MAX {
            return Err(format!("{} slots, at most {SLOTS_MAX}", self.slots.len()));
        }
        if self.slots.windows(2).any(|w| w[0].slot >= w[1].slot) {
            return Err("slots are not sorted and unique".to_string());
        }
        let mut ids: Vec<u64> = self.answered.iter().map(|a| a.ack.execution_id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("an execution is answered twice".to_string());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Storage types: the state file's JSON. Secrets are hex strings, zeroized on drop.

#[derive(Serialize, Deserialize)]
struct StoredState {
    format: u32,
    sn: String,
    model: String,
    rom_version: String,
    app_version: String,
    region: Region,
    x_pos_device_id: String,
    debug_mode: bool,
    locked: bool,
    slots: Vec<StoredSlot>,
    secrets: Option<StoredSecrets>,
    last_up_counter: u64,
    last_down_counter: u64,
    answered: Vec<StoredAnswer>,
    kept_download: Option<StoredDownload>,
}

#[derive(Serialize, Deserialize)]
struct StoredSlot {
    slot: u16,
    key_type: KeyType,
    key_id: String,
    kcv: String,
}

/// The device secrets in hex. Zeroized on drop.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct StoredSecrets {
    signing_key: String,
    kbpk_aes: String,
    kbpk_tdes: String,
    /// Already ASCII hex: stored as is.
    mqtt_password: String,
}

#[derive(Serialize, Deserialize)]
struct StoredAnswer {
    execution_id: u64,
    result: i32,
    slot: u16,
    key_id: String,
    kcv: String,
    injection: InjectionType,
    confirmed: bool,
}

#[derive(Serialize, Deserialize)]
struct StoredDownload {
    execution_id: u64,
    slot: u16,
    key_type: KeyType,
    /// A TR-31 block: wrapped under the terminal's KBPK, not a clear key.
    key_block: String,
    key_id: String,
    kcv: String,
}

/// Why a stored state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not a valid terminal state: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no state for {sn} in {dir}")]
    Missing { sn: String, dir: PathBuf },
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|_| format!("{field} is not hex"))
}

impl StoredState {
    fn from_domain(state: &TerminalState) -> Self {
        let secrets = state.secrets.as_ref().map(|s| StoredSecrets {
            signing_key: hex::encode_upper(s.signing_key.expose_secret()),
            kbpk_aes: hex::encode_upper(s.kbpk_aes.expose_secret()),
            kbpk_tdes: hex::encode_upper(s.kbpk_tdes.expose_secret()),
            mqtt_password: String::from_utf8_lossy(s.mqtt_password.expose_secret()).into_owned(),
        });
        Self {
            format: STATE_FORMAT,
            sn: state.sn.clone(),
            model: state.model.name().to_string(),
            rom_version: state.rom_version.clone(),
            app_version: state.app_version.clone(),
            region: state.region,
            x_pos_device_id: state.x_pos_device_id.clone(),
            debug_mode: state.debug_mode,
            locked: state.locked,
            slots: state
                .slots
                .iter()
                .map(|s| StoredSlot {
                    slot: s.slot.0,
                    key_type: s.key_type,
                    key_id: hex::encode_upper(&s.key_id),
                    kcv: hex::encode_upper(&s.kcv),
                })
                .collect(),
            secrets,
            last_up_counter: state.last_up_counter,
            last_down_counter: state.last_down_counter,
            answered: state
                .answered
                .iter()
                .map(|a| StoredAnswer {
                    execution_id: a.ack.execution_id,
                    result: a.ack.result,
                    slot: a.ack.slot.0,
                    key_id: hex::encode_upper(&a.ack.key_id),
                    kcv: hex::encode_upper(&a.ack.kcv),
                    injection: a.ack.injection,
                    confirmed: a.confirmed,
                })
                .collect(),
            kept_download: state.kept_download.as_ref().map(|d| StoredDownload {
                execution_id: d.execution_id,
                slot: d.slot.0,
                key_type: d.key_type,
                key_block: d.key_block.clone(),
                key_id: hex::encode_upper(&d.key_id),
                kcv: hex::encode_upper(&d.kcv),
            }),
        }
    }

    fn into_domain(self) -> Result<TerminalState, String> {
        if self.format != STATE_FORMAT {
            return Err(format!("unknown format {}", self.format));
        }
        let model = Model::parse(&self.model).ok_or_else(|| format!("unknown model {:?}", self.model))?;
        let secrets = match &self.secrets {
            None => None,
            Some(s) => Some(secrets_from_hex(s)?),
        };
        let slots = self
            .slots
            .iter()
            .map(|s| {
                Ok(SlotStatus {
                    slot: KeySlot(s.slot),
                    key_type: s.key_type,
                    key_id: unhex("slot key_id", &s.key_id)?,
                    kcv: unhex("slot kcv", &s.kcv)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let answered = self
            .answered
            .iter()
            .map(|a| {
                Ok(AnsweredExecution {
                    ack: Ack {
                        execution_id: a.execution_id,
                        result: a.result,
                        slot: KeySlot(a.slot),
                        key_id: unhex("ack key_id", &a.key_id)?,
                        kcv: unhex("ack kcv", &a.kcv)?,
                        injection: a.injection,
                    },
                    confirmed: a.confirmed,
                })
            })
            .collect::<Result<VecDeque<_>, String>>()?;
        let kept_download = match &self.kept_download {
            None => None,
            Some(d) => Some(Download {
                execution_id: d.execution_id,
                slot: KeySlot(d.slot),
                key_type: d.key_type,
                key_block: d.key_block.clone(),
                key_id: unhex("download key_id", &d.key_id)?,
                kcv: unhex("download kcv", &d.kcv)?,
            }),
        };
        Ok(TerminalState {
            sn: self.sn.clone(),
            model,
            rom_version: self.rom_version.clone(),
            app_version: self.app_version.clone(),
            region: self.region,
            x_pos_device_id: self.x_pos_device_id.clone(),
            debug_mode: self.debug_mode,
            locked: self.locked,
            slots,
            secrets,
            last_up_counter: self.last_up_counter,
            last_down_counter: self.last_down_counter,
            answered,
            kept_download,
        })
    }
}

fn secrets_from_hex(stored: &StoredSecrets) -> Result<DeviceSecrets, String> {
    let secret =
        |field: &str, text: &str| SecretBytes::from_hex(text).map_err(|_| format!("secret {field} is not hex"));
    let signing_key =
        MacKey::new(secret("signing_key", &stored.signing_key)?).map_err(|e| format!("signing_key: {e}"))?;
    let kbpk_aes = SymmetricKey::new(KeyAlgorithm::Aes256, secret("kbpk_aes", &stored.kbpk_aes)?)
        .map_err(|e| format!("kbpk_aes: {e}"))?;
    let kbpk_tdes = SymmetricKey::new(KeyAlgorithm::Tdes3, secret("kbpk_tdes", &stored.kbpk_tdes)?)
        .map_err(|e| format!("kbpk_tdes: {e}"))?;
    if stored.mqtt_password.is_empty() || !stored.mqtt_password.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("mqtt_password is not ASCII hex".to_string());
    }
    let mqtt_password = SecretBytes::from_slice(stored.mqtt_password.as_bytes());
    Ok(DeviceSecrets { signing_key, kbpk_aes, kbpk_tdes, mqtt_password })
}

/// The state file of `sn` in `dir`.
pub fn state_path(dir: &Path, sn: &str) -> PathBuf {
    dir.join(format!("{sn}.state.json"))
}

/// Encodes a state for writing. The buffer holds secrets and is zeroized on drop.
pub(crate) fn encode(state: &TerminalState) -> Result<Zeroizing<Vec<u8>>, String> {
    state.check()?;
    let stored = StoredState::from_domain(state);
    let mut bytes = Zeroizing::new(Vec::with_capacity(2048));
    serde_json::to_writer_pretty(&mut *bytes, &stored).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Decodes a state file's bytes, and checks the state belongs to `sn`.
pub(crate) fn decode(bytes: &[u8], sn: &str) -> Result<TerminalState, String> {
    let stored: StoredState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let state = stored.into_domain()?;
    if state.sn != sn {
        return Err(format!("it belongs to {:?}", state.sn));
    }
    state.check()?;
    Ok(state)
}

/// Reads the state of `sn` from `dir`; `None` if there is none yet.
pub fn load_file(dir: &Path, sn: &str) -> Result<Option<TerminalState>, StorageError> {
    use std::io::Read;
    let path = state_path(dir, sn);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(STATE_FILE_LEN_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StorageError::Io { path: path.clone(), source })?;
    if bytes.len() as u64 > STATE_FILE_LEN_MAX {
        return Err(StorageError::Corrupt { path, reason: "too large".to_string() });
    }
    decode(&bytes, sn).map(Some).map_err(|reason| StorageError::Corrupt { path, reason })
}

/// Writes `bytes` as the state of `sn` in `dir`, atomically: a temporary file with mode 0600,
/// then a rename over the old file. A reader sees the old state or the new one, never a mix.
pub fn write_file(dir: &Path, sn: &str, bytes: &[u8], fsync: bool) -> Result<(), StorageError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_path(dir, sn);
    let temporary = dir.join(format!(".{sn}.state.json.tmp"));
    let io = |source| StorageError::Io { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    if fsync {
        file.sync_all().map_err(io)?;
    }
    drop(file);
    std::fs::rename(&temporary, &path).map_err(io)?;
    if fsync {
        // Make the rename itself durable.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Encodes and writes a state.
pub fn save_file(dir: &Path, state: &TerminalState, fsync: bool) -> Result<(), StorageError> {
    let path = state_path(dir, &state.sn);
    let bytes = encode(state).map_err(|reason| StorageError::Corrupt { path, reason })?;
    write_file(dir, &state.sn, &bytes, fsync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rki_protocol::init::{derive_device_secrets, Ephemeral, Gudid};

    fn secrets() -> DeviceSecrets {
        let gudid = Gudid::random().expect("gudid");
        let a = Ephemeral::random().expect("a");
        let b = Ephemeral::random().expect("b");
        derive_device_secrets(a, &b.public(), &gudid.mac_key(), b"x", b"y").expect("secrets")
    }

    fn temporary_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rki-sim-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn sample_state() -> TerminalState {
        let profile = DeviceProfile::new("SIM000001", Model::P3).expect("profile").with_debug_key(true);
        let mut state = TerminalState::factory(&profile);
        state.secrets = Some(secrets());
        state.locked = true;
        state.last_up_counter = 17;
        state.last_down_counter = 42;
        state.install(SlotStatus {
            slot: KeySlot::PRODUCTION,
            key_type: KeyType::Ipek,
            key_id: vec![0xAB; 10],
            kcv: vec![1, 2, 3],
        });
        state.record_answer(Ack {
            execution_id: 9,
            result: 0,
            slot: KeySlot::PRODUCTION,
            key_id: vec![0xAB; 10],
            kcv: vec![1, 2, 3],
            injection: InjectionType::Auto,
        });
        state
    }

    #[test]
    fn a_state_file_round_trips_everything_a_power_cycle_keeps() {
        let dir = temporary_dir("round-trip");
        let state = sample_state();
        save_file(&dir, &state, true).expect("save");
        let back = load_file(&dir, "SIM000001").expect("load").expect("present");
        assert_eq!(back.slots, state.slots);
        assert_eq!(back.answered, state.answered);
        assert_eq!((back.locked, back.last_up_counter, back.last_down_counter), (true, 17, 42));
        let (a, b) = (back.secrets.expect("secrets"), state.secrets.expect("secrets"));
        assert_eq!(a.signing_key, b.signing_key);
        assert_eq!(a.kbpk_aes, b.kbpk_aes);
        assert_eq!(a.kbpk_tdes, b.kbpk_tdes);
        assert_eq!(a.mqtt_password, b.mqtt_password);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_state_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temporary_dir("mode");
        save_file(&dir, &sample_state(), false).expect("save");
        let mode = std::fs::metadata(state_path(&dir, "SIM000001")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_file_of_another_terminal_or_garbage_is_refused() {
        let dir = temporary_dir("corrupt");
        save_file(&dir, &sample_state(), false).expect("save");
        std::fs::rename(state_path(&dir, "SIM000001"), state_path(&dir, "SIM000002")).expect("mv");
        assert!(matches!(load_file(&dir, "SIM000002"), Err(StorageError::Corrupt { .. })));
        std::fs::write(state_path(&dir, "SIM000003"), b"{not json").expect("write");
        assert!(matches!(load_file(&dir, "SIM000003"), Err(StorageError::Corrupt { .. })));
        assert!(load_file(&dir, "SIM000004").expect("absent is fine").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn answers_beyond_the_limit_forget_the_oldest_confirmed_ones() {
        let mut state = sample_state();
        for id in 100..(100 + ANSWERED_EXECUTIONS_MAX as u64 * 2) {
            let mut ack = state.answered[0].ack.clone();
            ack.execution_id = id;
            state.record_answer(ack);
            state.confirm(id);
        }
        assert_eq!(state.answered.len(), ANSWERED_EXECUTIONS_MAX);
        // The first answer was never confirmed: it is kept.
        assert!(state.answered(9).is_some());
    }
}
