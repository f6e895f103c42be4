//! The terminal's vocabulary, shared by the gateway and the simulated terminal: key slots, key types,
//! the terminal's error codes with their meaning, models with their minimum ROM, portal regions and
//! the key-injection app versions they need.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A key slot ("index") on the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeySlot(pub u16);

impl KeySlot {
    /// Production keys, the slot every download task targets by default.
    pub const PRODUCTION: KeySlot = KeySlot(1);
    /// Development keys.
    pub const DEVELOPMENT: KeySlot = KeySlot(4);
    /// Debug keys. A key here makes production keys unusable (-3000).
    pub const DEBUG: KeySlot = KeySlot(8);
    /// Reserved for the vendor's hardware certificate key; never written by RKI.
    pub const HARDWARE_CERTIFICATE: KeySlot = KeySlot(9001);

    /// The slots a download task may write.
    pub fn is_writable_by_rki(self) -> bool {
        matches!(self, KeySlot::PRODUCTION | KeySlot::DEVELOPMENT | KeySlot::DEBUG)
    }

    pub fn name(self) -> &'static str {
        match self {
            KeySlot::PRODUCTION => "production",
            KeySlot::DEVELOPMENT => "development",
            KeySlot::DEBUG => "debug",
            KeySlot::HARDWARE_CERTIFICATE => "hardware certificate (reserved)",
            _ => "other",
        }
    }
}

impl fmt::Display for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Key types, as the fleet manager's portal names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    /// Base derivation key.
    Bdk,
    /// Key encryption / exchange key.
    Kek,
    /// Terminal master key.
    Tmk,
    /// PIN key.
    Pik,
    /// MAC key.
    Mak,
    /// Account data encryption key.
    Tdk,
    /// DUKPT initial key (initial PIN encryption key).
    Ipek,
    /// Key block protection key.
    Kpbk,
}

impl KeyType {
    pub const ALL: [KeyType; 8] = [
        KeyType::Bdk,
        KeyType::Kek,
        KeyType::Tmk,
        KeyType::Pik,
        KeyType::Mak,
        KeyType::Tdk,
        KeyType::Ipek,
        KeyType::Kpbk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Bdk => "BDK",
            KeyType::Kek => "KEK",
            KeyType::Tmk => "TMK",
            KeyType::Pik => "PIK",
            KeyType::Mak => "MAK",
            KeyType::Tdk => "TDK",
            KeyType::Ipek => "IPEK",
            KeyType::Kpbk => "KPBK",
        }
    }

    pub fn parse(text: &str) -> Option<KeyType> {
        KeyType::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a key reached the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InjectionType {
    /// Pushed by the RKI service.
    Auto,
    /// Forced locally from the key-injection app on the terminal.
    Manual,
}

impl InjectionType {
    pub fn as_str(self) -> &'static str {
        match self {
            InjectionType::Auto => "auto",
            InjectionType::Manual => "manual",
        }
    }
}

/// An error the terminal reports in its acknowledgement. The first three are the terminal's own codes
/// (as its key-injection app shows them); the firmware codes are ours, for refusals the app raises
/// before it tries the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TerminalError {
    /// -1: the key record was not found, or the key block did not unwrap or did not check.
    KeyRecordNotFound,
    /// -3000: a debug key remains on the terminal, or it is in debug mode.
    DebugKeyPresent,
    /// -11208: the terminal is locked; a key is already injected.
    DeviceLocked,
    /// -20001: the ROM is below the model's minimum.
    RomTooOld,
    /// -20002: the key-injection app is too old for the portal region.
    AppTooOld,
    /// -20003: the requested slot may not be written by RKI.
    SlotNotWritable,
}

impl TerminalError {
    pub const ALL: [TerminalError; 6] = [
        TerminalError::KeyRecordNotFound,
        TerminalError::DebugKeyPresent,
        TerminalError::DeviceLocked,
        TerminalError::RomTooOld,
        TerminalError::AppTooOld,
        TerminalError::SlotNotWritable,
    ];

    pub fn code(self) -> i32 {
        match self {
            TerminalError::KeyRecordNotFound => -1,
            TerminalError::DebugKeyPresent => -3000,
            TerminalError::DeviceLocked => -11208,
            TerminalError::RomTooOld => -20001,
            TerminalError::AppTooOld => -20002,
            TerminalError::SlotNotWritable => -20003,
        }
    }

    pub fn from_code(code: i32) -> Option<TerminalError> {
        TerminalError::ALL.into_iter().find(|e| e.code() == code)
    }

    /// What the code means, as an operator reads it.
    pub fn meaning(self) -> &'static str {
        match self {
            TerminalError::KeyRecordNotFound => "key record not found",
            TerminalError::DebugKeyPresent => "debug key remains on the device",
            TerminalError::DeviceLocked => "device is locked: a key is already injected",
            TerminalError::RomTooOld => "ROM is below the minimum for this model",
            TerminalError::AppTooOld => "key-injection app is too old for this portal region",
            TerminalError::SlotNotWritable => "slot is reserved and cannot be written",
        }
    }

    /// What the operator should do about it.
    pub fn remedy(self) -> &'static str {
        match self {
            TerminalError::KeyRecordNotFound => "notify support; check the device initialisation",
            TerminalError::DebugKeyPresent => "delete the debug key (slot 8), leave debug mode, then create a new task",
            TerminalError::DeviceLocked => "unlock the device remotely, then create a new task",
            TerminalError::RomTooOld => "update the ROM, then create a new task",
            TerminalError::AppTooOld => "update the key-injection app, then create a new task",
            TerminalError::SlotNotWritable => "target slot 1 (production), 4 or 8",
        }
    }
}

/// The meaning of any result code: 0 is success, known codes have their meaning, others are unknown.
pub fn result_meaning(code: i32) -> &'static str {
    if code == 0 {
        return "success";
    }
    TerminalError::from_code(code).map_or("unknown terminal error", TerminalError::meaning)
}

impl fmt::Display for TerminalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.meaning())
    }
}

/// A dotted version `MAJOR.MINOR.PATCH` (missing parts are 0), compared numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }
}

impl FromStr for Version {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim().trim_start_matches(['v', 'V']);
        let mut parts = [0u32; 3];
        let mut count = 0;
        for (i, part) in text.split('.').enumerate() {
            if i >= 3 {
                return Err(format!("version {text:?} has more than three parts"));
            }
            parts[i] = part.parse().map_err(|_| format!("version {text:?} is not MAJOR.MINOR.PATCH"))?;
            count += 1;
        }
        if count == 0 || text.is_empty() {
            return Err("empty version".to_string());
        }
        Ok(Version::new(parts[0], parts[1], parts[2]))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Terminal models RKI supports, with the minimum ROM each needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Model {
    P2LiteSe,
    P2Smartpad,
    P3,
    P3H,
    P3KH,
}

impl Model {
    pub const ALL: [Model; 5] = [Model::P2LiteSe, Model::P2Smartpad, Model::P3, Model::P3H, Model::P3KH];

    pub fn name(self) -> &'static str {
        match self {
            Model::P2LiteSe => "P2 LITE SE",
            Model::P2Smartpad => "P2 SMARTPAD",
            Model::P3 => "P3",
            Model::P3H => "P3H",
            Model::P3KH => "P3KH",
        }
    }

    pub fn minimum_rom(self) -> Version {
        match self {
            Model::P2LiteSe => Version::new(3, 0, 35),
            Model::P2Smartpad => Version::new(3, 2, 3),
            Model::P3 => Version::new(3, 0, 15),
            Model::P3H => Version::new(3, 0, 4),
            Model::P3KH => Version::new(3, 0, 6),
        }
    }

    /// Accepts the portal's spelling in any case, with spaces, dashes or underscores.
    pub fn parse(text: &str) -> Option<Model> {
        let norm = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_uppercase();
        let wanted = norm(text);
        Model::ALL.into_iter().find(|m| norm(m.name()) == wanted)
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The portal region a terminal is managed from; it decides the key-injection app it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Region {
    Eu,
    Cn,
}

impl Region {
    /// The lowest key-injection app version that can receive keys from this region's portal:
    /// 2.x.x on the EU portal, 1.x.x on the China portal.
    pub fn minimum_app(self) -> Version {
        match self {
            Region::Eu => Version::new(2, 0, 0),
            Region::Cn => Version::new(1, 0, 0),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Region::Eu => "EU",
            Region::Cn => "CN",
        }
    }

    pub fn parse(text: &str) -> Option<Region> {
        match text.to_ascii_uppercase().as_str() {
            "EU" => Some(Region::Eu),
            "CN" => Some(Region::Cn),
            _ => None,
        }
    }
}

/// Whether a terminal with this firmware can take a key at all: the refusal its app raises, if any.
/// Unknown models and unparsable versions are refused as too old, never waved through.
pub fn firmware_refusal(model: &str, rom: &str, app: &str, region: Region) -> Option<TerminalError> {
    let rom_ok = match (Model::parse(model), rom.parse::<Version>()) {
        (Some(model), Ok(rom)) => rom >= model.minimum_rom(),
        _ => false,
    };
    if !rom_ok {
        return Some(TerminalError::RomTooOld);
    }
    match app.parse::<Version>() {
        Ok(app) if app >= region.minimum_app() => None,
        _ => Some(TerminalError::AppTooOld),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_terminal_error_code_round_trips_and_has_a_meaning() {
        for error in TerminalError::ALL {
            assert_eq!(TerminalError::from_code(error.code()), Some(error));
            assert!(!error.meaning().is_empty());
            assert!(!error.remedy().is_empty());
        }
        assert_eq!(TerminalError::DebugKeyPresent.code(), -3000);
        assert_eq!(TerminalError::DeviceLocked.code(), -11208);
        assert_eq!(TerminalError::KeyRecordNotFound.code(), -1);
        assert_eq!(result_meaning(0), "success");
        assert_eq!(result_meaning(-42), "unknown terminal error");
    }

    #[test]
    fn minimum_rom_per_model_is_enforced() {
        let cases = [
            ("P2 LITE SE", "3.0.35", true),
            ("P2 LITE SE", "3.0.34", false),
            ("P2 SMARTPAD", "3.2.3", true),
            ("P2 SMARTPAD", "3.1.99", false),
            ("P3", "3.0.15", true),
            ("P3", "3.0.9", false),
            ("P3H", "3.0.4", true),
            ("p3h", "3.1", true),
            ("P3KH", "3.0.5", false),
            ("P3KH", "4.0.0", true),
            ("P9", "9.9.9", false),
            ("P3", "not-a-version", false),
        ];
        for (model, rom, ok) in cases {
            let refusal = firmware_refusal(model, rom, "2.0.0", Region::Eu);
            assert_eq!(refusal.is_none(), ok, "{model} {rom}");
            if !ok {
                assert_eq!(refusal, Some(TerminalError::RomTooOld));
            }
        }
    }

    #[test]
    fn app_version_depends_on_the_portal_region() {
        assert_eq!(firmware_refusal("P3", "3.0.15", "1.9.9", Region::Eu), Some(TerminalError::AppTooOld));
        assert_eq!(firmware_refusal("P3", "3.0.15", "2.0.0", Region::Eu), None);
        assert_eq!(firmware_refusal("P3", "3.0.15", "1.0.0", Region::Cn), None);
        assert_eq!(firmware_refusal("P3", "3.0.15", "0.9.0", Region::Cn), Some(TerminalError::AppTooOld));
    }

    #[test]
    fn only_production_development_and_debug_slots_are_writable() {
        assert!(KeySlot::PRODUCTION.is_writable_by_rki());
        assert!(KeySlot::DEVELOPMENT.is_writable_by_rki());
        assert!(KeySlot::DEBUG.is_writable_by_rki());
        assert!(!KeySlot::HARDWARE_CERTIFICATE.is_writable_by_rki());
        assert!(!KeySlot(0).is_writable_by_rki());
    }
}
