//! How a simulated terminal is set up: what it is ([`DeviceProfile`]), where it connects
//! ([`BrokerAddr`], [`Brokers`]), where it keeps its state ([`StateStore`]) and how it misbehaves
//! ([`Knobs`]).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rki_protocol::init::DeviceSecrets;
use rki_protocol::terminal::{Model, Region, TerminalError};
use rki_protocol::topic::{validate_name, NameError};

/// Longest `x_pos_device_id` the protocol accepts.
const X_POS_DEVICE_ID_LEN_MAX: usize = rki_protocol::message::limits::SHORT_TEXT_LEN_MAX;

/// Why a profile, a broker address or a fleet description is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("serial number {sn:?}: {reason}")]
    BadSn { sn: String, reason: NameError },
    #[error("unknown model {0:?} (expected one of P2 LITE SE, P2 SMARTPAD, P3, P3H, P3KH)")]
    UnknownModel(String),
    #[error("unknown region {0:?} (expected EU or CN)")]
    UnknownRegion(String),
    #[error("{field} {value:?} is longer than 64 characters")]
    TooLong { field: &'static str, value: String },
    #[error("broker address {0:?} is not HOST:PORT")]
    BadBroker(String),
    #[error("broker range {0:?} is not FIRST-LAST:PORT with IPv4 addresses, FIRST <= LAST")]
    BadBrokerRange(String),
    #[error("no broker address given")]
    NoBroker,
    #[error("SN pattern {0:?} must contain one placeholder: {{}} or {{:0N}}")]
    BadPattern(String),
    #[error("CSV line {line}: {reason}")]
    BadCsv { line: usize, reason: String },
    #[error("failure fraction {0} is not within 0..=1")]
    BadFraction(String),
}

/// What a terminal is, as it leaves the factory. These values are used on the first power-on
/// only: once a state file exists, the terminal's stored state wins (a firmware update is
/// [`crate::DeviceHandle::set_firmware`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProfile {
    sn: String,
    model: Model,
    rom_version: String,
    app_version: String,
    region: Region,
    x_pos_device_id: String,
    debug_mode: bool,
    locked: bool,
    debug_key: bool,
}

impl DeviceProfile {
    /// A terminal of `model` with the minimum ROM for it, the EU portal and key-injection app
    /// 2.0.0, unlocked, out of debug mode, with empty slots.
    pub fn new(sn: &str, model: Model) -> Result<Self, ConfigError> {
        validate_name(sn).map_err(|reason| ConfigError::BadSn { sn: sn.to_string(), reason })?;
        Ok(Self {
            sn: sn.to_string(),
            model,
            rom_version: model.minimum_rom().to_string(),
            app_version: Region::Eu.minimum_app().to_string(),
            region: Region::Eu,
            x_pos_device_id: format!("XPOS-{sn}").chars().take(X_POS_DEVICE_ID_LEN_MAX).collect(),
            debug_mode: false,
            locked: false,
            debug_key: false,
        })
    }

    /// The ROM version string, reported as is (an unparsable one is refused as too old).
    pub fn with_rom(mut self, rom_version: &str) -> Result<Self, ConfigError> {
        self.rom_version = short("ROM version", rom_version)?;
        Ok(self)
    }

    /// The key-injection app version string, reported as is.
    pub fn with_app(mut self, app_version: &str) -> Result<Self, ConfigError> {
        self.app_version = short("app version", app_version)?;
        Ok(self)
    }

    /// The portal region. Does not change the app version.
    pub fn with_region(mut self, region: Region) -> Self {
        self.region = region;
        self
    }

    pub fn with_x_pos_device_id(mut self, id: &str) -> Result<Self, ConfigError> {
        self.x_pos_device_id = short("x_pos_device_id", id)?;
        Ok(self)
    }

    /// Leaves the factory in debug mode (every injection then fails with -3000).
    pub fn in_debug_mode(mut self, on: bool) -> Self {
        self.debug_mode = on;
        self
    }

    /// Leaves the factory locked (every injection fails with -11208 until a signed unlock).
    pub fn locked(mut self, on: bool) -> Self {
        self.locked = on;
        self
    }

    /// Leaves the factory with a debug key in slot 8 (every injection fails with -3000 until the
    /// slot is reset).
    pub fn with_debug_key(mut self, on: bool) -> Self {
        self.debug_key = on;
        self
    }

    /// The same profile for another SN.
    pub fn for_sn(&self, sn: &str) -> Result<Self, ConfigError> {
        let mut profile = DeviceProfile::new(sn, self.model)?;
        profile.rom_version.clone_from(&self.rom_version);
        profile.app_version.clone_from(&self.app_version);
        profile.region = self.region;
        profile.debug_mode = self.debug_mode;
        profile.locked = self.locked;
        profile.debug_key = self.debug_key;
        Ok(profile)
    }

    pub fn sn(&self) -> &str {
        &self.sn
    }
    pub fn model(&self) -> Model {
        self.model
    }
    pub fn rom_version(&self) -> &str {
        &self.rom_version
    }
    pub fn app_version(&self) -> &str {
        &self.app_version
    }
    pub fn region(&self) -> Region {
        self.region
    }
    pub fn x_pos_device_id(&self) -> &str {
        &self.x_pos_device_id
    }
    pub fn debug_mode(&self) -> bool {
        self.debug_mode
    }
    pub fn is_locked(&self) -> bool {
        self.locked
    }
    pub fn debug_key(&self) -> bool {
        self.debug_key
    }
}

fn short(field: &'static str, value: &str) -> Result<String, ConfigError> {
    if value.len() > X_POS_DEVICE_ID_LEN_MAX {
        return Err(ConfigError::TooLong { field, value: value.to_string() });
    }
    Ok(value.to_string())
}

/// Parses a model as the portal spells it ("P2 LITE SE", "p2-lite-se", ...).
pub fn parse_model(text: &str) -> Result<Model, ConfigError> {
    Model::parse(text).ok_or_else(|| ConfigError::UnknownModel(text.to_string()))
}

/// Parses a portal region, "EU" or "CN".
pub fn parse_region(text: &str) -> Result<Region, ConfigError> {
    Region::parse(text).ok_or_else(|| ConfigError::UnknownRegion(text.to_string()))
}

/// One MQTT broker address, `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self { host: host.into(), port }
    }
}

impl FromStr for BrokerAddr {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadBroker(text.to_string());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self { host: host.to_string(), port })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The broker addresses a fleet spreads over: device `i` uses address `i mod len`. Spreading over
/// several loopback addresses (127.0.0.1 ..= 127.0.0.N, all reaching one broker listening on
/// 0.0.0.0) multiplies the ephemeral ports available, one range per destination address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(Arc<[BrokerAddr]>);

impl Brokers {
    pub fn new(addresses: Vec<BrokerAddr>) -> Result<Self, ConfigError> {
        if addresses.is_empty() {
            return Err(ConfigError::NoBroker);
        }
        Ok(Self(addresses.into()))
    }

    pub fn one(address: BrokerAddr) -> Self {
        Self(Arc::from(vec![address]))
    }

    /// Parses `FIRST-LAST:PORT`, e.g. `127.0.0.1-127.0.0.8:1883`, into every IPv4 address from
    /// FIRST to LAST (at most 256) on PORT.
    pub fn parse_range(text: &str) -> Result<Self, ConfigError> {
        /// A range wider than this is surely a typo.
        const RANGE_LEN_MAX: u32 = 256;
        let bad = || ConfigError::BadBrokerRange(text.to_string());
        let (range, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let (first, last) = range.split_once('-').ok_or_else(bad)?;
        let first = u32::from(first.parse::<Ipv4Addr>().map_err(|_| bad())?);
        let last = u32::from(last.parse::<Ipv4Addr>().map_err(|_| bad())?);
        if first > last || last - first >= RANGE_LEN_MAX || port == 0 {
            return Err(bad());
        }
        let addresses = (first..=last).map(|ip| BrokerAddr::new(Ipv4Addr::from(ip).to_string(), port)).collect();
        Self::new(addresses)
    }

    /// The address device number `index` connects to.
    pub fn for_index(&self, index: usize) -> &BrokerAddr {
        &self.0[index % self.0.len()]
    }

    pub fn addresses(&self) -> &[BrokerAddr] {
        &self.0
    }
}

/// Where a terminal keeps what survives a power cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStore {
    /// In the device task only: kept across power cycles of the simulated terminal, lost when the
    /// process ends. For big fleets and tests.
    Memory,
    /// One state file per terminal, `{dir}/{sn}.state.json`, written atomically (temporary file,
    /// then rename) with mode 0600. It holds the device secrets in hex: it stands in for the
    /// terminal's secure element, so keep the directory private. `fsync` makes every write
    /// durable against a machine crash, not only a process crash, at the cost of a disk flush.
    Directory { path: PathBuf, fsync: bool },
}

impl StateStore {
    pub fn directory(path: impl Into<PathBuf>) -> Self {
        StateStore::Directory { path: path.into(), fsync: true }
    }
}

/// A connectivity pattern: online for `online`, then offline for `offline`, repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flapping {
    pub online: Duration,
    pub offline: Duration,
}

/// Behaviour knobs: how the simulated terminal deviates from a well-behaved one. Most can also be
/// changed at run time through the [`crate::DeviceHandle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knobs {
    /// Delay between deciding on a download and publishing its ack (the decision is persisted
    /// first).
    pub ack_delay: Duration,
    /// Every new download fails with this code, whatever the terminal's state.
    pub forced_failure: Option<TerminalError>,
    /// On the next install: persist the key and the pending ack, drop the connection without
    /// sending anything, and power off.
    pub crash_after_next_install: bool,
    /// Connectivity that comes and goes while powered on.
    pub flapping: Option<Flapping>,
    /// Start powered on (`true`) or wait for [`crate::DeviceHandle::power_on`].
    pub start_powered: bool,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long a TCP connect plus CONNACK may take (whole seconds, at least one). A broker
    /// swamped by a connection storm answers late; the terminal then backs off and retries.
    pub connect_timeout: Duration,
    /// How long an initialisation may wait for the gateway's answer.
    pub init_timeout: Duration,
    /// First reconnect delay after a lost connection; doubles up to [`Knobs::reconnect_delay_max`].
    pub reconnect_delay: Duration,
    pub reconnect_delay_max: Duration,
    /// Test knob: the down counter the terminal holds as accepted once initialised, as if a
    /// gateway whose clock ran far ahead had sent it frames; every lower counter is a replay.
    pub accepted_down_counter_at_init: Option<u64>,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            ack_delay: Duration::ZERO,
            forced_failure: None,
            crash_after_next_install: false,
            flapping: None,
            start_powered: true,
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            init_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::from_millis(200),
            reconnect_delay_max: Duration::from_secs(10),
            accepted_down_counter_at_init: None,
        }
    }
}

/// Everything one simulated terminal needs.
#[derive(Debug)]
pub struct DeviceConfig {
    pub profile: DeviceProfile,
    pub broker: BrokerAddr,
    pub store: StateStore,
    pub knobs: Knobs,
    /// Initialise with this GUDID (text form) at power-on if the terminal holds no secrets yet.
    pub gudid: Option<String>,
    /// Secrets already provisioned (as if initialised at the factory): for measurements against
    /// a broker that does not check credentials. Ignored if the state already holds secrets.
    pub preset_secrets: Option<DeviceSecrets>,
    /// Refuse to start unless a stored state exists (the CLI's commands on a state directory).
    pub require_existing_state: bool,
    /// The fleet counters to add to; `None` gives the device counters of its own.
    pub counters: Option<Arc<crate::status::FleetCounters>>,
}

impl DeviceConfig {
    /// A terminal with default knobs.
    pub fn new(profile: DeviceProfile, broker: BrokerAddr, store: StateStore) -> Self {
        Self {
            profile,
            broker,
            store,
            knobs: Knobs::default(),
            gudid: None,
            preset_secrets: None,
            require_existing_state: false,
            counters: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_and_bad_ones_are_refused() {
        assert_eq!("127.0.0.1:1883".parse(), Ok(BrokerAddr::new("127.0.0.1", 1883)));
        assert_eq!("broker.local:8883".parse(), Ok(BrokerAddr::new("broker.local", 8883)));
        for bad in ["", "127.0.0.1", ":1883", "host:0", "host:99999", "host:x"] {
            assert!(bad.parse::<BrokerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_broker_range_spreads_devices_over_loopback_addresses() {
        let brokers = Brokers::parse_range("127.0.0.1-127.0.0.4:1883").expect("range");
        assert_eq!(brokers.addresses().len(), 4);
        assert_eq!(brokers.for_index(0), &BrokerAddr::new("127.0.0.1", 1883));
        assert_eq!(brokers.for_index(5), &BrokerAddr::new("127.0.0.2", 1883));
        for bad in ["127.0.0.4-127.0.0.1:1883", "127.0.0.1-127.0.2.1:1", "a-b:1", "127.0.0.1:1"] {
            assert!(Brokers::parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_profile_refuses_serial_numbers_that_could_break_a_topic() {
        for bad in ["", "a/b", "a+", "#", &"x".repeat(65)] {
            assert!(DeviceProfile::new(bad, Model::P3).is_err(), "{bad}");
        }
        let profile = DeviceProfile::new("P3-0001", Model::P3).expect("profile");
        assert_eq!(profile.rom_version(), "3.0.15");
        assert_eq!(profile.app_version(), "2.0.0");
    }
}
