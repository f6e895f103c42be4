//! The one MQTT topic scheme. Every topic string in the project is built or parsed here.
//!
//! | topic | direction | carries |
//! | --- | --- | --- |
//! | `rki/v1/dev/{sn}/up` | terminal → gateway | `Hello`, `Ack`, `Bye` (last will) |
//! | `rki/v1/dev/{sn}/down` | gateway → terminal | `CreateKeyAnswer`, `Download`, `Unlock`, `Refusal` |
//! | `rki/v1/init/{sn}` | terminal → gateway | `CreateKey` (the only topic a bootstrap identity needs) |
//! | `rki/v1/backend/{org}/tasks` | RKI backend → gateway | `TaskRequest` |
//! | `rki/v1/backend/{org}/events` | gateway → RKI backend | `TaskEvent` |

/// The common prefix, versioned with the protocol.
pub const PREFIX: &str = "rki/v1";
/// Longest serial number accepted anywhere.
pub const SN_LEN_MAX: usize = 64;

/// Why a serial number or organization name cannot be used in a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {SN_LEN_MAX} characters")]
    TooLong,
    #[error("may hold only letters, digits, '-', '_' and '.'")]
    BadCharacter,
}

/// Checks an SN (or organization slug): 1 to 64 of `[A-Za-z0-9._-]`, so it can never be an MQTT
/// wildcard, a level separator or a control character.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > SN_LEN_MAX {
        return Err(NameError::TooLong);
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

pub fn device_up(sn: &str) -> String {
    format!("{PREFIX}/dev/{sn}/up")
}

pub fn device_down(sn: &str) -> String {
    format!("{PREFIX}/dev/{sn}/down")
}

pub fn init(sn: &str) -> String {
    format!("{PREFIX}/init/{sn}")
}

pub fn backend_tasks(org: &str) -> String {
    format!("{PREFIX}/backend/{org}/tasks")
}

pub fn backend_events(org: &str) -> String {
    format!("{PREFIX}/backend/{org}/events")
}

/// The MQTT client id and user name of a terminal that is not yet initialised: `init@{SN}`. The
/// `@` cannot occur in an SN, and unlike `:` it is valid in a Mosquitto password file.
pub fn bootstrap_client_id(sn: &str) -> String {
    format!("init@{sn}")
}

/// The SN of a bootstrap client id, if it is one.
pub fn bootstrap_sn(client_id: &str) -> Option<&str> {
    client_id.strip_prefix("init@")
}

/// The password of every bootstrap identity: it proves nothing; CreateKey's GUDID tag does.
pub const BOOTSTRAP_PASSWORD: &str = "bootstrap";

/// The filters the gateway subscribes to.
pub const FILTER_DEVICE_UP: &str = "rki/v1/dev/+/up";
pub const FILTER_INIT: &str = "rki/v1/init/+";
pub const FILTER_BACKEND_TASKS: &str = "rki/v1/backend/+/tasks";

/// A topic the gateway receives on, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    DeviceUp { sn: &'a str },
    Init { sn: &'a str },
    BackendTasks { org: &'a str },
}

/// Parses a topic the gateway subscribes to. Anything else, or a name that fails
/// [`validate_name`], is `None`.
pub fn parse_inbound(topic: &str) -> Option<Inbound<'_>> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    let parsed = match parts.as_slice() {
        ["dev", sn, "up"] => Inbound::DeviceUp { sn },
        ["init", sn] => Inbound::Init { sn },
        ["backend", org, "tasks"] => Inbound::BackendTasks { org },
        _ => return None,
    };
    let name = match parsed {
        Inbound::DeviceUp { sn } | Inbound::Init { sn } => sn,
        Inbound::BackendTasks { org } => org,
    };
    validate_name(name).ok()?;
    Some(parsed)
}

/// Whether `topic` belongs to the device `sn` (its up, down or init topic).
pub fn is_own_topic(sn: &str, topic: &str) -> bool {
    topic == device_up(sn) || topic == device_down(sn) || topic == init(sn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_topics_round_trip() {
        assert_eq!(parse_inbound(&device_up("SN1")), Some(Inbound::DeviceUp { sn: "SN1" }));
        assert_eq!(parse_inbound(&init("SN-2")), Some(Inbound::Init { sn: "SN-2" }));
        assert_eq!(parse_inbound(&backend_tasks("acme")), Some(Inbound::BackendTasks { org: "acme" }));
    }

    #[test]
    fn outbound_and_malformed_topics_are_not_inbound() {
        for topic in [
            device_down("SN1").as_str(),
            "rki/v1/dev/+/up",
            "rki/v1/dev/#/up",
            "rki/v1/dev//up",
            "rki/v1/dev/a/b/up",
            "rki/v2/dev/SN1/up",
            "",
            "rki/v1/init/SN1/extra",
        ] {
            assert_eq!(parse_inbound(topic), None, "{topic}");
        }
    }

    #[test]
    fn names_with_wildcards_or_separators_are_refused() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("a/b"), Err(NameError::BadCharacter));
        assert_eq!(validate_name("a+"), Err(NameError::BadCharacter));
        assert_eq!(validate_name("#"), Err(NameError::BadCharacter));
        assert_eq!(validate_name(&"x".repeat(65)), Err(NameError::TooLong));
        assert_eq!(validate_name("P3-0001_a.b"), Ok(()));
    }
}
