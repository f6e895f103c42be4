//! The domain vocabulary of ARCHITECTURE.md ("Domain"): execution states and their allowed transitions, task
//! expiry bounds, readiness reasons. One home per concept.

use std::fmt;

/// Default lifetime of a download task: 30 days from creation.
pub const EXPIRY_DAYS_DEFAULT: u16 = 30;
/// Longest lifetime an operator may set: 180 days.
pub const EXPIRY_DAYS_MAX: u16 = 180;
pub const SECONDS_PER_DAY: u64 = 86_400;

/// The state of one device's share of a download task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecutionState {
    /// Persisted, waiting for the device to show up.
    Queued,
    /// Published to the device at least once; waiting for its signed ack.
    Delivered,
    /// The device acked success and the KCV matched.
    Succeeded,
    /// The device acked an error code.
    Failed,
    /// Not acked by the deadline.
    Expired,
    /// Stopped by an operator ("manually terminated").
    Terminated,
}

impl ExecutionState {
    pub const ALL: [ExecutionState; 6] = [
        ExecutionState::Queued,
        ExecutionState::Delivered,
        ExecutionState::Succeeded,
        ExecutionState::Failed,
        ExecutionState::Expired,
        ExecutionState::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionState::Queued => "queued",
            ExecutionState::Delivered => "delivered",
            ExecutionState::Succeeded => "succeeded",
            ExecutionState::Failed => "failed",
            ExecutionState::Expired => "expired",
            ExecutionState::Terminated => "terminated",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        ExecutionState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Open executions can still be delivered; the others are final and have a record.
    pub fn is_open(self) -> bool {
        matches!(self, ExecutionState::Queued | ExecutionState::Delivered)
    }

    /// The one place that says which transitions exist. Every state change in the engine and the
    /// store goes through it.
    pub fn can_become(self, next: ExecutionState) -> bool {
        use ExecutionState::*;
        // An ack may overtake the persisting of `Delivered` (the publish happens first), so a
        // queued execution may end directly.
        matches!((self, next), (Queued | Delivered, Delivered | Succeeded | Failed | Expired | Terminated))
    }
}

impl fmt::Display for ExecutionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a device is not ready for a new download task (the task preview).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotReady {
    Locked,
    Unassigned,
    TaskPending,
    RomTooOld,
    AppTooOld,
    DebugKeyPresent,
    NotInitialised,
    NeverSeen,
}

impl NotReady {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Locked => "locked",
            NotReady::Unassigned => "unassigned",
            NotReady::TaskPending => "task_pending",
            NotReady::RomTooOld => "rom_too_old",
            NotReady::AppTooOld => "app_too_old",
            NotReady::DebugKeyPresent => "debug_key_present",
            NotReady::NotInitialised => "not_initialised",
            NotReady::NeverSeen => "never_seen",
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            NotReady::Locked => "device is locked: a key is already injected; unlock it first",
            NotReady::Unassigned => "no key source is assigned to the device",
            NotReady::TaskPending => "a download task is already pending for the device",
            NotReady::RomTooOld => "ROM is below the minimum for the model",
            NotReady::AppTooOld => "key-injection app is too old for the portal region",
            NotReady::DebugKeyPresent => "a debug key remains on the device (slot 8 or debug mode)",
            NotReady::NotInitialised => "device has not been initialised with a GUDID",
            NotReady::NeverSeen => "device has never reported its firmware (may still work)",
        }
    }

    /// Whether the reason blocks task creation. `NeverSeen` only warns: a device that has not
    /// connected yet may still come online within the task's lifetime.
    pub fn blocks(self) -> bool {
        !matches!(self, NotReady::NeverSeen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ExecutionState::*;

    #[test]
    fn execution_transitions_are_exactly_the_designed_ones() {
        let allowed = [
            (Queued, Delivered),
            (Queued, Succeeded),
            (Queued, Failed),
            (Queued, Expired),
            (Queued, Terminated),
            (Delivered, Delivered),
            (Delivered, Succeeded),
            (Delivered, Failed),
            (Delivered, Expired),
            (Delivered, Terminated),
        ];
        for from in ExecutionState::ALL {
            for to in ExecutionState::ALL {
                assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn final_states_are_not_open() {
        for state in ExecutionState::ALL {
            assert_eq!(state.is_open(), matches!(state, Queued | Delivered));
            assert_eq!(ExecutionState::parse(state.as_str()), Some(state));
        }
    }
}
