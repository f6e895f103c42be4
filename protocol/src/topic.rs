//! The one MQTT topic scheme. Every topic string in the project is built or parsed here.
//!
//! | topic | direction | carries |
//! | --- | --- | --- |
//! | `{sn}/rki/v1/up` | terminal → gateway | `Hello`, `Ack`, `Bye` (last will) |
//! | `{sn}/rki/v1/down` | gateway → terminal | `CreateKeyAnswer`, `Download`, `Unlock`, `Refusal` |
//! | `{sn}/rki/v1/init` | terminal → gateway | `CreateKey` (the only topic a bootstrap identity needs) |
//! | `rki/v1/backend/{org}/{name}/req` | RKI backend → gateway | `BackendRequest` |
//! | `rki/v1/backend/{org}/{name}/reply` | gateway → RKI backend | `BackendAnswer` |
//! | `rki/v1/backend/{org}/{name}/events` | gateway → RKI backend | `BackendEvent` |
//!
//! A device's topics start with its SN. A broker matches the first publish on a new topic against
//! every subscription filter, and every new filter against every topic (rumqttd by a linear scan,
//! one filter per terminal): with the SN first, two device topics differ at their first level and
//! the comparison stops there. Measured with the embedded broker, the router's CPU time for the
//! fleet's connect phase fell by about a quarter at 10,000 terminals and a third at 19,000
//! (docs/benchmarks/HISTORY.md, "Session 6").

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
    format!("{sn}/{PREFIX}/up")
}

pub fn device_down(sn: &str) -> String {
    format!("{sn}/{PREFIX}/down")
}

pub fn init(sn: &str) -> String {
    format!("{sn}/{PREFIX}/init")
}

/// Where the backend `{org}/{name}` publishes its requests.
pub fn backend_request(org: &str, name: &str) -> String {
    format!("{PREFIX}/backend/{org}/{name}/req")
}

/// Where the gateway publishes the answers to the backend `{org}/{name}`.
pub fn backend_reply(org: &str, name: &str) -> String {
    format!("{PREFIX}/backend/{org}/{name}/reply")
}

/// Where the gateway publishes the organization's events to the backend `{org}/{name}`.
pub fn backend_events(org: &str, name: &str) -> String {
    format!("{PREFIX}/backend/{org}/{name}/events")
}

/// Whether the backend `{org}/{name}` may publish on `topic`: its own request topic only.
pub fn backend_may_publish(org: &str, name: &str, topic: &str) -> bool {
    topic == backend_request(org, name)
}

/// Whether the backend `{org}/{name}` may subscribe to `filter`: its own reply and events topics
/// only, written out (no wildcard).
pub fn backend_may_subscribe(org: &str, name: &str, filter: &str) -> bool {
    filter == backend_reply(org, name) || filter == backend_events(org, name)
}

/// The `{org}` and `{name}` of a backend's reply or events topic (what the gateway publishes to
/// a backend), if `topic` is one and both are names.
pub fn parse_backend_outbound(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/backend/")?;
    let (org, rest) = rest.split_once('/')?;
    let name = rest.strip_suffix("/reply").or_else(|| rest.strip_suffix("/events"))?;
    (validate_name(org).is_ok() && validate_name(name).is_ok()).then_some((org, name))
}

/// The SN of a device's down topic, if `topic` is one (and its SN passes [`validate_name`]).
pub fn parse_device_down(topic: &str) -> Option<&str> {
    let (sn, rest) = topic.split_once('/')?;
    (rest.strip_prefix(PREFIX)? == "/down" && validate_name(sn).is_ok()).then_some(sn)
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

/// The filters the gateway subscribes to.
pub const FILTER_DEVICE_UP: &str = "+/rki/v1/up";
pub const FILTER_INIT: &str = "+/rki/v1/init";
/// Every device topic, and every backend topic: the gateway's own rights on an external broker.
pub const FILTER_ALL_DEVICES: &str = "+/rki/v1/#";
pub const FILTER_ALL_BACKEND: &str = "rki/v1/backend/#";
/// Every backend's request topic: what the gateway subscribes to on an external broker.
pub const FILTER_BACKEND_REQUESTS: &str = "rki/v1/backend/+/+/req";

/// A topic the gateway receives on, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    DeviceUp { sn: &'a str },
    Init { sn: &'a str },
    BackendRequest { org: &'a str, name: &'a str },
}

/// Parses a topic the gateway subscribes to. Anything else, or a name that fails
/// [`validate_name`], is `None`.
pub fn parse_inbound(topic: &str) -> Option<Inbound<'_>> {
    let backend = topic.strip_prefix(PREFIX).and_then(|rest| rest.strip_prefix("/backend/"));
    if let Some(rest) = backend {
        let (org, rest) = rest.split_once('/')?;
        let name = rest.strip_suffix("/req")?;
        validate_name(org).ok()?;
        validate_name(name).ok()?;
        return Some(Inbound::BackendRequest { org, name });
    }
    let (sn, rest) = topic.split_once('/')?;
    let parsed = match rest.strip_prefix(PREFIX)?.strip_prefix('/')? {
        "up" => Inbound::DeviceUp { sn },
        "init" => Inbound::Init { sn },
        _ => return None,
    };
    validate_name(sn).ok()?;
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
    fn device_topics_start_with_the_sn() {
        assert_eq!(device_up("SN1"), "SN1/rki/v1/up");
        assert_eq!(device_down("SN1"), "SN1/rki/v1/down");
        assert_eq!(init("SN1"), "SN1/rki/v1/init");
        assert_eq!(backend_request("acme", "erp"), "rki/v1/backend/acme/erp/req");
        assert_eq!(backend_reply("acme", "erp"), "rki/v1/backend/acme/erp/reply");
        assert_eq!(backend_events("acme", "erp"), "rki/v1/backend/acme/erp/events");
        assert_eq!(parse_device_down(&device_down("SN1")), Some("SN1"));
        for other in ["SN1/rki/v1/up", "+/rki/v1/down", "a/b/rki/v1/down", "SN1/rki/v1/down/x", "/rki/v1/down"] {
            assert_eq!(parse_device_down(other), None, "{other}");
        }
        // Topics of an SN that is also the prefix's first level stay apart from the backend's.
        assert_eq!(parse_inbound(&device_up("rki")), Some(Inbound::DeviceUp { sn: "rki" }));
        assert!(is_own_topic("SN1", &init("SN1")) && !is_own_topic("SN1", &device_up("SN2")));
        // The gateway's filters are the same scheme with a wildcard for the name.
        assert_eq!(FILTER_DEVICE_UP, device_up("+"));
        assert_eq!(FILTER_INIT, init("+"));
        assert_eq!(FILTER_BACKEND_REQUESTS, backend_request("+", "+"));
        assert_eq!(FILTER_ALL_DEVICES, format!("+/{PREFIX}/#"));
        assert_eq!(FILTER_ALL_BACKEND, format!("{PREFIX}/backend/#"));
    }

    #[test]
    fn inbound_topics_round_trip() {
        assert_eq!(parse_inbound(&device_up("SN1")), Some(Inbound::DeviceUp { sn: "SN1" }));
        assert_eq!(parse_inbound(&init("SN-2")), Some(Inbound::Init { sn: "SN-2" }));
        assert_eq!(
            parse_inbound(&backend_request("acme", "erp-1")),
            Some(Inbound::BackendRequest { org: "acme", name: "erp-1" })
        );
        // An SN that is also the prefix's first level stays a device.
        assert_eq!(parse_inbound("rki/rki/v1/up"), Some(Inbound::DeviceUp { sn: "rki" }));
    }

    #[test]
    fn outbound_and_malformed_topics_are_not_inbound() {
        for topic in [
            device_down("SN1").as_str(),
            "+/rki/v1/up",
            "#/rki/v1/up",
            "/rki/v1/up",
            "a/b/rki/v1/up",
            "SN1/rki/v2/up",
            "SN1/rki/v1",
            "",
            "SN1/rki/v1/init/extra",
            "rki/v1/dev/SN1/up",
            "rki/v1/init/SN1",
            "rki/v1/backend/+/+/req",
            "rki/v1/backend/acme/+/req",
            "rki/v1/backend/acme/erp/reply",
            "rki/v1/backend/acme/erp/events",
            "rki/v1/backend/acme/req",
            "rki/v1/backend/acme/tasks",
            "rki/v1/backend/a/b/c/req",
            "rki/v1/backend//erp/req",
            "rki/v1/backend/acme//req",
            "rki/v1/backend/acme/erp/req/x",
            "rki/v1/backend/acme:x/erp/req",
        ] {
            assert_eq!(parse_inbound(topic), None, "{topic}");
        }
    }

    #[test]
    fn a_backend_publishes_only_on_its_request_topic_and_reads_only_its_own_answers() {
        assert!(backend_may_publish("acme", "erp", &backend_request("acme", "erp")));
        for topic in [
            backend_reply("acme", "erp"),
            backend_events("acme", "erp"),
            backend_request("acme", "other"),
            backend_request("other", "erp"),
            device_up("SN1"),
            FILTER_BACKEND_REQUESTS.to_string(),
        ] {
            assert!(!backend_may_publish("acme", "erp", &topic), "{topic}");
        }
        assert!(backend_may_subscribe("acme", "erp", &backend_reply("acme", "erp")));
        assert!(backend_may_subscribe("acme", "erp", &backend_events("acme", "erp")));
        for filter in [
            backend_request("acme", "erp"),
            backend_reply("acme", "+"),
            backend_events("acme", "other"),
            "rki/v1/backend/acme/#".to_string(),
            "#".to_string(),
            device_down("SN1"),
        ] {
            assert!(!backend_may_subscribe("acme", "erp", &filter), "{filter}");
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

    #[test]
    fn a_backends_reply_and_events_topics_name_it_and_nothing_else_does() {
        assert_eq!(parse_backend_outbound(&backend_reply("acme", "erp-1")), Some(("acme", "erp-1")));
        assert_eq!(parse_backend_outbound(&backend_events("acme", "erp-1")), Some(("acme", "erp-1")));
        for other in [
            backend_request("acme", "erp-1"),
            device_down("SN1"),
            "rki/v1/backend/acme/+/reply".into(),
            "rki/v1/backend/acme/a/b/reply".into(),
        ] {
            assert_eq!(parse_backend_outbound(&other), None, "{other}");
        }
    }
}
