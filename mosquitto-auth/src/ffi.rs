//! The C interface of a Mosquitto 2.0 plugin, version 5, declared from Mosquitto 2.0.11's
//! `include/mosquitto_plugin.h`, `mosquitto_broker.h` and `mosquitto.h`: the three functions the
//! broker looks up (`mosquitto_plugin_version`, `_init`, `_cleanup`), the broker functions the
//! plugin calls (resolved against the `mosquitto` executable when it loads the plugin), the two
//! event structures it reads, and the constants.
//!
//! What the broker does with the answers (`src/security.c`, `src/plugin.c`,
//! `src/security_default.c` at v2.0.11): callbacks run in the order they were registered, and
//! the plugins' are registered before `password_file`'s and `acl_file`'s own checks (which
//! Mosquitto registers as callbacks too, in `mosquitto_security_init_default`, after loading the
//! plugins; again after each SIGHUP, so still after ours). The first answer other than
//! `MOSQ_ERR_PLUGIN_DEFER` decides; if every callback defers, the CONNECT or access is refused.
//! `MOSQ_ERR_AUTH` gives the client a "not authorised" CONNACK; any other error closes the
//! connection without one.
//!
//! Every callback's body runs under `catch_unwind`: a panic must not cross into C, and it denies.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use crate::auth::{Connect, Decision};
use crate::{AclVerdict, LogLine, Options, Plugin};

/// The plugin interface this plugin implements.
const MOSQ_PLUGIN_VERSION: c_int = 5;

/// `enum mosquitto_plugin_event`.
const MOSQ_EVT_RELOAD: c_int = 1;
const MOSQ_EVT_ACL_CHECK: c_int = 2;
const MOSQ_EVT_BASIC_AUTH: c_int = 3;
const MOSQ_EVT_TICK: c_int = 9;
const MOSQ_EVT_DISCONNECT: c_int = 10;

/// `enum mosq_err_t`.
const MOSQ_ERR_SUCCESS: c_int = 0;
const MOSQ_ERR_INVAL: c_int = 3;
const MOSQ_ERR_AUTH: c_int = 11;
const MOSQ_ERR_ACL_DENIED: c_int = 12;
const MOSQ_ERR_UNKNOWN: c_int = 13;
const MOSQ_ERR_PLUGIN_DEFER: c_int = 17;

/// `MOSQ_LOG_*`.
const MOSQ_LOG_INFO: c_int = 1 << 0;
const MOSQ_LOG_NOTICE: c_int = 1 << 1;
const MOSQ_LOG_WARNING: c_int = 1 << 2;
const MOSQ_LOG_ERR: c_int = 1 << 3;

/// `struct mosquitto` (a client), opaque.
#[repr(C)]
struct Client {
    _opaque: [u8; 0],
}

/// `mosquitto_plugin_id_t`, opaque.
#[repr(C)]
pub struct PluginId {
    _opaque: [u8; 0],
}

/// `struct mosquitto_opt`: one `plugin_opt_{key} {value}` line, the prefix taken off.
#[repr(C)]
pub struct Opt {
    pub key: *mut c_char,
    pub value: *mut c_char,
}

/// `struct mosquitto_evt_basic_auth`.
#[repr(C)]
struct EvtBasicAuth {
    _future: *mut c_void,
    client: *mut Client,
    username: *mut c_char,
    password: *mut c_char,
    _future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_acl_check`.
#[repr(C)]
struct EvtAclCheck {
    _future: *mut c_void,
    client: *mut Client,
    topic: *const c_char,
    _payload: *const c_void,
    /// `mosquitto_property *`
    _properties: *mut c_void,
    access: c_int,
    _payloadlen: u32,
    _qos: u8,
    _retain: bool,
    _future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_disconnect`.
#[repr(C)]
struct EvtDisconnect {
    _future: *mut c_void,
    client: *mut Client,
    _reason: c_int,
    _future2: [*mut c_void; 4],
}

/// `MOSQ_FUNC_generic_callback`.
type GenericCallback = unsafe extern "C" fn(event: c_int, event_data: *mut c_void, userdata: *mut c_void) -> c_int;

extern "C" {
    fn mosquitto_callback_register(
        identifier: *mut PluginId,
        event: c_int,
        cb_func: GenericCallback,
        event_data: *const c_void,
        userdata: *mut c_void,
    ) -> c_int;
    fn mosquitto_callback_unregister(
        identifier: *mut PluginId,
        event: c_int,
        cb_func: GenericCallback,
        event_data: *const c_void,
    ) -> c_int;
    fn mosquitto_client_id(client: *const Client) -> *const c_char;
    fn mosquitto_client_username(client: *const Client) -> *const c_char;
    fn mosquitto_log_printf(level: c_int, fmt: *const c_char, ...);
    fn mosquitto_kick_client_by_username(username: *const c_char, with_will: bool) -> c_int;
}

/// The events the plugin handles, and its callback for each.
fn callbacks() -> [(c_int, GenericCallback); 5] {
    [
        (MOSQ_EVT_BASIC_AUTH, on_basic_auth),
        (MOSQ_EVT_ACL_CHECK, on_acl_check),
        (MOSQ_EVT_RELOAD, on_reload),
        (MOSQ_EVT_TICK, on_tick),
        (MOSQ_EVT_DISCONNECT, on_disconnect),
    ]
}

/// What `mosquitto_plugin_init` hands to the callbacks and gets back at cleanup.
struct Registered {
    plugin: Plugin,
    identifier: *mut PluginId,
}

/// Writes one line to Mosquitto's log (`%s`, so nothing in it is a format).
fn log(level: c_int, line: &str) {
    let Ok(text) = CString::new(line.replace('\0', "\\0")) else { return };
    // SAFETY: the format is a NUL-terminated literal with one `%s`, matched by one pointer to a
    // NUL-terminated string that outlives the call.
    unsafe { mosquitto_log_printf(level, c"%s".as_ptr(), text.as_ptr()) }
}

fn log_line(line: LogLine) {
    match line {
        LogLine::Warning(text) => log(MOSQ_LOG_WARNING, &text),
        LogLine::Notice(text) => log(MOSQ_LOG_NOTICE, &text),
        LogLine::Info(text) => log(MOSQ_LOG_INFO, &text),
    }
}

/// The bytes of a C string Mosquitto owns, for the duration of the callback.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that stays valid while the result is used.
unsafe fn bytes<'a>(ptr: *const c_char) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: non-null, and NUL-terminated and alive per the function's contract.
        Some(unsafe { CStr::from_ptr(ptr) }.to_bytes())
    }
}

/// Picks version 5 if the broker offers it.
#[no_mangle]
pub extern "C" fn mosquitto_plugin_version(supported_version_count: c_int, supported_versions: *const c_int) -> c_int {
    let offered = catch_unwind(|| {
        if supported_versions.is_null() || supported_version_count <= 0 {
            return false;
        }
        // SAFETY: Mosquitto passes an array of `supported_version_count` ints.
        let versions = unsafe { std::slice::from_raw_parts(supported_versions, supported_version_count as usize) };
        versions.contains(&MOSQ_PLUGIN_VERSION)
    });
    match offered {
        Ok(true) => MOSQ_PLUGIN_VERSION,
        _ => -1,
    }
}

/// Reads the options, starts the store link, registers the two callbacks.
///
/// # Safety
/// Called by Mosquitto with its own identifier, a place for the user data, and `option_count`
/// options.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_init(
    identifier: *mut PluginId,
    userdata: *mut *mut c_void,
    options: *mut Opt,
    option_count: c_int,
) -> c_int {
    let started = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: Mosquitto's options array of `option_count` entries, each with two C strings.
        let pairs = unsafe { option_pairs(options, option_count) }?;
        let options = Options::parse(&pairs)?;
        let (plugin, target) = Plugin::start(&options)?;
        Ok::<_, String>((plugin, target, options.deferred.is_empty()))
    }));
    let (plugin, target, nothing_deferred) = match started {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => {
            log(MOSQ_LOG_ERR, &format!("rki-auth: not started: {e}"));
            return MOSQ_ERR_INVAL;
        }
        Err(_) => return MOSQ_ERR_UNKNOWN,
    };
    if identifier.is_null() || userdata.is_null() {
        return MOSQ_ERR_INVAL;
    }
    let registered = Box::into_raw(Box::new(Registered { plugin, identifier }));
    for (event, callback) in callbacks() {
        // SAFETY: Mosquitto's identifier; the callback lives as long as the library; the user
        // data lives until the cleanup unregisters the callbacks.
        let rc = unsafe {
            mosquitto_callback_register(identifier, event, callback, std::ptr::null(), registered.cast::<c_void>())
        };
        if rc != MOSQ_ERR_SUCCESS {
            log(MOSQ_LOG_ERR, &format!("rki-auth: registering callback {event} failed ({rc})"));
            // SAFETY: `registered` came from `Box::into_raw` above; the registration that took
            // (if any) is undone first.
            unsafe {
                unregister(registered);
                drop(Box::from_raw(registered));
            }
            return MOSQ_ERR_UNKNOWN;
        }
    }
    // SAFETY: Mosquitto's place for the user data, checked non-null above.
    unsafe { *userdata = registered.cast::<c_void>() };
    log(MOSQ_LOG_INFO, &format!("rki-auth: authenticating RKI identities from PostgreSQL ({target})"));
    if nothing_deferred {
        log(
            MOSQ_LOG_WARNING,
            "rki-auth: plugin_opt_defer_usernames is empty: the gateway's own identity cannot connect",
        );
    }
    MOSQ_ERR_SUCCESS
}

/// Unregisters the callbacks and stops the store link.
///
/// # Safety
/// Called by Mosquitto with the user data `mosquitto_plugin_init` set (null if it failed).
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_cleanup(userdata: *mut c_void, _options: *mut Opt, _count: c_int) -> c_int {
    if userdata.is_null() {
        return MOSQ_ERR_SUCCESS;
    }
    let registered = userdata.cast::<Registered>();
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the pointer `mosquitto_plugin_init` made with `Box::into_raw`, given back once;
        // no callback runs after they are unregistered.
        unsafe {
            unregister(registered);
            drop(Box::from_raw(registered));
        }
    }));
    MOSQ_ERR_SUCCESS
}

/// # Safety
/// `registered` is the live pointer made by `mosquitto_plugin_init`.
unsafe fn unregister(registered: *mut Registered) {
    // SAFETY: per the function's contract.
    let identifier = unsafe { (*registered).identifier };
    for (event, callback) in callbacks() {
        // SAFETY: Mosquitto's identifier and the callback registered with it (an unregistered
        // one is reported as not found, which is fine here).
        let _ = unsafe { mosquitto_callback_unregister(identifier, event, callback, std::ptr::null()) };
    }
}

/// # Safety
/// `options` points to `count` entries whose keys and values are null or NUL-terminated.
unsafe fn option_pairs(options: *mut Opt, count: c_int) -> Result<Vec<(String, String)>, String> {
    if options.is_null() || count <= 0 {
        return Ok(Vec::new());
    }
    // SAFETY: per the function's contract.
    let entries = unsafe { std::slice::from_raw_parts(options, count as usize) };
    entries
        .iter()
        .map(|o| {
            // SAFETY: per the function's contract.
            let (key, value) = unsafe { (bytes(o.key), bytes(o.value)) };
            let text = |b: Option<&[u8]>| {
                String::from_utf8(b.unwrap_or_default().to_vec()).map_err(|_| "an option that is not UTF-8".to_string())
            };
            Ok((text(key)?, text(value)?))
        })
        .collect()
}

/// `MOSQ_EVT_BASIC_AUTH`: a CONNECT's user name, password and client id.
unsafe extern "C" fn on_basic_auth(_event: c_int, event_data: *mut c_void, userdata: *mut c_void) -> c_int {
    let verdict = catch_unwind(AssertUnwindSafe(|| {
        if event_data.is_null() || userdata.is_null() {
            return MOSQ_ERR_AUTH;
        }
        // SAFETY: Mosquitto passes a `struct mosquitto_evt_basic_auth` for this event, valid for
        // the call, and our user data, live until the cleanup.
        let (event, registered) = unsafe { (&*event_data.cast::<EvtBasicAuth>(), &*userdata.cast::<Registered>()) };
        // SAFETY: the event's strings and the client's id are Mosquitto's, alive for the call.
        let connect = unsafe {
            Connect {
                username: bytes(event.username),
                password: bytes(event.password),
                client_id: if event.client.is_null() { None } else { bytes(mosquitto_client_id(event.client)) },
            }
        };
        let (decision, lines) = registered.plugin.on_connect(event.client as usize, connect, Instant::now());
        lines.into_iter().for_each(log_line);
        match decision {
            Decision::Allow { .. } => MOSQ_ERR_SUCCESS,
            Decision::Defer => MOSQ_ERR_PLUGIN_DEFER,
            Decision::Refuse(_) => MOSQ_ERR_AUTH,
        }
    }));
    verdict.unwrap_or(MOSQ_ERR_AUTH)
}

/// `MOSQ_EVT_ACL_CHECK`: a publish, a delivery or a subscription of a connected client.
unsafe extern "C" fn on_acl_check(_event: c_int, event_data: *mut c_void, userdata: *mut c_void) -> c_int {
    let verdict = catch_unwind(AssertUnwindSafe(|| {
        if event_data.is_null() || userdata.is_null() {
            return MOSQ_ERR_ACL_DENIED;
        }
        // SAFETY: Mosquitto passes a `struct mosquitto_evt_acl_check` for this event, valid for
        // the call, and our user data, live until the cleanup.
        let (event, registered) = unsafe { (&*event_data.cast::<EvtAclCheck>(), &*userdata.cast::<Registered>()) };
        // SAFETY: the client's user name and the topic are Mosquitto's, alive for the call.
        let (username, topic) = unsafe {
            let username = if event.client.is_null() { None } else { bytes(mosquitto_client_username(event.client)) };
            (username, bytes(event.topic))
        };
        match registered.plugin.on_acl(username, topic, event.access) {
            AclVerdict::Allow => MOSQ_ERR_SUCCESS,
            AclVerdict::Deny => MOSQ_ERR_ACL_DENIED,
            AclVerdict::Defer => MOSQ_ERR_PLUGIN_DEFER,
        }
    }));
    verdict.unwrap_or(MOSQ_ERR_ACL_DENIED)
}

/// `MOSQ_EVT_RELOAD`: a SIGHUP; Mosquitto re-checks every connected client next.
unsafe extern "C" fn on_reload(_event: c_int, _event_data: *mut c_void, userdata: *mut c_void) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if userdata.is_null() {
            return;
        }
        // SAFETY: our user data, live until the cleanup.
        let registered = unsafe { &*userdata.cast::<Registered>() };
        log_line(registered.plugin.on_reload());
    }));
    // Not a verdict: the reload goes on, with the other plugins' reload callbacks.
    MOSQ_ERR_PLUGIN_DEFER
}

/// `MOSQ_EVT_TICK`: once per turn of the broker's loop.
unsafe extern "C" fn on_tick(_event: c_int, _event_data: *mut c_void, userdata: *mut c_void) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if userdata.is_null() {
            return;
        }
        // SAFETY: our user data, live until the cleanup.
        let registered = unsafe { &*userdata.cast::<Registered>() };
        let (kick, lines) = registered.plugin.on_tick(Instant::now());
        lines.into_iter().for_each(log_line);
        for username in kick {
            let Ok(name) = CString::new(username) else { continue };
            // SAFETY: a NUL-terminated user name, alive for the call; Mosquitto disconnects the
            // clients of that name (without their wills).
            let _ = unsafe { mosquitto_kick_client_by_username(name.as_ptr(), false) };
        }
    }));
    MOSQ_ERR_SUCCESS
}

/// `MOSQ_EVT_DISCONNECT`: a connection ended; its context is freed after this.
unsafe extern "C" fn on_disconnect(_event: c_int, event_data: *mut c_void, userdata: *mut c_void) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if event_data.is_null() || userdata.is_null() {
            return;
        }
        // SAFETY: Mosquitto passes a `struct mosquitto_evt_disconnect` for this event, valid for
        // the call, and our user data, live until the cleanup.
        let (event, registered) = unsafe { (&*event_data.cast::<EvtDisconnect>(), &*userdata.cast::<Registered>()) };
        registered.plugin.on_disconnect(event.client as usize);
    }));
    MOSQ_ERR_SUCCESS
}
