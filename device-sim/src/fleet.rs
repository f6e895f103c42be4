//! Many simulated terminals in one process: SNs from a pattern or a CSV file, shared counters, and
//! awaitable conditions.

use std::sync::Arc;
use std::time::Duration;

use rki_protocol::terminal::{Region, TerminalError};

use crate::config::{parse_model, parse_region, Brokers, ConfigError, DeviceConfig, DeviceProfile, Knobs, StateStore};
use crate::device::{Device, DeviceError, DeviceHandle};
use crate::status::{FleetCounters, FleetSnapshot, WaitTimeout};

/// Devices a fleet may hold: beyond this the process runs out of file descriptors anyway.
pub const FLEET_SIZE_MAX: usize = 1_000_000;

/// A serial-number pattern with one placeholder, `{}` or `{:0N}` (zero-padded to N digits):
/// `SIM{:06}` gives SIM000001, SIM000002, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnPattern {
    prefix: String,
    suffix: String,
    width: usize,
}

impl SnPattern {
    pub fn parse(pattern: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadPattern(pattern.to_string());
        let open = pattern.find('{').ok_or_else(bad)?;
        let close = open + pattern[open..].find('}').ok_or_else(bad)?;
        let spec = &pattern[open + 1..close];
        let width = match spec {
            "" => 0,
            _ => spec.strip_prefix(":0").and_then(|w| w.parse::<usize>().ok()).filter(|w| *w <= 20).ok_or_else(bad)?,
        };
        let (prefix, suffix) = (&pattern[..open], &pattern[close + 1..]);
        if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
            return Err(bad());
        }
        Ok(Self { prefix: prefix.to_string(), suffix: suffix.to_string(), width })
    }

    /// The SN for number `n`.
    pub fn sn(&self, n: u64) -> String {
        format!("{}{:0width$}{}", self.prefix, n, self.suffix, width = self.width)
    }

    /// `count` SNs from number `first` on.
    pub fn generate(&self, first: u64, count: usize) -> Vec<String> {
        (first..first + count as u64).map(|n| self.sn(n)).collect()
    }
}

/// One terminal of a fleet: its profile, and a GUDID to initialise with if it has no secrets.
#[derive(Debug, Clone)]
pub struct FleetMember {
    pub profile: DeviceProfile,
    pub gudid: Option<String>,
}

/// Parses a fleet CSV: one terminal per line, `sn[,gudid[,model,rom,app,region]]`. Empty lines
/// and lines starting with `#` are skipped, and so is a first line starting with `sn`. Missing
/// fields come from `template`.
pub fn parse_fleet_csv(text: &str, template: &DeviceProfile) -> Result<Vec<FleetMember>, ConfigError> {
    let mut members = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (index == 0 && line.to_ascii_lowercase().starts_with("sn")) {
            continue;
        }
        let bad = |reason: String| ConfigError::BadCsv { line: line_no, reason };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if !matches!(fields.len(), 1 | 2 | 6) {
            return Err(bad(format!("{} fields; expected sn[,gudid[,model,rom,app,region]]", fields.len())));
        }
        let mut profile = template.for_sn(fields[0]).map_err(|e| bad(e.to_string()))?;
        if fields.len() == 6 {
            let model = parse_model(fields[2]).map_err(|e| bad(e.to_string()))?;
            let region: Region = parse_region(fields[5]).map_err(|e| bad(e.to_string()))?;
            profile = DeviceProfile::new(fields[0], model)
                .and_then(|p| p.with_rom(fields[3]))
                .and_then(|p| p.with_app(fields[4]))
                .map(|p| {
                    p.with_region(region)
                        .in_debug_mode(template.debug_mode())
                        .locked(template.is_locked())
                        .with_debug_key(template.debug_key())
                })
                .map_err(|e| bad(e.to_string()))?;
        }
        let gudid = fields.get(1).filter(|g| !g.is_empty()).map(|g| g.to_string());
        if let Some(gudid) = &gudid {
            rki_protocol::init::Gudid::parse(gudid).map_err(|_| bad("GUDID is not 32 hex digits".to_string()))?;
        }
        members.push(FleetMember { profile, gudid });
    }
    if members.len() > FLEET_SIZE_MAX {
        return Err(ConfigError::BadCsv { line: 0, reason: format!("more than {FLEET_SIZE_MAX} terminals") });
    }
    Ok(members)
}

/// A share of a fleet that fails every injection with one code. The terminals chosen are spread
/// evenly (every tenth one for 10%). Where the terminal has a real state that causes the code, it
/// is put in that state: -3000 debug mode, -11208 locked, -20001 a ROM below the minimum,
/// -20002 an app too old for the region. Otherwise (-1, -20003) the code is forced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailingShare {
    fraction: f64,
    error: TerminalError,
}

impl FailingShare {
    pub fn new(fraction: f64, error: TerminalError) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ConfigError::BadFraction(fraction.to_string()));
        }
        Ok(Self { fraction, error })
    }

    /// Whether terminal number `index` (from 0) is one of the failing share.
    pub fn picks(&self, index: usize) -> bool {
        let count = |n: usize| (n as f64 * self.fraction).floor() as u64;
        count(index + 1) > count(index)
    }

    fn apply(&self, profile: DeviceProfile, knobs: &mut Knobs) -> DeviceProfile {
        match self.error {
            TerminalError::DebugKeyPresent => profile.in_debug_mode(true),
            TerminalError::DeviceLocked => profile.locked(true),
            TerminalError::RomTooOld => profile.clone().with_rom("0.0.1").unwrap_or(profile),
            TerminalError::AppTooOld => profile.clone().with_app("0.0.1").unwrap_or(profile),
            TerminalError::KeyRecordNotFound | TerminalError::SlotNotWritable => {
                knobs.forced_failure = Some(self.error);
                profile
            }
        }
    }
}

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub members: Vec<FleetMember>,
    pub brokers: Brokers,
    pub store: StateStore,
    /// Knobs every terminal starts with.
    pub knobs: Knobs,
    pub failing: Option<FailingShare>,
    /// Pause between two terminals' start, to spread the connection storm.
    pub spawn_interval: Duration,
}

impl FleetConfig {
    /// A fleet of `members` with default knobs, in memory.
    pub fn new(members: Vec<FleetMember>, brokers: Brokers) -> Self {
        Self {
            members,
            brokers,
            store: StateStore::Memory,
            knobs: Knobs::default(),
            failing: None,
            spawn_interval: Duration::ZERO,
        }
    }

    /// Members named by `pattern` from number `first`, each from `template`, without GUDIDs.
    pub fn members_from_pattern(
        pattern: &SnPattern,
        first: u64,
        count: usize,
        template: &DeviceProfile,
    ) -> Result<Vec<FleetMember>, ConfigError> {
        pattern
            .generate(first, count.min(FLEET_SIZE_MAX))
            .iter()
            .map(|sn| Ok(FleetMember { profile: template.for_sn(sn)?, gudid: None }))
            .collect()
    }
}

/// Many terminals sharing one set of counters.
#[derive(Debug)]
pub struct Fleet {
    devices: Vec<DeviceHandle>,
    counters: Arc<FleetCounters>,
}

impl Fleet {
    /// Raises the open-file limit, then spawns every member in order. Stops at the first that
    /// cannot start (e.g. an unreadable state file); the ones started so far are shut down.
    pub async fn spawn(config: FleetConfig) -> Result<Fleet, DeviceError> {
        let _ = raise_fd_limit();
        let counters = Arc::new(FleetCounters::default());
        let mut fleet = Fleet { devices: Vec::with_capacity(config.members.len()), counters: counters.clone() };
        for (index, member) in config.members.into_iter().enumerate() {
            let mut knobs = config.knobs.clone();
            let profile = match &config.failing {
                Some(share) if share.picks(index) => share.apply(member.profile, &mut knobs),
                _ => member.profile,
            };
            let device = DeviceConfig {
                profile,
                broker: config.brokers.for_index(index).clone(),
                store: config.store.clone(),
                knobs,
                gudid: member.gudid,
                preset_secrets: None,
                require_existing_state: false,
                counters: Some(counters.clone()),
            };
            match Device::spawn(device).await {
                Ok(handle) => fleet.devices.push(handle),
                Err(error) => {
                    fleet.shutdown().await;
                    return Err(error);
                }
            }
            if !config.spawn_interval.is_zero() {
                tokio::time::sleep(config.spawn_interval).await;
            }
        }
        Ok(fleet)
    }

    /// Adds an already spawned terminal (e.g. with preset secrets). Its counters should be the
    /// fleet's ([`Fleet::counters`]).
    pub fn push(&mut self, device: DeviceHandle) {
        self.devices.push(device);
    }

    /// An empty fleet, to fill with [`Fleet::push`].
    pub fn empty() -> Self {
        Self { devices: Vec::new(), counters: Arc::default() }
    }

    pub fn counters(&self) -> &Arc<FleetCounters> {
        &self.counters
    }

    pub fn snapshot(&self) -> FleetSnapshot {
        self.counters.snapshot()
    }

    pub fn devices(&self) -> &[DeviceHandle] {
        &self.devices
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn device(&self, sn: &str) -> Option<&DeviceHandle> {
        self.devices.iter().find(|d| d.sn() == sn)
    }

    /// Waits until `condition` holds for the fleet's counters.
    pub async fn wait_until(
        &self,
        condition: impl Fn(&FleetSnapshot) -> bool,
        timeout: Duration,
    ) -> Result<FleetSnapshot, WaitTimeout> {
        self.counters.wait_until(condition, timeout).await
    }

    /// Waits until `n` terminals are connected.
    pub async fn wait_connected(&self, n: u64, timeout: Duration) -> Result<FleetSnapshot, WaitTimeout> {
        self.wait_until(|s| s.connected >= n, timeout).await
    }

    /// Waits until `n` terminals are initialised.
    pub async fn wait_initialised(&self, n: u64, timeout: Duration) -> Result<FleetSnapshot, WaitTimeout> {
        self.wait_until(|s| s.initialised >= n, timeout).await
    }

    /// Waits until `n` keys are installed across the fleet.
    pub async fn wait_keys_installed(&self, n: u64, timeout: Duration) -> Result<FleetSnapshot, WaitTimeout> {
        self.wait_until(|s| s.keys_installed >= n, timeout).await
    }

    /// Stops every terminal.
    pub async fn shutdown(&self) {
        for device in &self.devices {
            device.shutdown().await;
        }
    }
}

/// Raises this process's open-file soft limit to the hard limit (one socket per connected
/// terminal). Returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rki_protocol::terminal::Model;

    #[test]
    fn sn_patterns_pad_and_bad_patterns_are_refused() {
        let pattern = SnPattern::parse("SIM{:06}").expect("pattern");
        assert_eq!(pattern.generate(1, 2), vec!["SIM000001", "SIM000002"]);
        assert_eq!(SnPattern::parse("P3-{}-X").expect("plain").sn(42), "P3-42-X");
        for bad in ["SIM", "SIM{", "SIM{:6}", "SIM{:0x}", "{}{}", "SIM{:099}"] {
            assert!(SnPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_failing_share_picks_an_even_spread_of_exactly_that_fraction() {
        let share = FailingShare::new(0.1, TerminalError::DebugKeyPresent).expect("share");
        let picked: Vec<usize> = (0..100).filter(|i| share.picks(*i)).collect();
        assert_eq!(picked.len(), 10);
        assert_eq!(picked[0], 9);
        assert!(FailingShare::new(1.5, TerminalError::DebugKeyPresent).is_err());
        let all = FailingShare::new(1.0, TerminalError::DeviceLocked).expect("all");
        assert!((0..10).all(|i| all.picks(i)));
    }

    #[test]
    fn fleet_csv_lines_give_profiles_and_bad_lines_name_their_number() {
        let template = DeviceProfile::new("TEMPLATE", Model::P3).expect("template");
        let gudid = "00112233-44556677-8899AABB-CCDDEEFF";
        let text = format!("sn,gudid,model,rom,app,region\nA1\n\nB2,{gudid}\nC3,,P2 LITE SE,3.0.35,1.2.0,CN\n");
        let members = parse_fleet_csv(&text, &template).expect("csv");
        assert_eq!(members.len(), 3);
        assert_eq!(members[0].profile.model(), Model::P3);
        assert_eq!(members[1].gudid.as_deref(), Some(gudid));
        assert_eq!(members[2].profile.model(), Model::P2LiteSe);
        assert_eq!(members[2].profile.region(), Region::Cn);
        assert!(members[2].gudid.is_none());
        for (bad, line) in [("A1\nB/2", 2), ("A1,nothex", 1), ("A1,,P9,1,1,EU", 1), ("A1,,P3,3.0.15,2.0.0", 1)] {
            match parse_fleet_csv(bad, &template) {
                Err(ConfigError::BadCsv { line: got, .. }) => assert_eq!(got, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
