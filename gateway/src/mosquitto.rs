//! Mosquitto 2 configuration generated from the gateway's device registry, for the external-broker
//! mode: a password file (`$7$` PBKDF2-HMAC-SHA512 hashes, Mosquitto's own format) and an ACL file
//! that confines every terminal to its own topics.
//!
//! The gateway never keeps a device's MQTT password: at initialisation it computes the Mosquitto
//! hash once (the only moment it holds the password) and stores that hash.

use std::fmt::Write as _;

use pbkdf2::pbkdf2_hmac;
use rki_protocol::backend::BackendId;
use rki_protocol::topic;
use sha2::Sha512;

use crate::store::channel::BrokerBackend;

/// Mosquitto's default iteration count for `$7$` hashes.
pub const PBKDF2_ITERATIONS: u32 = 101;
/// Longest pause between two rewrites of the Mosquitto files.
const SYNC_INTERVAL_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a spent GUDID's bootstrap identity stays in the password file while the device has
/// not proven its new secrets: the proof window (`store::GUDID_PROOF_WINDOW_MS`). The gateway
/// spends the GUDID, rewrites the file and signals Mosquitto while its CreateKeyAnswer is still on
/// the way; Mosquitto re-checks connected clients at a reload, and without it would cut the
/// terminal off before the answer arrives. A terminal whose answer came too late reconnects
/// under the same identity and is answered anew. The identity leaves the file once the device
/// proved its secrets (its first message under them). It opens only that SN's initialisation
/// topics.
pub const SPENT_BOOTSTRAP_GRACE: std::time::Duration =
    std::time::Duration::from_millis(crate::store::GUDID_PROOF_WINDOW_MS as u64);
/// Salt length Mosquitto uses.
const SALT_LEN: usize = 12;

/// A `$7$` hash of `password` with a fresh random salt.
pub fn password_hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt).map_err(|e| e.to_string())?;
    Ok(password_hash_with_salt(password, &salt, PBKDF2_ITERATIONS))
}

pub fn password_hash_with_salt(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; 64];
    pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut hash);
    format!("$7${iterations}${}${}", base64(salt), base64(&hash))
}

/// Whether `password` matches a `$7$` hash made by [`password_hash`], in constant time. A hash
/// that does not parse, or asks for more than [`PBKDF2_ITERATIONS_MAX`] iterations, matches
/// nothing.
pub fn verify_password_hash(password: &[u8], stored: &str) -> bool {
    let mut fields = stored.split('$');
    let (Some(""), Some("7"), Some(iterations), Some(salt), Some(hash), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let (Ok(iterations), Some(salt), Some(hash)) = (iterations.parse::<u32>(), unbase64(salt), unbase64(hash)) else {
        return false;
    };
    if iterations == 0 || iterations > PBKDF2_ITERATIONS_MAX || hash.len() != 64 {
        return false;
    }
    let mut computed = [0u8; 64];
    pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut computed);
    rki_protocol::secret::ct_eq(&computed, &hash)
}

/// Most iterations a stored hash may ask for: a forged row cannot make a check arbitrarily slow.
const PBKDF2_ITERATIONS_MAX: u32 = 100_000;

/// Standard base64 with padding, decoded; `None` on any other character or a bad length.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if text.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.as_bytes().chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || chunk[..4 - pad].contains(&b'=') {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = n << 6 | TABLE.iter().position(|&t| t == c)? as u32;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One registered device, as the broker needs it.
#[derive(Debug, Clone)]
pub struct BrokerDevice {
    pub sn: String,
    /// `$7$` hash of its MQTT password; `None` until it initialises.
    pub password_hash: Option<String>,
    /// `$7$` hash of the bootstrap password of its newest live GUDID; `None` without one, and then
    /// no one can connect as `init@{SN}`.
    pub bootstrap_hash: Option<String>,
}

/// The password file: the gateway's own user, each device's identity, each SN's bootstrap
/// identity `init@{SN}`, and each live backend `backend@{org}~{name}` (PROTOCOL.md §12.1).
pub fn password_file(
    gateway_user: &str,
    gateway_password_hash: &str,
    devices: &[BrokerDevice],
    backends: &[BrokerBackend],
) -> Result<String, String> {
    let mut out = format!("{gateway_user}:{gateway_password_hash}\n");
    for d in devices {
        if let Some(hash) = &d.password_hash {
            let _ = writeln!(out, "{}:{hash}", d.sn);
        }
        // The bootstrap identity exists only while the SN has a live GUDID; its hash was made at
        // provisioning (the only moment the gateway held the password), so no PBKDF2 runs here.
        if let Some(hash) = &d.bootstrap_hash {
            let _ = writeln!(out, "{}:{hash}", topic::bootstrap_client_id(&d.sn));
        }
    }
    // Made at the backend's creation, the only moment the gateway held its password. A row whose
    // names do not parse (impossible: checked at creation) is left out, not the whole file.
    for b in backends {
        let Ok(id) = backend_id(b) else { continue };
        let _ = writeln!(out, "{}:{}", id.client_id(), b.password_hash);
    }
    Ok(out)
}

/// The identity of a stored backend; its names were checked when it was created.
fn backend_id(b: &BrokerBackend) -> Result<BackendId, rki_protocol::backend::BackendIdError> {
    BackendId::new(&b.org, &b.name)
}

/// The ACL file: a device reads its down topic and writes its up topic; its bootstrap identity
/// writes its init topic and reads its down topic; a backend writes its request topic and reads
/// its reply and events topics, nothing else of `rki/v1/backend/{org}/…` (§12.1); the gateway
/// reads and writes the RKI tree.
pub fn acl_file(gateway_user: &str, devices: &[BrokerDevice], backends: &[BrokerBackend]) -> String {
    // Mosquitto substitutes `%u`, the device's user name, which is its SN.
    let mut out = format!(
        "# Generated by rki-gateway; do not edit. Every terminal is confined to its own topics.\n\
         pattern read {}\npattern write {}\n\n",
        topic::device_down("%u"),
        topic::device_up("%u")
    );
    let _ = writeln!(out, "{}", gateway_acl(gateway_user));
    for d in devices {
        let _ = writeln!(
            out,
            "user init@{sn}\ntopic write {init}\ntopic read {down}\n",
            sn = d.sn,
            init = topic::init(&d.sn),
            down = topic::device_down(&d.sn)
        );
    }
    for b in backends {
        // A name that does not parse (impossible: checked at creation) gets no rules at all.
        let Ok(id) = backend_id(b) else { continue };
        let _ = writeln!(
            out,
            "user {user}\ntopic write {req}\ntopic read {reply}\ntopic read {events}\n",
            user = id.client_id(),
            req = topic::backend_request(id.org(), id.name()),
            reply = topic::backend_reply(id.org(), id.name()),
            events = topic::backend_events(id.org(), id.name()),
        );
    }
    out
}

/// The gateway's own lines of an ACL file: its message identity reads and writes the RKI tree
/// (devices and backends). With the store plugin (`mosquitto-auth/`, which decides every other
/// identity), they are the whole ACL file.
pub fn gateway_acl(gateway_user: &str) -> String {
    format!(
        "user {gateway_user}\ntopic readwrite {}\ntopic readwrite {}\n",
        topic::FILTER_ALL_DEVICES,
        topic::FILTER_ALL_BACKEND
    )
}

/// Rewrites the Mosquitto files from the registry whenever it changes (an import, an
/// initialisation, a backend created or revoked) and asks Mosquitto to reload them (SIGHUP to
/// the pid in `pid_file`). Mosquitto checks its connected clients again at a reload, so a revoked
/// backend is disconnected then.
pub fn spawn_sync(
    engine: std::sync::Arc<crate::engine::Engine>,
    sync: crate::config::MosquittoSync,
    broker: crate::config::ExternalBroker,
) -> Result<(), String> {
    let user = broker.username.clone().ok_or("mosquitto_sync needs the gateway's broker username")?;
    let gateway_hash = password_hash(broker.password.clone().unwrap_or_default().as_bytes())?;
    tokio::spawn(async move {
        loop {
            let store = engine.store.clone();
            let (user, hash, sync) = (user.clone(), gateway_hash.clone(), sync.clone());
            let now = engine.clock.now_ms();
            let written =
                tokio::task::spawn_blocking(move || write_files(store.as_ref(), &user, &hash, &sync, now)).await;
            match written {
                Ok(Ok((devices, backends))) => tracing::debug!(devices, backends, "mosquitto files rewritten"),
                Ok(Err(e)) => tracing::error!(error = %e, "mosquitto files not written"),
                Err(e) => tracing::error!(error = %e, "mosquitto sync task failed"),
            }
            // Also every few seconds, so a lost wake-up or a broker restart is repaired.
            let _ = tokio::time::timeout(SYNC_INTERVAL_MAX, engine.registry_changed()).await;
        }
    });
    Ok(())
}

/// Writes both files atomically, then signals Mosquitto. Returns the number of devices and of
/// backends.
pub fn write_files(
    store: &dyn crate::store::Store,
    gateway_user: &str,
    gateway_hash: &str,
    sync: &crate::config::MosquittoSync,
    now: crate::clock::Millis,
) -> Result<(usize, usize), String> {
    let mut bootstrap: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    // Newest first: the first hash seen for an SN is its newest live GUDID's.
    let spent_after = now.saturating_sub(SPENT_BOOTSTRAP_GRACE.as_millis() as crate::clock::Millis);
    for (sn, hash) in store.live_bootstrap_hashes(None, now, Some(spent_after)).map_err(|e| e.to_string())? {
        bootstrap.entry(sn).or_insert(hash);
    }
    let devices: Vec<BrokerDevice> = store
        .broker_devices()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(sn, password_hash)| BrokerDevice { bootstrap_hash: bootstrap.remove(&sn), sn, password_hash })
        .collect();
    let backends = store.broker_backends().map_err(|e| e.to_string())?;
    atomic_write(&sync.password_file, &password_file(gateway_user, gateway_hash, &devices, &backends)?)?;
    atomic_write(&sync.acl_file, &acl_file(gateway_user, &devices, &backends))?;
    if let Some(pid_file) = &sync.pid_file {
        let pid = std::fs::read_to_string(pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))?;
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(pid.trim())
            .status()
            .map_err(|e| format!("kill -HUP: {e}"))?;
        if !status.success() {
            return Err(format!("kill -HUP {} failed", pid.trim()));
        }
    }
    Ok((devices.len(), backends.len()))
}

fn atomic_write(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_mosquitto_passwd() {
        // `mosquitto_passwd -b pw alice secret` (Mosquitto 2.0.11) wrote this line.
        let line = "$7$101$9uK4hSK1Jw8Qh79Z$wUWSAMy/kTtDWllMhci41JQZIrmkogdnJQUemGtbCiF0wztLygosJkFG0CMoB+gzNqZ0B+/1OH1SwTNVPurhyA==";
        let salt = [0xf6, 0xe2, 0xb8, 0x85, 0x22, 0xb5, 0x27, 0x0f, 0x10, 0x87, 0xbf, 0x59];
        assert_eq!(password_hash_with_salt(b"secret", &salt, 101), line);
    }

    #[test]
    fn a_hash_verifies_its_password_and_nothing_else() {
        let line = "$7$101$9uK4hSK1Jw8Qh79Z$wUWSAMy/kTtDWllMhci41JQZIrmkogdnJQUemGtbCiF0wztLygosJkFG0CMoB+gzNqZ0B+/1OH1SwTNVPurhyA==";
        assert!(verify_password_hash(b"secret", line));
        let fresh = password_hash(b"another").expect("hash");
        assert!(verify_password_hash(b"another", &fresh));
        for (password, stored) in [
            (&b"Secret"[..], line),
            (b"secret", ""),
            (b"secret", "$7$101$9uK4hSK1Jw8Qh79Z"),
            (b"secret", "$6$101$9uK4hSK1Jw8Qh79Z$wUWSAMy/kTtDWllMhci41JQZIrmkogdnJQUemGtbCiF0wztLygosJkFG0CMoB+gzNqZ0B+/1OH1SwTNVPurhyA=="),
            (b"secret", "$7$999999999$9uK4hSK1Jw8Qh79Z$wUWSAMy/kTtDWllMhci41JQZIrmkogdnJQUemGtbCiF0wztLygosJkFG0CMoB+gzNqZ0B+/1OH1SwTNVPurhyA=="),
            (b"secret", "$7$101$9uK4hSK1Jw8Qh79Z$abc"),
        ] {
            assert!(!verify_password_hash(password, stored), "{stored}");
        }
        assert_eq!(unbase64("Zm8="), Some(b"fo".to_vec()));
        assert_eq!(unbase64("Zg=="), Some(b"f".to_vec()));
        assert_eq!(unbase64("Z==="), None);
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    fn erp() -> BrokerBackend {
        BrokerBackend { org: "acme".into(), name: "erp-1".into(), password_hash: "$7$101$c2FsdA==$aGFzaA==".into() }
    }

    #[test]
    fn the_acl_confines_each_identity() {
        let devices = [BrokerDevice { sn: "SN1".into(), password_hash: None, bootstrap_hash: None }];
        let acl = acl_file("gw", &devices, &[erp()]);
        assert!(acl.contains("pattern read %u/rki/v1/down\npattern write %u/rki/v1/up\n"));
        assert!(acl.contains("user gw\ntopic readwrite +/rki/v1/#\ntopic readwrite rki/v1/backend/#\n"));
        assert!(acl.contains("user init@SN1\ntopic write SN1/rki/v1/init\ntopic read SN1/rki/v1/down"));
        assert!(acl.contains(
            "user backend@acme~erp-1\ntopic write rki/v1/backend/acme/erp-1/req\n\
             topic read rki/v1/backend/acme/erp-1/reply\ntopic read rki/v1/backend/acme/erp-1/events\n"
        ));
        assert!(!acl.contains("topic read #"));
        // Nothing but the gateway's own lines reach beyond one identity's topics.
        let wide: Vec<&str> = acl.lines().filter(|l| l.starts_with("topic") && l.contains(['+', '#'])).collect();
        assert_eq!(wide, ["topic readwrite +/rki/v1/#", "topic readwrite rki/v1/backend/#"]);
    }

    #[test]
    fn a_backend_has_one_password_line_that_mosquitto_can_split() {
        let text = password_file("gw", "$7$gw", &[], &[erp()]).expect("file");
        let line = text.lines().find(|l| l.starts_with("backend@")).expect("the backend's line");
        // Mosquitto splits a line at its first ':': user name, then the hash.
        assert_eq!(line.split_once(':'), Some(("backend@acme~erp-1", "$7$101$c2FsdA==$aGFzaA==")));
        let bad = BrokerBackend { org: "ac:me".into(), ..erp() };
        let without = password_file("gw", "$7$gw", &[], std::slice::from_ref(&bad)).expect("the rest of the file");
        assert_eq!(without, "gw:$7$gw\n", "a bad name never reaches the file");
        assert!(!acl_file("gw", &[], &[bad]).contains("ac:me"));
    }
}
