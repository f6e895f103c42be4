//! Whose user name this is: one of the identities the plugin decides (a terminal, a bootstrap
//! identity, an RKI backend), a name left to Mosquitto's own files (the gateway's message
//! identity), or nobody's. Parsed from the C string Mosquitto hands over, without allocating: the
//! access check runs it on every message.

use rki_protocol::{backend, topic};

/// An identity the plugin authenticates from the store and confines to its topics. Its parts are
/// checked names (`topic::validate_name`: `[A-Za-z0-9._-]`, 1 to 64), so none can be a wildcard,
/// a level separator or empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// An initialised terminal: user name and client id are its SN.
    Terminal { sn: &'a str },
    /// A terminal that is not yet initialised, `init@{SN}` (PROTOCOL.md §7).
    Bootstrap { sn: &'a str },
    /// An organization's RKI backend, `backend@{org}~{name}` (PROTOCOL.md §12.1).
    Backend { org: &'a str, name: &'a str },
}

impl<'a> Identity<'a> {
    /// The identity a user name names, if it is one of ours.
    pub fn parse(username: &'a str) -> Option<Identity<'a>> {
        if let Some(sn) = topic::bootstrap_sn(username) {
            return topic::validate_name(sn).is_ok().then_some(Identity::Bootstrap { sn });
        }
        if username.starts_with(backend::CLIENT_ID_PREFIX) {
            return backend::client_id_parts(username).ok().map(|(org, name)| Identity::Backend { org, name });
        }
        topic::validate_name(username).is_ok().then_some(Identity::Terminal { sn: username })
    }
}

/// Who decides a user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// The plugin: from the store at CONNECT, by [`crate::acl`] on every message.
    Plugin(Identity<'a>),
    /// Mosquitto's `password_file` and `acl_file` (the plugin answers "defer"): the names in
    /// `plugin_opt_defer_usernames`, i.e. the gateway's message identity.
    Mosquitto,
    /// No identity has this name (not UTF-8, a character no SN has, a malformed `init@`…):
    /// refused by the plugin, so it never reaches Mosquitto's files either.
    Nobody,
}

/// The user names left to Mosquitto's own files. They are listed rather than recognised by their
/// shape, because the gateway's identity (`rki-gateway`) is also a well-formed SN: without the
/// list, the plugin would take it for a terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deferred {
    names: Vec<Vec<u8>>,
}

/// Most names in `plugin_opt_defer_usernames`: the list is scanned on every message.
pub const DEFERRED_NAMES_MAX: usize = 16;

impl Deferred {
    /// A comma-separated list (`rki-gateway` or `rki-gateway,ops-monitor`); blanks around names
    /// are ignored. A deferred name is never looked up in the store.
    pub fn parse(text: &str) -> Result<Deferred, String> {
        let names: Vec<Vec<u8>> =
            text.split(',').map(str::trim).filter(|n| !n.is_empty()).map(|n| n.as_bytes().to_vec()).collect();
        if names.len() > DEFERRED_NAMES_MAX {
            return Err(format!("defer_usernames: at most {DEFERRED_NAMES_MAX} names"));
        }
        Ok(Deferred { names })
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn contains(&self, username: &[u8]) -> bool {
        self.names.iter().any(|n| n.as_slice() == username)
    }
}

/// Who decides `username` (the bytes of Mosquitto's C string, without its NUL).
pub fn owner<'a>(username: &'a [u8], deferred: &Deferred) -> Owner<'a> {
    if deferred.contains(username) {
        return Owner::Mosquitto;
    }
    match std::str::from_utf8(username).ok().and_then(Identity::parse) {
        Some(identity) => Owner::Plugin(identity),
        None => Owner::Nobody,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Deferred {
        Deferred::parse(" rki-gateway , ops ").expect("list")
    }

    #[test]
    fn each_identity_is_recognised_by_its_shape_and_listed_names_are_deferred() {
        let cases: &[(&[u8], Owner<'_>)] = &[
            (b"SN0001", Owner::Plugin(Identity::Terminal { sn: "SN0001" })),
            (b"P3-0001_a.b", Owner::Plugin(Identity::Terminal { sn: "P3-0001_a.b" })),
            (b"init@SN0001", Owner::Plugin(Identity::Bootstrap { sn: "SN0001" })),
            (b"backend@acme~erp-1", Owner::Plugin(Identity::Backend { org: "acme", name: "erp-1" })),
            (b"rki-gateway", Owner::Mosquitto),
            (b"ops", Owner::Mosquitto),
            // Deferred by the exact name only.
            (b"rki-gateway2", Owner::Plugin(Identity::Terminal { sn: "rki-gateway2" })),
            (b"RKI-GATEWAY", Owner::Plugin(Identity::Terminal { sn: "RKI-GATEWAY" })),
        ];
        for (username, expected) in cases {
            assert_eq!(owner(username, &gateway()), *expected, "{}", String::from_utf8_lossy(username));
        }
    }

    #[test]
    fn names_no_identity_can_have_belong_to_nobody() {
        let long = "x".repeat(65);
        let huge = "S".repeat(64 * 1024);
        let cases: Vec<&[u8]> = vec![
            b"",
            b"SN%1",
            b"SN/1",
            b"SN+",
            b"#",
            b"SN 1",
            b"SN:1",
            b"\xff\xfe",
            b"SN\xc3",
            long.as_bytes(),
            huge.as_bytes(),
            b"init@",
            b"init@SN/1",
            b"init@+",
            b"init@init@SN",
            b"backend@",
            b"backend@acme",
            b"backend@acme~",
            b"backend@~erp",
            b"backend@ac/me~erp",
            b"backend@acme~erp~x",
            b"backend@acme~#",
            b"$SYS",
            b"@SN",
        ];
        for username in cases {
            assert_eq!(owner(username, &gateway()), Owner::Nobody, "{}", String::from_utf8_lossy(username));
        }
    }

    #[test]
    fn the_deferred_list_is_bounded_and_may_be_empty() {
        assert!(Deferred::parse("").expect("empty").is_empty());
        assert!(Deferred::parse(" , ").expect("blanks").is_empty());
        let many = vec!["n"; DEFERRED_NAMES_MAX + 1].join(",");
        assert!(Deferred::parse(&many).is_err());
        assert_eq!(owner(b"SN1", &Deferred::default()), Owner::Plugin(Identity::Terminal { sn: "SN1" }));
    }
}
