//! The decision at CONNECT (`MOSQ_EVT_BASIC_AUTH`): whose name it is, whether the client id is
//! the name, and whether the password matches one of the identity's current `$7$` hashes in the
//! store. Pure but for the [`Credentials`] it is given, so the tests drive it with a table.
//!
//! There is no cache: the store is read at every CONNECT, so a hash the store has replaced (a
//! re-initialised terminal, a GUDID proven or revoked, a backend revoked) opens nothing from the
//! next CONNECT on, whichever gateway node changed it.

use crate::identity::{owner, Deferred, Owner};

/// Most hashes one identity may have at once (a bootstrap identity with more than one live
/// GUDID): each costs a PBKDF2, so a store row cannot make a CONNECT arbitrarily slow.
pub const HASHES_PER_IDENTITY_MAX: usize = 4;

/// Where the current hashes of an identity come from (the store, or a table in the tests).
pub trait Credentials {
    /// The `$7$` hashes under which `username` may connect now: none for an unknown or
    /// disowned identity. At most [`HASHES_PER_IDENTITY_MAX`] are looked at.
    fn hashes(&mut self, username: &str) -> Result<Vec<String>, StoreUnavailable>;

    /// The current hashes of these terminals, as `(SN, hash)`: an SN with none has no row. The
    /// store answers them in one query; this default asks one at a time.
    fn terminal_hashes(&mut self, sns: &[String]) -> Result<Vec<(String, String)>, StoreUnavailable> {
        let mut out = Vec::new();
        for sn in sns {
            out.extend(self.hashes(sn)?.into_iter().map(|h| (sn.clone(), h)));
        }
        Ok(out)
    }
}

/// The store could not answer (down, too slow, still reconnecting); the text says why, without
/// the URL or any password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUnavailable(pub String);

/// Why a CONNECT was refused, for the log (a terminal sees Mosquitto's "not authorised").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoUsername,
    /// A name no identity has, and not one left to Mosquitto's files.
    NotAnIdentity,
    /// The client id is not the user name.
    ClientIdMismatch,
    NoPassword,
    /// No current hash: an unknown SN, a terminal not initialised, an `init@` without a live
    /// GUDID, a revoked backend.
    NoCredentials,
    WrongPassword,
    Store(StoreUnavailable),
}

impl Refusal {
    /// A short label for the log.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoUsername => "no user name",
            Refusal::NotAnIdentity => "not an RKI identity",
            Refusal::ClientIdMismatch => "client id differs from the user name",
            Refusal::NoPassword => "no password",
            Refusal::NoCredentials => "no current credentials in the store",
            Refusal::WrongPassword => "wrong password",
            Refusal::Store(_) => "store unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted: the password matched this current hash.
    Allow {
        hash: String,
    },
    /// Not ours: Mosquitto's `password_file` decides (`MOSQ_ERR_PLUGIN_DEFER`).
    Defer,
    Refuse(Refusal),
}

/// What Mosquitto hands over at CONNECT: the bytes of its C strings, without their NUL (a
/// password with a NUL in it reaches every Mosquitto check cut at the NUL, this one included).
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    pub username: Option<&'a [u8]>,
    pub client_id: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
}

pub fn decide(connect: Connect<'_>, deferred: &Deferred, credentials: &mut dyn Credentials) -> Decision {
    let Some(username) = connect.username else { return Decision::Refuse(Refusal::NoUsername) };
    match owner(username, deferred) {
        Owner::Mosquitto => return Decision::Defer,
        Owner::Nobody => return Decision::Refuse(Refusal::NotAnIdentity),
        Owner::Plugin(_) => {}
    }
    if connect.client_id != Some(username) {
        return Decision::Refuse(Refusal::ClientIdMismatch);
    }
    let Some(password) = connect.password else { return Decision::Refuse(Refusal::NoPassword) };
    // `owner` parsed the name as UTF-8 already.
    let Ok(name) = std::str::from_utf8(username) else { return Decision::Refuse(Refusal::NotAnIdentity) };
    let hashes = match credentials.hashes(name) {
        Ok(hashes) => hashes,
        Err(e) => return Decision::Refuse(Refusal::Store(e)),
    };
    if hashes.is_empty() {
        return Decision::Refuse(Refusal::NoCredentials);
    }
    // Every hash is checked (no early exit), so the time does not say which one matched.
    let mut matched = None;
    for hash in hashes.into_iter().take(HASHES_PER_IDENTITY_MAX) {
        if rki_gateway::mosquitto::verify_password_hash(password, &hash) {
            matched = Some(hash);
        }
    }
    match matched {
        Some(hash) => Decision::Allow { hash },
        None => Decision::Refuse(Refusal::WrongPassword),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The store as a table; counts the lookups.
    #[derive(Default)]
    struct Table {
        rows: HashMap<String, Vec<String>>,
        down: bool,
        lookups: usize,
    }

    impl Credentials for Table {
        fn hashes(&mut self, username: &str) -> Result<Vec<String>, StoreUnavailable> {
            self.lookups += 1;
            if self.down {
                return Err(StoreUnavailable("connection refused".into()));
            }
            Ok(self.rows.get(username).cloned().unwrap_or_default())
        }
    }

    fn hash(password: &str) -> String {
        rki_gateway::mosquitto::password_hash(password.as_bytes()).expect("hash")
    }

    fn connect<'a>(username: &'a str, client_id: &'a str, password: &'a str) -> Connect<'a> {
        Connect {
            username: Some(username.as_bytes()),
            client_id: Some(client_id.as_bytes()),
            password: Some(password.as_bytes()),
        }
    }

    fn store() -> Table {
        let mut rows = HashMap::new();
        rows.insert("SN1".to_string(), vec![hash("sn1-pw")]);
        rows.insert("init@SN2".to_string(), vec![hash("old-gudid"), hash("new-gudid")]);
        rows.insert("backend@acme~erp".to_string(), vec![hash("erp-pw")]);
        Table { rows, ..Table::default() }
    }

    fn gateway() -> Deferred {
        Deferred::parse("rki-gateway").expect("list")
    }

    #[test]
    fn each_identity_connects_with_its_current_password_only() {
        let mut table = store();
        let cases: &[(Connect<'_>, Decision)] = &[
            (connect("SN1", "SN1", "sn1-pw"), allow()),
            (connect("init@SN2", "init@SN2", "new-gudid"), allow()),
            (connect("init@SN2", "init@SN2", "old-gudid"), allow()),
            (connect("backend@acme~erp", "backend@acme~erp", "erp-pw"), allow()),
            (connect("SN1", "SN1", "SN1-pw"), Decision::Refuse(Refusal::WrongPassword)),
            (connect("SN1", "SN1", ""), Decision::Refuse(Refusal::WrongPassword)),
            (connect("SN1", "SN2", "sn1-pw"), Decision::Refuse(Refusal::ClientIdMismatch)),
            (connect("SN1", "", "sn1-pw"), Decision::Refuse(Refusal::ClientIdMismatch)),
            (connect("SN9", "SN9", "sn1-pw"), Decision::Refuse(Refusal::NoCredentials)),
            (connect("init@SN1", "init@SN1", "sn1-pw"), Decision::Refuse(Refusal::NoCredentials)),
            (connect("backend@acme~crm", "backend@acme~crm", "erp-pw"), Decision::Refuse(Refusal::NoCredentials)),
            (connect("rki-gateway", "rki-gateway-1", "anything"), Decision::Defer),
            (connect("SN/1", "SN/1", "x"), Decision::Refuse(Refusal::NotAnIdentity)),
            (connect("SN+", "SN+", "x"), Decision::Refuse(Refusal::NotAnIdentity)),
            (connect("SN%", "SN%", "x"), Decision::Refuse(Refusal::NotAnIdentity)),
            (connect("#", "#", "x"), Decision::Refuse(Refusal::NotAnIdentity)),
        ];
        for (c, expected) in cases {
            assert_eq!(simple(decide(*c, &gateway(), &mut table)), *expected, "{c:?}");
        }
    }

    #[test]
    fn garbage_is_refused_without_asking_the_store() {
        let mut table = store();
        let huge = vec![b'S'; 64 * 1024];
        let cases: Vec<Connect<'_>> = vec![
            Connect { username: None, client_id: Some(b"SN1"), password: Some(b"sn1-pw") },
            Connect { username: Some(b"SN1"), client_id: Some(b"SN1"), password: None },
            Connect { username: Some(b"\xffSN"), client_id: Some(b"\xffSN"), password: Some(b"x") },
            Connect { username: Some(&huge), client_id: Some(&huge), password: Some(b"x") },
            Connect { username: Some(b"SN1"), client_id: None, password: Some(b"x") },
            connect("init@", "init@", "x"),
            connect("backend@acme", "backend@acme", "x"),
        ];
        for c in cases {
            assert!(matches!(decide(c, &gateway(), &mut table), Decision::Refuse(_)), "{c:?}");
        }
        assert_eq!(table.lookups, 0, "nothing malformed reaches the store");
        // The gateway's own name never reaches the store either.
        assert_eq!(simple(decide(connect("rki-gateway", "x", "y"), &gateway(), &mut table)), Decision::Defer);
        assert_eq!(table.lookups, 0);
    }

    #[test]
    fn a_replaced_hash_refuses_the_old_password_at_the_next_connect() {
        let mut table = store();
        assert_eq!(simple(decide(connect("SN1", "SN1", "sn1-pw"), &gateway(), &mut table)), allow());
        table.rows.insert("SN1".to_string(), vec![hash("sn1-new")]);
        assert_eq!(
            decide(connect("SN1", "SN1", "sn1-pw"), &gateway(), &mut table),
            Decision::Refuse(Refusal::WrongPassword)
        );
        assert_eq!(simple(decide(connect("SN1", "SN1", "sn1-new"), &gateway(), &mut table)), allow());
        table.rows.remove("init@SN2");
        assert_eq!(
            decide(connect("init@SN2", "init@SN2", "new-gudid"), &gateway(), &mut table),
            Decision::Refuse(Refusal::NoCredentials)
        );
    }

    #[test]
    fn the_hash_that_matched_is_the_one_admitted() {
        let mut table = store();
        let hashes = table.rows["init@SN2"].clone();
        for (password, hash) in [("old-gudid", &hashes[0]), ("new-gudid", &hashes[1])] {
            let decision = decide(connect("init@SN2", "init@SN2", password), &gateway(), &mut table);
            assert_eq!(decision, Decision::Allow { hash: hash.clone() }, "{password}");
        }
    }

    #[test]
    fn a_store_that_cannot_answer_refuses_and_never_allows() {
        let mut table = Table { down: true, ..store() };
        let refused = decide(connect("SN1", "SN1", "sn1-pw"), &gateway(), &mut table);
        assert_eq!(refused, Decision::Refuse(Refusal::Store(StoreUnavailable("connection refused".into()))));
        assert_eq!(refused_label(&refused), "store unavailable");
        // Mosquitto's own identities do not depend on the store.
        assert_eq!(simple(decide(connect("rki-gateway", "gw-1", "x"), &gateway(), &mut table)), Decision::Defer);
    }

    #[test]
    fn a_row_with_too_many_hashes_costs_at_most_the_bounded_number_of_checks() {
        let mut rows = HashMap::new();
        let mut hashes = vec![hash("a"); HASHES_PER_IDENTITY_MAX];
        hashes.push(hash("late"));
        rows.insert("SN1".to_string(), hashes);
        let mut table = Table { rows, ..Table::default() };
        assert_eq!(simple(decide(connect("SN1", "SN1", "a"), &gateway(), &mut table)), allow());
        assert_eq!(
            decide(connect("SN1", "SN1", "late"), &gateway(), &mut table),
            Decision::Refuse(Refusal::WrongPassword)
        );
    }

    fn allow() -> Decision {
        Decision::Allow { hash: String::new() }
    }

    /// The decision without the matched hash, for the tables.
    fn simple(decision: Decision) -> Decision {
        match decision {
            Decision::Allow { .. } => allow(),
            other => other,
        }
    }

    fn refused_label(decision: &Decision) -> &'static str {
        match decision {
            Decision::Refuse(r) => r.label(),
            _ => "",
        }
    }
}
