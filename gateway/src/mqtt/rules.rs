//! The endpoint's decisions, as pure functions: who a CONNECT claims to be, which CONNACK code a
//! refusal gets, which topics an identity may use, how many connections the process may hold and
//! when a silent connection has timed out. No socket, no clock read, no MQTT packet here: the
//! connection task asks, these answer, and the tables in the tests below exhaust them.

use std::time::Duration;

use rki_protocol::backend::BackendId;
use rki_protocol::topic;

use super::session::Subscription;

/// Who a connection is, once its CONNECT is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An initialised terminal: client id = user name = SN.
    Device(String),
    /// A terminal initialising: `init@{SN}`, proven by a live GUDID's bootstrap password.
    Bootstrap(String),
    /// An organization's RKI backend: `backend@{org}~{name}` (`docs/PROTOCOL.md` §12.1).
    Backend(BackendId),
}

impl Identity {
    /// The MQTT client id, which is also the key of its session.
    pub fn client_id(&self) -> String {
        match self {
            Identity::Device(sn) => sn.clone(),
            Identity::Bootstrap(sn) => topic::bootstrap_client_id(sn),
            Identity::Backend(id) => id.client_id(),
        }
    }

    /// The only topic filters it may subscribe to: the SN's down topic, where the downlinks
    /// (`CreateKeyAnswer` for a bootstrap identity; `Download`, `Unlock` for a device) arrive; a
    /// backend's own reply and events topics, written out.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscription(filter).is_some()
    }

    /// Which of its topics `filter` is, if it may subscribe to it: each has its own flag in the
    /// session, so a backend subscribed to its reply topic only is sent no event.
    pub fn subscription(&self, filter: &str) -> Option<Subscription> {
        match self {
            Identity::Device(sn) | Identity::Bootstrap(sn) => {
                (filter == topic::device_down(sn)).then_some(Subscription::Down)
            }
            Identity::Backend(id) if filter == topic::backend_reply(id.org(), id.name()) => Some(Subscription::Reply),
            Identity::Backend(id) if filter == topic::backend_events(id.org(), id.name()) => Some(Subscription::Events),
            Identity::Backend(_) => None,
        }
    }

    /// The only topic it may publish on: its uplink (`{SN}/rki/v1/up` for a device,
    /// `{SN}/rki/v1/init` for a bootstrap identity, its own request topic for a backend). A will
    /// may name a terminal's uplink only: a backend has none.
    pub fn may_publish(&self, topic_name: &str) -> bool {
        match self {
            Identity::Device(sn) => topic_name == topic::device_up(sn),
            Identity::Bootstrap(sn) => topic_name == topic::init(sn),
            Identity::Backend(id) => topic::backend_may_publish(id.org(), id.name(), topic_name),
        }
    }

    /// Whether a will on `topic_name` is allowed: a terminal's own uplink only.
    pub fn may_will(&self, topic_name: &str) -> bool {
        !matches!(self, Identity::Backend(_)) && self.may_publish(topic_name)
    }

    /// The largest packet it may send after its CONNECT: a backend frame is up to 128 KiB.
    pub fn packet_len_max(&self) -> usize {
        match self {
            Identity::Backend(_) => BACKEND_PACKET_LEN_MAX,
            _ => super::codec::PACKET_LEN_MAX,
        }
    }
}

/// A backend's packets: its frame (`BACKEND_FRAME_LEN_MAX`) and the PUBLISH header (topic,
/// properties) beside it.
pub const BACKEND_PACKET_LEN_MAX: usize = rki_protocol::frame::BACKEND_FRAME_LEN_MAX + 1024;
/// Downlinks a backend's session holds at most: a batch of events and its answers.
pub const BACKEND_SESSION_MESSAGES_MAX: usize = 2 * rki_protocol::backend::EVENTS_BATCH_MAX as usize + 64;

/// Why a CONNECT was refused: the label of `rki_mqtt_connects_refused_total{reason}`, and the
/// CONNACK code the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// The client id is neither an SN nor `init@{SN}` (empty, too long, a forbidden character).
    BadClientId,
    /// The user name is not the client id.
    ClientIdMismatch,
    /// No user name or no password.
    NoCredentials,
    /// Wrong password, unknown SN, or (bootstrap) no live GUDID or a password not derived from it.
    BadCredentials(&'static str),
    /// A registered SN that has not initialised yet connects as a device.
    NotInitialised,
    /// A will on any topic but the identity's own uplink.
    ForeignWill,
    /// The process holds as many connections as its bound allows.
    OverConnectionBound,
    /// The gateway is starting, its store did not answer, or (`bootstrap_busy`) it holds as many
    /// initialising terminals as it answers promptly.
    Unavailable(&'static str),
}

/// The MQTT 3.1.1 CONNACK return codes the endpoint uses.
pub mod v4_code {
    pub const IDENTIFIER_REJECTED: u8 = 2;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// The MQTT 5.0 CONNACK reason codes the endpoint uses.
pub mod v5_code {
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
}

impl ConnectRefusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ConnectRefusal::BadClientId => "bad_client_id",
            ConnectRefusal::ClientIdMismatch => "client_id_mismatch",
            ConnectRefusal::NoCredentials => "no_credentials",
            ConnectRefusal::BadCredentials(reason) => reason,
            ConnectRefusal::NotInitialised => "not_initialised",
            ConnectRefusal::ForeignWill => "foreign_will",
            ConnectRefusal::OverConnectionBound => "over_connection_bound",
            ConnectRefusal::Unavailable(reason) => reason,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code.
    pub fn v4_code(self) -> u8 {
        match self {
            ConnectRefusal::BadClientId => v4_code::IDENTIFIER_REJECTED,
            ConnectRefusal::NoCredentials | ConnectRefusal::BadCredentials(_) => v4_code::BAD_USER_NAME_OR_PASSWORD,
            ConnectRefusal::ClientIdMismatch | ConnectRefusal::NotInitialised | ConnectRefusal::ForeignWill => {
                v4_code::NOT_AUTHORIZED
            }
            ConnectRefusal::OverConnectionBound | ConnectRefusal::Unavailable(_) => v4_code::SERVER_UNAVAILABLE,
        }
    }

    /// The MQTT 5.0 CONNACK reason code.
    pub fn v5_code(self) -> u8 {
        match self {
            ConnectRefusal::BadClientId => v5_code::CLIENT_IDENTIFIER_NOT_VALID,
            ConnectRefusal::NoCredentials | ConnectRefusal::BadCredentials(_) => v5_code::BAD_USER_NAME_OR_PASSWORD,
            ConnectRefusal::ClientIdMismatch | ConnectRefusal::NotInitialised | ConnectRefusal::ForeignWill => {
                v5_code::NOT_AUTHORIZED
            }
            ConnectRefusal::OverConnectionBound | ConnectRefusal::Unavailable(_) => v5_code::SERVER_UNAVAILABLE,
        }
    }

    /// The refusal for a reason `Engine::authenticate` gives.
    pub fn from_authentication(reason: &'static str) -> ConnectRefusal {
        match reason {
            "client_id_mismatch" => ConnectRefusal::ClientIdMismatch,
            "bad_sn" => ConnectRefusal::BadClientId,
            "not_initialised" => ConnectRefusal::NotInitialised,
            "store" | "internal" | "starting" => ConnectRefusal::Unavailable(reason),
            other => ConnectRefusal::BadCredentials(other),
        }
    }
}

/// Every refusal reason label, for exporting the counter at 0 from the start.
pub const CONNECT_REFUSAL_REASONS: &[&str] = &[
    "bad_client_id",
    "client_id_mismatch",
    "no_credentials",
    "bad_password",
    "unknown_sn",
    "bad_bootstrap",
    "no_live_gudid",
    "not_initialised",
    "foreign_will",
    "over_connection_bound",
    "starting",
    "store",
    "bootstrap_busy",
];

/// Who the CONNECT claims to be, from its client id and user name, before any password is
/// looked at: both must be equal, and name an SN or `init@{SN}` with a valid SN.
pub fn claimed_identity(
    client_id: &str,
    username: Option<&str>,
    has_password: bool,
) -> Result<Identity, ConnectRefusal> {
    let identity = if client_id.starts_with(rki_protocol::backend::CLIENT_ID_PREFIX) {
        Identity::Backend(BackendId::parse_client_id(client_id).map_err(|_| ConnectRefusal::BadClientId)?)
    } else {
        let identity = match topic::bootstrap_sn(client_id) {
            Some(sn) => Identity::Bootstrap(sn.to_string()),
            None => Identity::Device(client_id.to_string()),
        };
        if let Identity::Device(sn) | Identity::Bootstrap(sn) = &identity {
            if topic::validate_name(sn).is_err() {
                return Err(ConnectRefusal::BadClientId);
            }
        }
        identity
    };
    match username {
        None => Err(ConnectRefusal::NoCredentials),
        Some(_) if !has_password => Err(ConnectRefusal::NoCredentials),
        Some(name) if name != client_id => Err(ConnectRefusal::ClientIdMismatch),
        Some(_) => Ok(identity),
    }
}

/// Descriptors kept for the store, the HTTP listener, logs and the TLS files.
pub const FD_RESERVE: u64 = 300;
/// The bound when the open-file limit cannot be read.
pub const CONNECTIONS_MAX_UNKNOWN_LIMIT: usize = 1000;

/// The connection bound for an open-file limit: the limit less a reserve, so that accepting one
/// more socket never takes the descriptor the store needs. `None` (unreadable) gives a small bound.
pub fn connection_bound(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(limit) if limit > FD_RESERVE + 100 => (limit - FD_RESERVE).min(1_000_000) as usize,
        Some(limit) => (limit / 2).max(1) as usize,
        None => CONNECTIONS_MAX_UNKNOWN_LIMIT,
    }
}

/// The part of the endpoint's sockets (`sockets`, its share of the open-file limit) kept for
/// connections that have not had their CONNACK yet: a fiftieth, 8 to 512 (at most half, at least
/// one). A CONNECT takes milliseconds, so a reconnect storm fits; the accept loop holds
/// at most this many sockets before their CONNACK, so that sockets that never send a CONNECT (a
/// flood of them) wait in the listen backlog instead of taking the descriptors the store and the
/// admin port need; authenticated connections get the rest.
pub fn pending_bound(sockets: usize) -> usize {
    (sockets / 50).clamp(8, 512).min(sockets / 2).max(1)
}

/// Authenticated connections at most, out of `sockets`: what [`pending_bound`] leaves, at least 1.
pub fn authenticated_bound(sockets: usize) -> usize {
    sockets.saturating_sub(pending_bound(sockets)).max(1)
}

/// Whether one more authenticated connection fits, with `open` already admitted.
pub fn admits(open: usize, bound: usize) -> bool {
    open < bound
}

/// How long a connection may stay silent: 1.5 × the client's keep-alive, `None` for a keep-alive
/// of 0 (the client asked for none).
pub fn keep_alive_timeout(keep_alive_seconds: u16) -> Option<Duration> {
    (keep_alive_seconds > 0).then(|| Duration::from_millis(u64::from(keep_alive_seconds) * 1500))
}

/// The session a CONNECT asks for: how long it outlives the connection (`None`: it ends with it).
/// MQTT 3.1.1: clean session 0 keeps it, for at most `lifetime_max`. MQTT 5.0: Clean Start 0 with
/// a Session Expiry Interval keeps it for that interval, capped.
pub fn session_lifetime(
    v5: bool,
    clean: bool,
    expiry_seconds: Option<u32>,
    lifetime_max: Duration,
) -> Option<Duration> {
    let asked = if v5 {
        match expiry_seconds {
            None | Some(0) => return None,
            Some(seconds) => Duration::from_secs(u64::from(seconds)),
        }
    } else if clean {
        return None;
    } else {
        lifetime_max
    };
    Some(asked.min(lifetime_max))
}

/// Whether a previous session may be resumed: 3.1.1 clean session 0, 5.0 Clean Start 0.
pub fn resumes(clean: bool) -> bool {
    !clean
}

/// A short, escaped prefix of an attacker-chosen string, for a log line.
pub fn log_prefix(text: &str) -> String {
    const LEN: usize = 24;
    let mut out: String = text.chars().take(LEN).flat_map(char::escape_default).take(LEN * 2).collect();
    if text.chars().count() > LEN {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_may_subscribe_only_to_its_own_down_topic() {
        let device = Identity::Device("SN1".into());
        let boot = Identity::Bootstrap("SN1".into());
        let cases: &[(&Identity, &str, bool)] = &[
            (&device, "SN1/rki/v1/down", true),
            (&boot, "SN1/rki/v1/down", true),
            (&device, "SN2/rki/v1/down", false),
            (&device, "SN1/rki/v1/up", false),
            (&device, "SN1/rki/v1/init", false),
            (&device, "#", false),
            (&device, "+/rki/v1/down", false),
            (&device, "SN1/rki/v1/#", false),
            (&device, "SN1/rki/v1/+", false),
            (&boot, "SN2/rki/v1/down", false),
            (&boot, "#", false),
            (&boot, "rki/v1/backend/+/tasks", false),
            (&device, "", false),
            (&device, "SN1/rki/v1/down/", false),
        ];
        for (identity, filter, allowed) in cases {
            assert_eq!(identity.may_subscribe(filter), *allowed, "{identity:?} subscribing to {filter:?}");
        }
    }

    #[test]
    fn each_identity_may_publish_only_on_its_own_uplink() {
        let device = Identity::Device("SN1".into());
        let boot = Identity::Bootstrap("SN1".into());
        let cases: &[(&Identity, &str, bool)] = &[
            (&device, "SN1/rki/v1/up", true),
            (&device, "SN1/rki/v1/init", false),
            (&device, "SN1/rki/v1/down", false),
            (&device, "SN2/rki/v1/up", false),
            (&device, "rki/v1/backend/acme/tasks", false),
            (&boot, "SN1/rki/v1/init", true),
            (&boot, "SN1/rki/v1/up", false),
            (&boot, "SN2/rki/v1/init", false),
            (&boot, "SN1/rki/v1/down", false),
        ];
        for (identity, topic_name, allowed) in cases {
            assert_eq!(identity.may_publish(topic_name), *allowed, "{identity:?} publishing on {topic_name:?}");
        }
    }

    #[test]
    fn a_connect_claims_an_identity_only_with_matching_credentials() {
        use ConnectRefusal::*;
        type Case<'a> = (&'a str, Option<&'a str>, bool, Result<Identity, ConnectRefusal>);
        let cases: &[Case] = &[
            ("SN1", Some("SN1"), true, Ok(Identity::Device("SN1".into()))),
            ("init@SN1", Some("init@SN1"), true, Ok(Identity::Bootstrap("SN1".into()))),
            ("SN1", Some("SN2"), true, Err(ClientIdMismatch)),
            ("init@SN1", Some("SN1"), true, Err(ClientIdMismatch)),
            ("SN1", None, false, Err(NoCredentials)),
            ("SN1", Some("SN1"), false, Err(NoCredentials)),
            ("", Some(""), true, Err(BadClientId)),
            ("init@", Some("init@"), true, Err(BadClientId)),
            ("a/b", Some("a/b"), true, Err(BadClientId)),
            ("#", Some("#"), true, Err(BadClientId)),
            ("init@+", Some("init@+"), true, Err(BadClientId)),
            (&"x".repeat(65), Some(&"x".repeat(65)), true, Err(BadClientId)),
        ];
        for (client_id, username, has_password, expected) in cases {
            assert_eq!(&claimed_identity(client_id, *username, *has_password), expected, "{client_id:?}");
        }
    }

    #[test]
    fn every_refusal_has_the_connack_code_that_says_why() {
        use ConnectRefusal::*;
        let cases: &[(ConnectRefusal, &str, u8, u8)] = &[
            (BadClientId, "bad_client_id", 2, 0x85),
            (ClientIdMismatch, "client_id_mismatch", 5, 0x87),
            (NoCredentials, "no_credentials", 4, 0x86),
            (BadCredentials("bad_password"), "bad_password", 4, 0x86),
            (BadCredentials("unknown_sn"), "unknown_sn", 4, 0x86),
            (BadCredentials("no_live_gudid"), "no_live_gudid", 4, 0x86),
            (BadCredentials("bad_bootstrap"), "bad_bootstrap", 4, 0x86),
            (NotInitialised, "not_initialised", 5, 0x87),
            (ForeignWill, "foreign_will", 5, 0x87),
            (OverConnectionBound, "over_connection_bound", 3, 0x88),
            (Unavailable("starting"), "starting", 3, 0x88),
            (Unavailable("store"), "store", 3, 0x88),
            (Unavailable("bootstrap_busy"), "bootstrap_busy", 3, 0x88),
        ];
        for (refusal, reason, v4, v5) in cases {
            assert_eq!((refusal.reason(), refusal.v4_code(), refusal.v5_code()), (*reason, *v4, *v5), "{refusal:?}");
            assert!(CONNECT_REFUSAL_REASONS.contains(reason), "{reason} is exported at 0");
        }
        for reason in ["bad_password", "unknown_sn", "bad_bootstrap", "no_live_gudid"] {
            assert_eq!(ConnectRefusal::from_authentication(reason), BadCredentials(reason));
        }
        assert_eq!(ConnectRefusal::from_authentication("bad_sn"), BadClientId);
        assert_eq!(ConnectRefusal::from_authentication("not_initialised"), NotInitialised);
        assert_eq!(ConnectRefusal::from_authentication("store"), Unavailable("store"));
    }

    #[test]
    fn the_connection_bound_leaves_a_reserve_of_descriptors() {
        let cases: &[(Option<u64>, usize)] = &[
            (Some(1_048_576), 1_000_000),
            (Some(20_000), 19_700),
            (Some(1024), 724),
            (Some(400), 200),
            (Some(2), 1),
            (None, CONNECTIONS_MAX_UNKNOWN_LIMIT),
        ];
        for (limit, bound) in cases {
            assert_eq!(connection_bound(*limit), *bound, "{limit:?}");
        }
        // Sockets before their CONNACK and authenticated connections share the bound.
        let cases: &[(usize, usize, usize)] =
            &[(1_000_000, 512, 999_488), (19_700, 394, 19_306), (100, 8, 92), (10, 5, 5), (1, 1, 1)];
        for (sockets, pending, authenticated) in cases {
            assert_eq!(
                (pending_bound(*sockets), authenticated_bound(*sockets)),
                (*pending, *authenticated),
                "{sockets}"
            );
        }
        assert!(admits(0, 1) && admits(723, 724));
        assert!(!admits(724, 724) && !admits(725, 724) && !admits(0, 0));
    }

    #[test]
    fn keep_alive_and_session_lifetimes() {
        assert_eq!(keep_alive_timeout(0), None);
        assert_eq!(keep_alive_timeout(1), Some(Duration::from_millis(1500)));
        assert_eq!(keep_alive_timeout(60), Some(Duration::from_secs(90)));
        let max = Duration::from_secs(3600);
        let cases: &[(bool, bool, Option<u32>, Option<Duration>)] = &[
            (false, true, None, None),
            (false, false, None, Some(max)),
            (true, true, None, None),
            (true, false, None, None),
            (true, false, Some(0), None),
            (true, false, Some(30), Some(Duration::from_secs(30))),
            (true, true, Some(30), Some(Duration::from_secs(30))),
            (true, false, Some(u32::MAX), Some(max)),
        ];
        for (v5, clean, expiry, lifetime) in cases {
            assert_eq!(session_lifetime(*v5, *clean, *expiry, max), *lifetime, "v5 {v5} clean {clean} {expiry:?}");
        }
        assert!(resumes(false) && !resumes(true));
    }

    #[test]
    fn attacker_strings_reach_the_log_short_and_escaped() {
        assert_eq!(log_prefix("SN1"), "SN1");
        assert_eq!(log_prefix("a\nb"), "a\\nb");
        let long = log_prefix(&"x".repeat(10_000));
        assert!(long.chars().count() <= 25, "{long}");
        assert!(log_prefix(&"\u{1b}".repeat(100)).len() <= 60);
    }

    #[test]
    fn a_backend_identity_reaches_its_own_three_topics_only_and_has_no_will() {
        let backend = claimed_identity("backend@acme~erp-1", Some("backend@acme~erp-1"), true).expect("a backend");
        assert_eq!(backend.client_id(), "backend@acme~erp-1");
        assert!(backend.may_publish("rki/v1/backend/acme/erp-1/req"));
        assert!(!backend.may_will("rki/v1/backend/acme/erp-1/req"), "no will at all");
        for foreign in [
            "rki/v1/backend/acme/erp-2/req",
            "rki/v1/backend/globex/erp-1/req",
            "SN1/rki/v1/up",
            "rki/v1/backend/acme/erp-1/reply",
        ] {
            assert!(!backend.may_publish(foreign), "{foreign}");
        }
        assert_eq!(backend.subscription("rki/v1/backend/acme/erp-1/reply"), Some(Subscription::Reply));
        assert_eq!(backend.subscription("rki/v1/backend/acme/erp-1/events"), Some(Subscription::Events));
        for foreign in [
            "rki/v1/backend/acme/+/events",
            "rki/v1/backend/#",
            "#",
            "rki/v1/backend/acme/erp-2/events",
            "SN1/rki/v1/down",
        ] {
            assert!(!backend.may_subscribe(foreign), "{foreign}");
        }
        assert!(backend.packet_len_max() > 128 * 1024);
        assert_eq!(Identity::Device("SN1".into()).packet_len_max(), super::super::codec::PACKET_LEN_MAX);
        let refused = [
            ("backend@acme", Some("backend@acme"), ConnectRefusal::BadClientId),
            ("backend@acme~e/rp", Some("backend@acme~e/rp"), ConnectRefusal::BadClientId),
            ("backend@acme:erp", Some("backend@acme:erp"), ConnectRefusal::BadClientId),
            ("backend@acme~erp", Some("backend@acme~crm"), ConnectRefusal::ClientIdMismatch),
            ("backend@acme~erp", None, ConnectRefusal::NoCredentials),
        ];
        for (client_id, user, refusal) in refused {
            assert_eq!(claimed_identity(client_id, user, true), Err(refusal), "{client_id}");
        }
    }
}
