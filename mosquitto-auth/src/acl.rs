//! The access rules of the plugin's identities: a pure function of (identity, topic, access),
//! called by Mosquitto for every publish, every delivery and every subscription, so it neither
//! allocates nor reads anything but its arguments. Topics are parsed by the protocol's one topic
//! scheme (`rki_protocol::topic`), never matched as filters: a topic or filter that is not exactly
//! one of the identity's own (a wildcard, a deeper level, another SN, `$CONTROL`, `$SYS`) is
//! denied.
//!
//! | identity | publish | subscribe, receive |
//! | --- | --- | --- |
//! | terminal `{SN}` | `{SN}/rki/v1/up` (its hellos, acks, and its will, `Bye`) | `{SN}/rki/v1/down` |
//! | `init@{SN}` | `{SN}/rki/v1/init` | `{SN}/rki/v1/down` |
//! | `backend@{org}~{name}` | `rki/v1/backend/{org}/{name}/req` | `…/reply`, `…/events` |
//!
//! Unsubscribing is always allowed: it only takes away.

use rki_protocol::topic::{self, Inbound};

use crate::identity::Identity;

/// What Mosquitto asks about (`MOSQ_ACL_*` in `mosquitto_plugin.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A message about to be delivered to the client (`MOSQ_ACL_READ`, 1).
    Read,
    /// A message the client publishes, its will included (`MOSQ_ACL_WRITE`, 2).
    Write,
    /// A subscription filter (`MOSQ_ACL_SUBSCRIBE`, 4).
    Subscribe,
    /// An unsubscription (`MOSQ_ACL_UNSUBSCRIBE`, 8).
    Unsubscribe,
}

impl Access {
    /// The access of Mosquitto's `access` value; `None` for a value the interface does not
    /// define (denied).
    pub fn from_mosquitto(access: i32) -> Option<Access> {
        match access {
            1 => Some(Access::Read),
            2 => Some(Access::Write),
            4 => Some(Access::Subscribe),
            8 => Some(Access::Unsubscribe),
            _ => None,
        }
    }
}

/// Whether `identity` may have `access` to `topic` (a topic name, or a filter for
/// [`Access::Subscribe`] and [`Access::Unsubscribe`]).
pub fn allowed(identity: Identity<'_>, topic: &str, access: Access) -> bool {
    match (identity, access) {
        (_, Access::Unsubscribe) => true,
        (Identity::Terminal { sn }, Access::Write) => topic::parse_inbound(topic) == Some(Inbound::DeviceUp { sn }),
        (Identity::Bootstrap { sn }, Access::Write) => topic::parse_inbound(topic) == Some(Inbound::Init { sn }),
        (Identity::Terminal { sn } | Identity::Bootstrap { sn }, Access::Read | Access::Subscribe) => {
            topic::parse_device_down(topic) == Some(sn)
        }
        (Identity::Backend { org, name }, Access::Write) => {
            topic::parse_inbound(topic) == Some(Inbound::BackendRequest { org, name })
        }
        (Identity::Backend { org, name }, Access::Read | Access::Subscribe) => {
            topic::parse_backend_outbound(topic) == Some((org, name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMINAL: Identity<'static> = Identity::Terminal { sn: "SN12" };
    const BOOTSTRAP: Identity<'static> = Identity::Bootstrap { sn: "SN12" };
    const BACKEND: Identity<'static> = Identity::Backend { org: "acme", name: "erp" };
    const ALL: [Access; 4] = [Access::Read, Access::Write, Access::Subscribe, Access::Unsubscribe];

    /// Which accesses `identity` has on `topic`, as a short string: `r` read, `w` write, `s`
    /// subscribe (unsubscribe is always allowed and not shown).
    fn rights(identity: Identity<'_>, topic: &str) -> String {
        let mut out = String::new();
        for (access, letter) in [(Access::Read, 'r'), (Access::Write, 'w'), (Access::Subscribe, 's')] {
            if allowed(identity, topic, access) {
                out.push(letter);
            }
        }
        out
    }

    #[test]
    fn each_identity_has_exactly_its_own_topics() {
        let long = format!("SN12/rki/v1/{}", "x".repeat(70_000));
        let table: &[(&str, &str, &str, &str)] = &[
            // topic, terminal SN12, init@SN12, backend acme/erp
            ("SN12/rki/v1/up", "w", "", ""),
            ("SN12/rki/v1/down", "rs", "rs", ""),
            ("SN12/rki/v1/init", "", "w", ""),
            ("rki/v1/backend/acme/erp/req", "", "", "w"),
            ("rki/v1/backend/acme/erp/reply", "", "", "rs"),
            ("rki/v1/backend/acme/erp/events", "", "", "rs"),
            // Another terminal's topics, whatever its SN looks like.
            ("SN1/rki/v1/up", "", "", ""),
            ("SN1/rki/v1/down", "", "", ""),
            ("SN123/rki/v1/down", "", "", ""),
            ("SN12x/rki/v1/up", "", "", ""),
            ("xSN12/rki/v1/down", "", "", ""),
            ("sn12/rki/v1/down", "", "", ""),
            // Wildcards and deeper or shallower levels.
            ("+/rki/v1/down", "", "", ""),
            ("+/rki/v1/up", "", "", ""),
            ("#", "", "", ""),
            ("+", "", "", ""),
            ("SN12/#", "", "", ""),
            ("SN12/rki/v1/#", "", "", ""),
            ("SN12/rki/v1/+", "", "", ""),
            ("SN12/+/v1/down", "", "", ""),
            ("SN12/rki/v1/up/x", "", "", ""),
            ("SN12/rki/v1/down/x", "", "", ""),
            ("SN12/rki/v1/down/", "", "", ""),
            ("/SN12/rki/v1/down", "", "", ""),
            ("SN12//rki/v1/down", "", "", ""),
            ("SN12/rki/v2/down", "", "", ""),
            ("SN12/rki/v1", "", "", ""),
            ("SN12", "", "", ""),
            ("", "", "", ""),
            (long.as_str(), "", "", ""),
            // Another backend, or the backend tree with wildcards.
            ("rki/v1/backend/acme/crm/reply", "", "", ""),
            ("rki/v1/backend/globex/erp/req", "", "", ""),
            ("rki/v1/backend/acme/+/reply", "", "", ""),
            ("rki/v1/backend/+/erp/events", "", "", ""),
            ("rki/v1/backend/acme/erp/#", "", "", ""),
            ("rki/v1/backend/acme/erp/req/x", "", "", ""),
            ("rki/v1/backend/#", "", "", ""),
            // The broker's own trees and shared subscriptions.
            ("$CONTROL/dynamic-security/v1", "", "", ""),
            ("$CONTROL/#", "", "", ""),
            ("$SYS/#", "", "", ""),
            ("$SYS/broker/clients/connected", "", "", ""),
            ("$share/g/SN12/rki/v1/down", "", "", ""),
            ("$share/g/+/rki/v1/up", "", "", ""),
        ];
        for (topic, terminal, bootstrap, backend) in table {
            let short: String = topic.chars().take(40).collect();
            assert_eq!(rights(TERMINAL, topic), *terminal, "terminal on {short}");
            assert_eq!(rights(BOOTSTRAP, topic), *bootstrap, "init@ on {short}");
            assert_eq!(rights(BACKEND, topic), *backend, "backend on {short}");
        }
    }

    #[test]
    fn an_sn_that_prefixes_another_or_the_tree_gets_only_its_own() {
        // `rki` is a valid SN: its topics start like the backend tree's, and stay apart.
        let rki = Identity::Terminal { sn: "rki" };
        assert_eq!(rights(rki, "rki/rki/v1/up"), "w");
        assert_eq!(rights(rki, "rki/rki/v1/down"), "rs");
        assert_eq!(rights(rki, "rki/v1/backend/acme/erp/req"), "");
        assert_eq!(rights(rki, "rki/v1/up"), "");
        let s = Identity::Terminal { sn: "S" };
        assert_eq!(rights(s, "SN12/rki/v1/down"), "");
        assert_eq!(rights(s, "S/rki/v1/down"), "rs");
    }

    #[test]
    fn unsubscribing_is_always_allowed_and_unknown_accesses_are_not_accesses() {
        for identity in [TERMINAL, BOOTSTRAP, BACKEND] {
            for topic in ["#", "SN1/rki/v1/down", "$CONTROL/#", ""] {
                assert!(allowed(identity, topic, Access::Unsubscribe));
            }
        }
        assert_eq!(ALL.map(|a| Access::from_mosquitto(code(a))), ALL.map(Some));
        for value in [0, 3, 5, 16, -1, i32::MAX] {
            assert_eq!(Access::from_mosquitto(value), None, "{value}");
        }
    }

    fn code(access: Access) -> i32 {
        match access {
            Access::Read => 1,
            Access::Write => 2,
            Access::Subscribe => 4,
            Access::Unsubscribe => 8,
        }
    }
}
