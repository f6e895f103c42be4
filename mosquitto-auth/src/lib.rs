//! `librki_mosquitto_auth.so`: a Mosquitto 2.0 plugin (plugin interface version 5) that
//! authenticates the RKI identities from the gateway's PostgreSQL store at each CONNECT and
//! confines each to its own topics, so that no gateway node rewrites a file or talks `$CONTROL`
//! and a fleet of any size costs the broker one indexed query and one PBKDF2 per CONNECT
//! (docs/SCALE-OUT.md, "Mosquitto authenticating from the store").
//!
//! ```text
//! plugin /usr/lib/rki/librki_mosquitto_auth.so
//! plugin_opt_store_url_file /etc/mosquitto/rki-store.url     # postgres://rki_broker:…@db/rki?sslmode=…, 0600
//! plugin_opt_defer_usernames rki-gateway                     # decided by password_file and acl_file
//! password_file /etc/mosquitto/rki-gateway.passwd
//! acl_file /etc/mosquitto/rki-gateway.acl
//! ```
//!
//! Layout:
//! - [`identity`]: whose user name it is (a terminal `{SN}`, `init@{SN}`, `backend@{org}~{name}`,
//!   a name left to Mosquitto's files, or nobody's), parsed without allocating.
//! - [`acl`]: the access rules, a pure function of (identity, topic, access).
//! - [`auth`]: the decision at CONNECT, given where the current hashes come from.
//! - [`admitted`]: the clients admitted and still connected: a reload's re-check of them needs no
//!   store, and a connected backend whose hash the store dropped is disconnected.
//! - [`store`]: where they come from: the `rki_broker_credentials` view, on a connection owned by
//!   the plugin's worker thread, so that the broker thread never waits on the network for long.
//! - [`log`]: what may reach Mosquitto's log, and how often.
//! - `ffi`: the C interface (`mosquitto_plugin_version`, `_init`, `_cleanup` and the two
//!   callbacks); the only module with `unsafe`, and every callback's body runs under
//!   `catch_unwind` (a panic denies).
//!
//! Architecture invariant: only `ffi` knows Mosquitto's types and only [`store`] knows SQL; the
//! rest is plain Rust over byte strings, tested without a broker. Nothing is cached between
//! CONNECTs: a hash the store replaced never opens the broker again.

pub mod acl;
pub mod admitted;
pub mod auth;
pub mod identity;
pub mod log;
pub mod store;

// The C interface refers to symbols that only the Mosquitto executable defines: it is left out of
// the unit tests' executable, which has no Mosquitto to resolve them.
#[cfg(not(test))]
mod ffi;

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use auth::{Connect, Credentials, Decision, Refusal};
use identity::{owner, Deferred, Owner};

/// The `plugin_opt_*` lines (Mosquitto hands them over without the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `store_url_file`: a file holding the store URL (with the database password), mode 0600.
    pub store_url_file: PathBuf,
    /// `defer_usernames`: names decided by Mosquitto's `password_file` and `acl_file`.
    pub deferred: Deferred,
}

impl Options {
    /// An unknown option is an error (a typo must not leave the broker half-configured).
    pub fn parse(pairs: &[(String, String)]) -> Result<Options, String> {
        let mut store_url_file = None;
        let mut deferred = Deferred::default();
        for (key, value) in pairs {
            match key.as_str() {
                "store_url_file" => store_url_file = Some(PathBuf::from(value)),
                "defer_usernames" => deferred = Deferred::parse(value)?,
                other => return Err(format!("unknown option plugin_opt_{other}")),
            }
        }
        let store_url_file = store_url_file.ok_or("plugin_opt_store_url_file is required")?;
        Ok(Options { store_url_file, deferred })
    }
}

/// Mosquitto's answer to an access check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclVerdict {
    Allow,
    Deny,
    /// Not one of ours: `acl_file` decides.
    Defer,
}

/// A line for Mosquitto's log, with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    Warning(String),
    Notice(String),
    Info(String),
}

/// The plugin's state: Mosquitto hands a pointer to it to every callback, always on its one
/// thread. The store link and the log throttle sit in `RefCell`s so that a callback needs only a
/// shared reference: the broker may call the access check from inside the plugin's own log call
/// (a `log_dest topic` publishes log lines), and two `&mut` would then overlap.
pub struct Plugin {
    deferred: Deferred,
    credentials: RefCell<Box<dyn Credentials>>,
    admitted: RefCell<admitted::Admitted>,
    log: RefCell<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    throttle: log::Throttle,
    cost: log::ConnectCost,
    /// The last lookup failed: the next one that succeeds says so once.
    store_down: bool,
}

impl Plugin {
    pub fn new(deferred: Deferred, credentials: Box<dyn Credentials>) -> Plugin {
        Plugin {
            deferred,
            credentials: RefCell::new(credentials),
            admitted: RefCell::new(admitted::Admitted::default()),
            log: RefCell::new(LogState::default()),
        }
    }

    /// Reads the URL file and starts the store link.
    pub fn start(options: &Options) -> Result<(Plugin, String), String> {
        let url = store::read_url_file(&options.store_url_file)?;
        let settings = store::Settings::from_url(&url)?;
        let described = settings.describe();
        let link = store::StoreLink::start(settings)?;
        Ok((Plugin::new(options.deferred.clone(), Box::new(link)), described))
    }

    /// A CONNECT of the connection `client` (the address of Mosquitto's context), or a reload's
    /// re-check of it: the decision, and the lines for the log that are due (`now` is when the
    /// check started; its cost is measured here).
    pub fn on_connect(&self, client: usize, connect: Connect<'_>, now: Instant) -> (Decision, Vec<LogLine>) {
        let username = connect.username.unwrap_or_default();
        if self.admitted.try_borrow().is_ok_and(|a| a.is_recheck(client, username)) {
            return (Decision::Allow { hash: String::new() }, Vec::new());
        }
        let decision = match self.credentials.try_borrow_mut() {
            Ok(mut credentials) => auth::decide(connect, &self.deferred, credentials.as_mut()),
            // Not reachable (the broker does not authenticate from inside a CONNECT); refused.
            Err(_) => Decision::Refuse(Refusal::Store(auth::StoreUnavailable("re-entered".into()))),
        };
        if let (Decision::Allow { hash }, Ok(mut admitted)) = (&decision, self.admitted.try_borrow_mut()) {
            admitted.admit(client, username, hash.clone(), now);
        }
        let mut lines: Vec<LogLine> = self.log_line(&decision, username, now).into_iter().collect();
        if decision != Decision::Defer {
            let ended = Instant::now().max(now);
            if let Ok(mut state) = self.log.try_borrow_mut() {
                lines.extend(state.cost.add(ended - now, ended).map(LogLine::Info));
            }
        }
        (decision, lines)
    }

    /// The connection `client` ended (`MOSQ_EVT_DISCONNECT`).
    pub fn on_disconnect(&self, client: usize) {
        if let Ok(mut admitted) = self.admitted.try_borrow_mut() {
            admitted.gone(client);
        }
    }

    /// A reload starts (`MOSQ_EVT_RELOAD`): Mosquitto re-checks its connected clients next.
    pub fn on_reload(&self) -> LogLine {
        let count = match self.admitted.try_borrow_mut() {
            Ok(mut admitted) => {
                admitted.reload_started();
                admitted.len()
            }
            Err(_) => 0,
        };
        LogLine::Info(format!("rki-auth: reload; the {count} clients admitted on their connection stay admitted"))
    }

    /// The broker's loop turned (`MOSQ_EVT_TICK`): the reload, if any, is over; connected backends
    /// are looked up again when due, and terminals a while after their admission
    /// ([`admitted::TERMINAL_RECHECKS`]). Returns the user names to disconnect, and lines for the
    /// log.
    pub fn on_tick(&self, now: Instant) -> (Vec<String>, Vec<LogLine>) {
        let (due, terminals) = match self.admitted.try_borrow_mut() {
            Ok(mut admitted) => {
                admitted.tick();
                (admitted.backends_due(now, &self.deferred), admitted.terminals_due(now, &self.deferred))
            }
            Err(_) => return (Vec::new(), Vec::new()),
        };
        let Ok(mut credentials) = self.credentials.try_borrow_mut() else { return (Vec::new(), Vec::new()) };
        let mut kick = Vec::new();
        let mut lines = Vec::new();
        for (username, hash) in due {
            // A store that cannot answer disconnects nobody.
            if let Ok(current) = credentials.hashes(&username) {
                if !current.contains(&hash) {
                    let line = format!(
                        "rki-auth: disconnecting \"{}\": its credentials are gone",
                        log::escaped(username.as_bytes())
                    );
                    lines.push(LogLine::Notice(line));
                    kick.push(username);
                }
            }
        }
        if !terminals.is_empty() {
            let sns: Vec<String> = terminals.iter().map(|(sn, _)| sn.clone()).collect();
            // A store that cannot answer disconnects nobody.
            if let Ok(current) = credentials.terminal_hashes(&sns) {
                let current: std::collections::HashSet<(String, String)> = current.into_iter().collect();
                let stale: Vec<String> =
                    terminals.into_iter().filter(|t| !current.contains(t)).map(|(sn, _)| sn).collect();
                if let Some(first) = stale.first() {
                    lines.push(LogLine::Notice(format!(
                        "rki-auth: disconnecting {} terminal(s) admitted with a password the store has since replaced (the first: \"{}\")",
                        stale.len(),
                        log::escaped(first.as_bytes())
                    )));
                }
                kick.extend(stale);
            }
        }
        (kick, lines)
    }

    fn log_line(&self, decision: &Decision, username: &[u8], now: Instant) -> Option<LogLine> {
        let Ok(mut state) = self.log.try_borrow_mut() else { return None };
        let store_failed = matches!(decision, Decision::Refuse(Refusal::Store(_)));
        let store_answered = matches!(
            decision,
            Decision::Allow { .. } | Decision::Refuse(Refusal::NoCredentials | Refusal::WrongPassword)
        );
        if store_answered && state.store_down {
            state.store_down = false;
            return Some(LogLine::Notice("rki-auth: the store answers again; CONNECTs are checked".into()));
        }
        let Decision::Refuse(refusal) = decision else { return None };
        let held_back = state.throttle.admit(now)?;
        let more = if held_back > 0 { format!(" ({held_back} more since the last line)") } else { String::new() };
        if store_failed {
            state.store_down = true;
            let Refusal::Store(why) = refusal else { return None };
            return Some(LogLine::Warning(format!("rki-auth: store unavailable, CONNECTs refused: {}{more}", why.0)));
        }
        Some(LogLine::Notice(format!("rki-auth: refused \"{}\": {}{more}", log::escaped(username), refusal.label())))
    }

    /// An access check, for every publish, delivery and subscription.
    pub fn on_acl(&self, username: Option<&[u8]>, topic: Option<&[u8]>, access: i32) -> AclVerdict {
        let Some(username) = username else { return AclVerdict::Deny };
        let identity = match owner(username, &self.deferred) {
            Owner::Mosquitto => return AclVerdict::Defer,
            Owner::Nobody => return AclVerdict::Deny,
            Owner::Plugin(identity) => identity,
        };
        let (Some(topic), Some(access)) =
            (topic.and_then(|t| std::str::from_utf8(t).ok()), acl::Access::from_mosquitto(access))
        else {
            return AclVerdict::Deny;
        };
        if acl::allowed(identity, topic, access) {
            AclVerdict::Allow
        } else {
            AclVerdict::Deny
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::StoreUnavailable;

    struct Scripted(Vec<Result<Vec<String>, StoreUnavailable>>);

    impl Credentials for Scripted {
        fn hashes(&mut self, _: &str) -> Result<Vec<String>, StoreUnavailable> {
            if self.0.is_empty() {
                Ok(Vec::new())
            } else {
                self.0.remove(0)
            }
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn options_need_the_url_file_and_refuse_unknown_keys() {
        let options =
            Options::parse(&pairs(&[("store_url_file", "/etc/u"), ("defer_usernames", "rki-gateway")])).expect("ok");
        assert_eq!(options.store_url_file, PathBuf::from("/etc/u"));
        assert_eq!(owner(b"rki-gateway", &options.deferred), Owner::Mosquitto);
        assert!(Options::parse(&pairs(&[("defer_usernames", "gw")])).is_err());
        assert!(Options::parse(&pairs(&[("store_url_file", "/etc/u"), ("store_url", "postgres://")])).is_err());
    }

    #[test]
    fn access_checks_defer_the_listed_names_and_deny_the_unknown() {
        let plugin = Plugin::new(Deferred::parse("rki-gateway").expect("list"), Box::new(Scripted(Vec::new())));
        let check = |u: Option<&[u8]>, t: &[u8], a: i32| plugin.on_acl(u, Some(t), a);
        assert_eq!(check(Some(b"SN1"), b"SN1/rki/v1/up", 2), AclVerdict::Allow);
        assert_eq!(check(Some(b"SN1"), b"SN1/rki/v1/up", 1), AclVerdict::Deny);
        assert_eq!(check(Some(b"SN1"), b"SN1/rki/v1/up", 3), AclVerdict::Deny, "not an access value");
        assert_eq!(check(Some(b"SN1"), b"SN1/rki/v1/\xff", 2), AclVerdict::Deny);
        assert_eq!(check(Some(b"rki-gateway"), b"+/rki/v1/#", 4), AclVerdict::Defer);
        assert_eq!(check(Some(b"SN/1"), b"SN/1/rki/v1/up", 2), AclVerdict::Deny);
        assert_eq!(check(None, b"SN1/rki/v1/up", 2), AclVerdict::Deny);
        assert_eq!(plugin.on_acl(Some(b"SN1"), None, 2), AclVerdict::Deny);
    }

    #[test]
    fn the_log_says_once_a_second_why_and_when_the_store_is_back() {
        let hash = rki_gateway::mosquitto::password_hash(b"pw").expect("hash");
        let down = || Err(StoreUnavailable("connection refused".into()));
        let plugin = Plugin::new(
            Deferred::default(),
            Box::new(Scripted(vec![down(), down(), down(), Ok(vec![hash.clone()]), Ok(vec![hash])])),
        );
        let c = Connect { username: Some(b"SN1"), client_id: Some(b"SN1"), password: Some(b"pw") };
        let t0 = Instant::now();
        // The cost line is left out here (it depends on the real time the checks take).
        let lines = |(decision, lines): (Decision, Vec<LogLine>)| {
            (decision, lines.into_iter().filter(|l| !matches!(l, LogLine::Info(_))).collect::<Vec<_>>())
        };
        let (d, line) = lines(plugin.on_connect(1, c, t0));
        assert!(matches!(d, Decision::Refuse(Refusal::Store(_))));
        assert_eq!(
            line,
            [LogLine::Warning("rki-auth: store unavailable, CONNECTs refused: connection refused".into())]
        );
        assert_eq!(lines(plugin.on_connect(1, c, t0 + Duration::from_millis(10))).1, [], "held back");
        let (_, line) = lines(plugin.on_connect(1, c, t0 + Duration::from_secs(1)));
        assert!(matches!(&line[..], [LogLine::Warning(l)] if l.ends_with("(1 more since the last line)")));
        let (d, line) = lines(plugin.on_connect(1, c, t0 + Duration::from_secs(1)));
        assert!(matches!(d, Decision::Allow { .. }));
        assert!(matches!(&line[..], [LogLine::Notice(l)] if l.contains("answers again")));
        let (d, line) = lines(plugin.on_connect(1, c, t0 + Duration::from_secs(5)));
        assert!(matches!(d, Decision::Allow { .. }) && line.is_empty());
        // A refusal names the client by an escaped prefix only; never the password.
        let bad = Connect { username: Some(b"SN\n1"), client_id: Some(b"SN\n1"), password: Some(b"secret") };
        let (_, line) = lines(plugin.on_connect(2, bad, t0 + Duration::from_secs(9)));
        assert_eq!(line, [LogLine::Notice("rki-auth: refused \"SN\\x0a1\": not an RKI identity".into())]);
    }

    #[test]
    fn a_reloads_recheck_of_an_admitted_connection_needs_no_store() {
        let hash = rki_gateway::mosquitto::password_hash(b"pw").expect("hash");
        let down = || Err(StoreUnavailable("connection refused".into()));
        let plugin = Plugin::new(Deferred::default(), Box::new(Scripted(vec![Ok(vec![hash]), down(), down()])));
        let c = Connect { username: Some(b"SN1"), client_id: Some(b"SN1"), password: Some(b"pw") };
        let t0 = Instant::now();
        assert!(matches!(plugin.on_connect(7, c, t0).0, Decision::Allow { .. }));
        assert!(matches!(plugin.on_reload(), LogLine::Info(l) if l.contains("the 1 clients")));
        // The store is down: the connection admitted before stays; another one is refused.
        assert!(matches!(plugin.on_connect(7, c, t0).0, Decision::Allow { .. }), "re-checked without the store");
        assert!(matches!(plugin.on_connect(8, c, t0).0, Decision::Refuse(Refusal::Store(_))), "a new connection");
        plugin.on_tick(t0);
        assert!(matches!(plugin.on_connect(7, c, t0).0, Decision::Refuse(_)), "after the reload, a CONNECT again");
        plugin.on_disconnect(7);
        plugin.on_reload();
        assert!(matches!(plugin.on_connect(7, c, t0).0, Decision::Refuse(_)), "a connection that ended");
    }

    #[test]
    fn a_connected_backend_whose_hash_the_store_dropped_is_disconnected() {
        let old = rki_gateway::mosquitto::password_hash(b"old").expect("hash");
        let new = rki_gateway::mosquitto::password_hash(b"new").expect("hash");
        let plugin = Plugin::new(
            Deferred::default(),
            Box::new(Scripted(vec![
                Ok(vec![old.clone()]),
                Ok(vec![old.clone()]),
                Err(StoreUnavailable("down".into())),
                Ok(vec![new]),
            ])),
        );
        let erp = Connect {
            username: Some(b"backend@acme~erp"),
            client_id: Some(b"backend@acme~erp"),
            password: Some(b"old"),
        };
        let t0 = Instant::now();
        assert!(matches!(plugin.on_connect(1, erp, t0).0, Decision::Allow { .. }));
        assert!(plugin.on_tick(t0).0.is_empty(), "still its hash");
        assert!(plugin.on_tick(t0 + Duration::from_secs(1)).0.is_empty(), "not due");
        assert!(plugin.on_tick(t0 + admitted::BACKEND_CHECK_INTERVAL).0.is_empty(), "the store is down");
        let (kick, lines) = plugin.on_tick(t0 + admitted::BACKEND_CHECK_INTERVAL * 2);
        assert_eq!(kick, ["backend@acme~erp"], "created anew with another secret");
        assert!(matches!(&lines[..], [LogLine::Notice(l)] if l.contains("credentials are gone")));
    }

    /// The store as a table the test changes between steps; `None` is a store that is down.
    #[derive(Clone, Default)]
    struct Table(std::sync::Arc<std::sync::Mutex<Option<std::collections::HashMap<String, String>>>>);

    impl Table {
        fn set(&self, rows: Option<&[(&str, &str)]>) {
            *self.0.lock().expect("table") =
                rows.map(|r| r.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        }
    }

    impl Credentials for Table {
        fn hashes(&mut self, username: &str) -> Result<Vec<String>, StoreUnavailable> {
            match &*self.0.lock().expect("table") {
                Some(rows) => Ok(rows.get(username).cloned().into_iter().collect()),
                None => Err(StoreUnavailable("down".into())),
            }
        }
    }

    #[test]
    fn a_terminal_whose_password_was_replaced_after_its_admission_is_disconnected() {
        let old = rki_gateway::mosquitto::password_hash(b"old").expect("hash");
        let new = rki_gateway::mosquitto::password_hash(b"new").expect("hash");
        let kept = rki_gateway::mosquitto::password_hash(b"kept").expect("hash");
        let table = Table::default();
        table.set(Some(&[("SN1", &old), ("SN2", &kept)]));
        let plugin = Plugin::new(Deferred::default(), Box::new(table.clone()));
        let connect = |name: &'static [u8], pw: &'static [u8]| Connect {
            username: Some(name),
            client_id: Some(name),
            password: Some(pw),
        };
        let t0 = Instant::now();
        assert!(matches!(plugin.on_connect(1, connect(b"SN1", b"old"), t0).0, Decision::Allow { .. }));
        assert!(matches!(plugin.on_connect(2, connect(b"SN2", b"kept"), t0).0, Decision::Allow { .. }));
        // Another node initialises SN1 again just after its admission.
        table.set(Some(&[("SN1", &new), ("SN2", &kept)]));
        assert!(plugin.on_tick(t0 + Duration::from_secs(1)).0.is_empty(), "not due yet");
        table.set(None);
        assert!(plugin.on_tick(t0 + admitted::TERMINAL_RECHECKS[0]).0.is_empty(), "a store that is down kicks nobody");
        table.set(Some(&[("SN1", &new), ("SN2", &kept)]));
        let (kick, lines) = plugin.on_tick(t0 + admitted::TERMINAL_RECHECKS[1]);
        assert_eq!(kick, ["SN1"], "SN1's password was replaced; SN2's is current");
        assert!(matches!(&lines[..], [LogLine::Notice(l)] if l.contains("1 terminal(s)") && l.contains("\"SN1\"")));
        table.set(Some(&[("SN2", &new)]));
        assert!(plugin.on_tick(t0 + Duration::from_secs(3600)).0.is_empty(), "looked up twice, never again");
    }

    #[test]
    fn the_deploy_sample_configures_the_plugin_and_defers_the_gateway() {
        let sample = include_str!("../../deploy/mosquitto-store-auth.conf");
        let pairs: Vec<(String, String)> = sample
            .lines()
            .filter_map(|l| l.strip_prefix("plugin_opt_"))
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        let options = Options::parse(&pairs).expect("the sample's options");
        assert_eq!(owner(b"rki-gateway", &options.deferred), Owner::Mosquitto);
        assert!(sample.contains("\nplugin /usr/lib/rki/librki_mosquitto_auth.so\n"));
        assert!(sample.contains("\nper_listener_settings false\n"));
        let acl = rki_gateway::mosquitto::gateway_acl("rki-gateway");
        assert!(sample.contains(&format!("printf '{}'", acl.replace('\n', "\\n"))), "the sample's ACL file: {acl}");
    }
}
