//! Mosquitto's dynamic security plugin (`mosquitto_dynamic_security.so`), driven by every gateway
//! node over `$CONTROL/dynamic-security/v1` on its own admin connection: the broker's clients and
//! roles change at once, whichever node makes the change, with no file rewritten by the gateway
//! and no reload.
//!
//! Layout:
//! - [`Acl`], [`device_acls`], [`bootstrap_acls`], [`backend_acls`], [`gateway_acls`]: the access
//!   rules, once.
//! - [`Admin`]: the admin link and its small API, [`Admin::put_client`] and
//!   [`Admin::remove_clients`] ("this identity, this password, these rules"), for terminals,
//!   bootstrap identities and RKI backends alike; commands are batched, several per `$CONTROL`
//!   message.
//! - [`reconcile`]: the broker's managed clients against the store, paged, idempotent.
//! - [`seed_file`]: the plugin's initial configuration (`rki-gateway dynsec-init`).
//!
//! Measured on Mosquitto 2.0.11 (Debian 12), which shapes this module:
//! - ACL topics take no `%c`/`%u` substitution (it arrives in 2.1, eclipse-mosquitto/mosquitto
//!   issue 3191), so every managed client has its own role, `rki-device:{SN}` or
//!   `rki-bootstrap:{SN}`, which is also how the gateway recognises the clients it owns.
//! - The control API takes a password in clear only (a hash can only be loaded from the
//!   configuration file at start), so a client is created by the node that holds the password
//!   (the one that answers the CreateKey, or provisions the GUDID), and a broker that lost its
//!   configuration is seeded from the store's hashes by [`seed_file`] with Mosquitto stopped.
//! - Every changing command rewrites the plugin's whole JSON file (one `rename` per command,
//!   about 20 ms at 4,000 objects, growing with their number); batching saves round trips only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rki_protocol::backend::BackendId;
use rki_protocol::secret::SecretBytes;
use rki_protocol::topic;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use crate::config::{Dynsec, ExternalBroker};

pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// Commands in one `$CONTROL` message: a bounded payload and a bounded wait for its answer.
const COMMANDS_PER_MESSAGE_MAX: usize = 100;
/// Clients per `listClients` page: a reconcile of 20,000 clients is 20 small answers.
const LIST_PAGE: usize = 1000;
/// Requests queued for the admin link before callers wait.
const QUEUE_LEN: usize = 1024;
/// How long a command may wait for its answer (each changing command rewrites the plugin's file,
/// so a long batch at fleet size takes seconds).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest pause between two reconciles (a spent GUDID's bootstrap identity leaves after its
/// grace even if nothing else happens).
const RECONCILE_INTERVAL_MAX: Duration = Duration::from_secs(30);
/// Shortest pause between two reconciles, however often the registry changes.
const RECONCILE_INTERVAL_MIN: Duration = Duration::from_secs(5);
/// Attempts to hand a device's new password to the broker before giving up (its CreateKeyAnswer
/// is held until then).
const PUT_ATTEMPTS_MAX: u32 = 4;
/// Role prefixes of the clients the gateway owns; a client without one is never touched.
pub const ROLE_DEVICE_PREFIX: &str = "rki-device:";
pub const ROLE_BOOTSTRAP_PREFIX: &str = "rki-bootstrap:";
/// The role of a backend is this prefix and its client id: `rki-backend:backend@{org}~{name}`.
pub const ROLE_BACKEND_PREFIX: &str = "rki-backend:";
pub const ROLE_GATEWAY: &str = "rki-gateway";
pub const ROLE_ADMIN: &str = "rki-admin";

/// Which rule of the plugin an [`Acl`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclKind {
    PublishClientSend,
    PublishClientReceive,
    SubscribeLiteral,
    SubscribePattern,
}

impl AclKind {
    fn as_str(self) -> &'static str {
        match self {
            AclKind::PublishClientSend => "publishClientSend",
            AclKind::PublishClientReceive => "publishClientReceive",
            AclKind::SubscribeLiteral => "subscribeLiteral",
            AclKind::SubscribePattern => "subscribePattern",
        }
    }
}

/// One allow rule; everything not allowed is denied (the default access [`seed_file`] writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub kind: AclKind,
    pub topic: String,
}

impl Acl {
    pub fn new(kind: AclKind, topic: impl Into<String>) -> Self {
        Self { kind, topic: topic.into() }
    }

    fn to_json(&self) -> Value {
        json!({"acltype": self.kind.as_str(), "topic": self.topic, "allow": true})
    }
}

/// A terminal publishes only on its up topic and subscribes only to its down topic.
pub fn device_acls(sn: &str) -> Vec<Acl> {
    let down = topic::device_down(sn);
    vec![
        Acl::new(AclKind::PublishClientSend, topic::device_up(sn)),
        Acl::new(AclKind::SubscribeLiteral, down.clone()),
        Acl::new(AclKind::PublishClientReceive, down),
    ]
}

/// The bootstrap identity `init@{SN}` publishes only on the SN's init topic and reads its down topic.
pub fn bootstrap_acls(sn: &str) -> Vec<Acl> {
    let down = topic::device_down(sn);
    vec![
        Acl::new(AclKind::PublishClientSend, topic::init(sn)),
        Acl::new(AclKind::SubscribeLiteral, down.clone()),
        Acl::new(AclKind::PublishClientReceive, down),
    ]
}

/// A backend publishes only on its request topic and subscribes to (and receives) only its reply
/// and events topics, written out (`docs/PROTOCOL.md` §12.1).
pub fn backend_acls(id: &BackendId) -> Vec<Acl> {
    let (reply, events) = (topic::backend_reply(id.org(), id.name()), topic::backend_events(id.org(), id.name()));
    vec![
        Acl::new(AclKind::PublishClientSend, topic::backend_request(id.org(), id.name())),
        Acl::new(AclKind::SubscribeLiteral, reply.clone()),
        Acl::new(AclKind::PublishClientReceive, reply),
        Acl::new(AclKind::SubscribeLiteral, events.clone()),
        Acl::new(AclKind::PublishClientReceive, events),
    ]
}

/// The gateway reads every device's up and init topics (through its shared subscriptions),
/// publishes every downlink, and uses the backend tree.
pub fn gateway_acls() -> Vec<Acl> {
    let mut acls = Vec::new();
    for filter in [topic::FILTER_ALL_DEVICES, topic::FILTER_ALL_BACKEND] {
        acls.push(Acl::new(AclKind::SubscribePattern, filter));
        // The plugin checks a shared subscription with its `$share/{group}/` prefix.
        acls.push(Acl::new(AclKind::SubscribePattern, format!("$share/+/{filter}")));
        acls.push(Acl::new(AclKind::PublishClientReceive, filter));
    }
    acls.push(Acl::new(AclKind::PublishClientSend, topic::device_down("+")));
    acls.push(Acl::new(AclKind::PublishClientSend, topic::FILTER_ALL_BACKEND));
    acls
}

/// The admin identity: `$CONTROL/dynamic-security/#` and nothing else.
pub fn admin_acls() -> Vec<Acl> {
    vec![
        Acl::new(AclKind::PublishClientSend, "$CONTROL/dynamic-security/#"),
        Acl::new(AclKind::PublishClientReceive, "$CONTROL/dynamic-security/#"),
        Acl::new(AclKind::SubscribePattern, "$CONTROL/dynamic-security/#"),
    ]
}

/// An identity whose password the broker must learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerIdentity {
    /// A terminal after (re-)initialisation: username and client id are its SN.
    Device(String),
    /// The bootstrap identity `init@{SN}` of a freshly provisioned GUDID.
    Bootstrap(String),
    /// An organization's RKI backend: username and client id `backend@{org}~{name}`.
    Backend(BackendId),
}

impl BrokerIdentity {
    pub fn username(&self) -> String {
        match self {
            BrokerIdentity::Device(sn) => sn.clone(),
            BrokerIdentity::Bootstrap(sn) => topic::bootstrap_client_id(sn),
            BrokerIdentity::Backend(id) => id.client_id(),
        }
    }

    pub fn role(&self) -> String {
        match self {
            BrokerIdentity::Device(sn) => format!("{ROLE_DEVICE_PREFIX}{sn}"),
            BrokerIdentity::Bootstrap(sn) => format!("{ROLE_BOOTSTRAP_PREFIX}{sn}"),
            BrokerIdentity::Backend(id) => format!("{ROLE_BACKEND_PREFIX}{}", id.client_id()),
        }
    }

    pub fn acls(&self) -> Vec<Acl> {
        match self {
            BrokerIdentity::Device(sn) => device_acls(sn),
            BrokerIdentity::Bootstrap(sn) => bootstrap_acls(sn),
            BrokerIdentity::Backend(id) => backend_acls(id),
        }
    }

    /// The identity a managed client's role names, if it is one of the gateway's.
    fn from_role(role: &str) -> Option<Self> {
        if let Some(sn) = role.strip_prefix(ROLE_DEVICE_PREFIX) {
            return Some(BrokerIdentity::Device(sn.to_string()));
        }
        if let Some(client_id) = role.strip_prefix(ROLE_BACKEND_PREFIX) {
            return BackendId::parse_client_id(client_id).ok().map(BrokerIdentity::Backend);
        }
        role.strip_prefix(ROLE_BOOTSTRAP_PREFIX).map(|sn| BrokerIdentity::Bootstrap(sn.to_string()))
    }
}

/// The plugin's answer to one command.
#[derive(Debug, Clone, Deserialize)]
pub struct Response {
    pub command: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default, rename = "correlationData")]
    correlation: Option<String>,
}

impl Response {
    fn ok(&self) -> bool {
        self.error.is_none()
    }

    fn error_is(&self, words: &str) -> bool {
        self.error.as_deref().is_some_and(|e| e.contains(words))
    }
}

/// One command, serialised at once: a password in it lives only in this zeroized text.
struct Command(Zeroizing<String>);

impl Command {
    fn new(value: Value) -> Self {
        Command(Zeroizing::new(value.to_string()))
    }

    /// A command carrying a password: the JSON text is built around it, so no `Value` holds it.
    fn with_password(mut value: Value, password: &[u8]) -> Result<Self, String> {
        let password = std::str::from_utf8(password).map_err(|_| "a broker password is not UTF-8".to_string())?;
        value["password"] = Value::String(String::new());
        let text = value.to_string();
        let quoted = Zeroizing::new(serde_json::to_string(password).map_err(|e| e.to_string())?);
        let Some(at) = text.find("\"password\":\"\"") else { return Err("password field not serialised".into()) };
        let mut out = Zeroizing::new(String::with_capacity(text.len() + quoted.len()));
        out.push_str(&text[..at + "\"password\":".len()]);
        out.push_str(&quoted);
        out.push_str(&text[at + "\"password\":\"\"".len()..]);
        Ok(Command(out))
    }
}

struct Request {
    commands: Vec<Command>,
    done: oneshot::Sender<Result<Vec<Response>, String>>,
}

/// A handle on this node's admin link to the plugin; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dynsec::Admin")
    }
}

/// Reads the admin password file: one line, surrounding whitespace ignored.
pub fn read_admin_password(dynsec: &Dynsec) -> Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(&dynsec.admin_password_file)
            .map_err(|e| format!("{}: {e}", dynsec.admin_password_file.display()))?,
    );
    let password = Zeroizing::new(text.trim().to_string());
    if password.is_empty() {
        return Err(format!("{} is empty", dynsec.admin_password_file.display()));
    }
    Ok(password)
}

impl Admin {
    /// Connects this node's admin identity (client id `{client_id}-dynsec`) and serves requests.
    pub fn connect(broker: &ExternalBroker, dynsec: &Dynsec) -> Result<Self, String> {
        let (host, port) = crate::external::parse_url(&broker.url)?;
        let password = read_admin_password(dynsec)?;
        let client_id = format!(
            "{}-dynsec",
            broker.client_id.clone().unwrap_or_else(|| format!("rki-gateway-{}", std::process::id()))
        );
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_credentials(dynsec.admin_username.clone(), password.as_str());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_max_packet_size(8 * 1024 * 1024, 1024 * 1024);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        tokio::spawn(run_link(client, eventloop, rx));
        Ok(Admin { tx })
    }

    async fn run(&self, commands: Vec<Command>) -> Result<Vec<Response>, String> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let (done, answer) = oneshot::channel();
        self.tx.send(Request { commands, done }).await.map_err(|_| "dynsec link closed".to_string())?;
        answer.await.map_err(|_| "dynsec link closed".to_string())?
    }

    /// Creates or updates the client `username` (its client id must equal it), with `password`
    /// and a role of its own holding `acls`. Idempotent: an existing client gets the new
    /// password, which the broker refuses the old one for at once (and disconnects it).
    pub async fn put_client(&self, username: &str, role: &str, password: &[u8], acls: &[Acl]) -> Result<(), String> {
        let create_role = json!({"command": "createRole", "rolename": role, "acls": acls.iter().map(Acl::to_json).collect::<Vec<_>>()});
        let create_client = json!({"command": "createClient", "username": username, "clientid": username,
            "roles": [{"rolename": role}]});
        let answers =
            self.run(vec![Command::new(create_role), Command::with_password(create_client, password)?]).await?;
        let (role_answer, client_answer) = match answers.as_slice() {
            [r, c] => (r, c),
            _ => return Err("dynsec: wrong number of answers".into()),
        };
        if !role_answer.ok() && !role_answer.error_is("already exists") {
            return Err(format!("createRole {role}: {}", role_answer.error.clone().unwrap_or_default()));
        }
        if client_answer.ok() {
            return Ok(());
        }
        if !client_answer.error_is("already exists") {
            return Err(format!("createClient {username}: {}", client_answer.error.clone().unwrap_or_default()));
        }
        let set = json!({"command": "setClientPassword", "username": username});
        let answers = self.run(vec![Command::with_password(set, password)?]).await?;
        match answers.first() {
            Some(a) if a.ok() => Ok(()),
            Some(a) => Err(format!("setClientPassword {username}: {}", a.error.clone().unwrap_or_default())),
            None => Err("dynsec: no answer".into()),
        }
    }

    /// Removes clients and their roles; one already gone is not an error.
    pub async fn remove_clients(&self, clients: &[(String, String)]) -> Result<usize, String> {
        let mut commands = Vec::with_capacity(clients.len() * 2);
        for (username, role) in clients {
            commands.push(Command::new(json!({"command": "deleteClient", "username": username})));
            commands.push(Command::new(json!({"command": "deleteRole", "rolename": role})));
        }
        let answers = self.run(commands).await?;
        let failed: Vec<&Response> = answers.iter().filter(|a| !a.ok() && !a.error_is("not found")).collect();
        if let Some(a) = failed.first() {
            return Err(format!(
                "{} of {} removals failed: {}",
                failed.len(),
                answers.len(),
                a.error.clone().unwrap_or_default()
            ));
        }
        Ok(clients.len())
    }

    /// Every client of the plugin with its roles, paged.
    pub async fn list_clients(&self) -> Result<Vec<(String, Vec<String>)>, String> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            let page = json!({"command": "listClients", "verbose": true, "count": LIST_PAGE, "offset": offset});
            let answers = self.run(vec![Command::new(page)]).await?;
            let data = answers.first().and_then(|a| a.data.clone()).ok_or("listClients: no data")?;
            let total = data["totalCount"].as_u64().unwrap_or(0) as usize;
            let clients = data["clients"].as_array().cloned().unwrap_or_default();
            for c in &clients {
                let Some(username) = c["username"].as_str() else { continue };
                let roles = c["roles"]
                    .as_array()
                    .map(|rs| rs.iter().filter_map(|r| r["rolename"].as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                out.push((username.to_string(), roles));
            }
            offset += LIST_PAGE;
            if clients.is_empty() || offset >= total {
                return Ok(out);
            }
        }
    }

    /// Hands new passwords to the broker, retrying; returns once each is applied or given up
    /// (logged and counted, never the password).
    pub async fn put_identities(&self, changes: Vec<(BrokerIdentity, SecretBytes)>) {
        let puts = changes.into_iter().map(|(identity, password)| async move {
            let (username, role, acls) = (identity.username(), identity.role(), identity.acls());
            for attempt in 1..=PUT_ATTEMPTS_MAX {
                match self.put_client(&username, &role, password.expose_secret(), &acls).await {
                    Ok(()) => return,
                    Err(e) if attempt == PUT_ATTEMPTS_MAX => {
                        metrics::counter!(crate::metrics::DYNSEC_FAILURES_TOTAL).increment(1);
                        error!(client = %username, error = %e, "the broker did not take the new credentials");
                    }
                    Err(e) => {
                        warn!(client = %username, error = %e, attempt, "dynsec update failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    }
                }
            }
        });
        futures_util::future::join_all(puts).await;
    }
}

/// The admin link: one MQTT connection, requests batched into `$CONTROL` messages, answers
/// matched by correlation data (`{link}-{slot}`, `link` random per process).
async fn run_link(client: AsyncClient, mut eventloop: rumqttc::EventLoop, mut rx: mpsc::Receiver<Request>) {
    struct Pending {
        answers: Vec<Option<Response>>,
        left: usize,
        done: oneshot::Sender<Result<Vec<Response>, String>>,
        deadline: tokio::time::Instant,
    }
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Mosquitto 2.0 publishes every answer to every subscriber of the response topic, i.e. to
    // every node's admin link: a random prefix tells this link's answers from the others'.
    let link = {
        let mut bytes = [0u8; 8];
        let _ = getrandom::getrandom(&mut bytes);
        u64::from_le_bytes(bytes)
    };
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // correlation id -> (request, index)
    let mut slots: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut subscribed = false;
    let mut queue: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
    // Messages composed and not yet taken by the client's request channel (bounded; this task
    // also polls the event loop that drains it, so it cannot wait for room): handed over as the
    // event loop makes room, at the next turn of this loop.
    let mut outbox: std::collections::VecDeque<Zeroizing<String>> = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    subscribed = false;
                    if let Err(e) = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
                        error!(error = %e, "dynsec: subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    subscribed = ack.return_codes.iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if subscribed {
                        info!("dynsec admin link ready");
                    } else {
                        error!("dynsec: the broker refused the admin identity's subscription (is it the plugin's admin?)");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE_TOPIC => {
                    #[derive(Deserialize)]
                    struct Answers { responses: Vec<Response> }
                    let Ok(answers) = serde_json::from_slice::<Answers>(&p.payload) else {
                        warn!("dynsec: an answer that does not parse");
                        continue;
                    };
                    for answer in answers.responses {
                        let Some(slot) = answer
                            .correlation
                            .as_deref()
                            .and_then(|c| c.split_once('-'))
                            .filter(|(prefix, _)| prefix.parse::<u64>().ok() == Some(link))
                            .and_then(|(_, slot)| slot.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        let Some((request, index)) = slots.remove(&slot) else { continue };
                        let Some(p) = pending.get_mut(&request) else { continue };
                        if p.answers[index].is_none() {
                            p.answers[index] = Some(answer);
                            p.left -= 1;
                        }
                        if p.left == 0 {
                            if let Some(p) = pending.remove(&request) {
                                let _ = p.done.send(Ok(p.answers.into_iter().flatten().collect()));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    subscribed = false;
                    metrics::gauge!(crate::metrics::DYNSEC_UP).set(0.0);
                    warn!(error = %e, "dynsec admin connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            request = rx.recv(), if queue.len() < QUEUE_LEN => match request {
                Some(r) => queue.push_back(r),
                None if queue.is_empty() && pending.is_empty() => return,
                None => {}
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let late: Vec<u64> = pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
                for id in late {
                    slots.retain(|_, (request, _)| *request != id);
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.done.send(Err("dynsec: no answer in time".into()));
                    }
                }
            }
        }
        if subscribed {
            metrics::gauge!(crate::metrics::DYNSEC_UP).set(1.0);
            // Several requests per message, each command with its own correlation id.
            while !queue.is_empty() {
                let mut body = Zeroizing::new(String::from("{\"commands\":["));
                let mut count = 0;
                while let Some(front) = queue.front() {
                    if count > 0 && count + front.commands.len() > COMMANDS_PER_MESSAGE_MAX {
                        break;
                    }
                    let Some(request) = queue.pop_front() else { break };
                    let id = NEXT.fetch_add(1, Ordering::Relaxed);
                    let n = request.commands.len();
                    for (index, command) in request.commands.iter().enumerate() {
                        let slot = NEXT.fetch_add(1, Ordering::Relaxed);
                        slots.insert(slot, (id, index));
                        if count > 0 {
                            body.push(',');
                        }
                        // `{"command":…}` + `,"correlationData":"n"}`
                        body.push_str(&command.0[..command.0.len() - 1]);
                        body.push_str(&format!(",\"correlationData\":\"{link}-{slot}\"}}"));
                        count += 1;
                    }
                    let deadline = tokio::time::Instant::now() + RESPONSE_TIMEOUT;
                    pending.insert(id, Pending { answers: vec![None; n], left: n, done: request.done, deadline });
                }
                body.push_str("]}");
                outbox.push_back(body);
            }
            while let Some(body) = outbox.front() {
                match client.try_publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, body.as_bytes().to_vec()) {
                    Ok(()) => {
                        outbox.pop_front();
                    }
                    // Full (300 terminals' bootstrap identities at once lost 136 of them here
                    // before): the event loop makes room; the rest goes at the next turn.
                    Err(rumqttc::ClientError::TryRequest(_)) => break,
                    Err(e) => {
                        error!(error = %e, "dynsec: publish failed");
                        outbox.pop_front();
                    }
                }
            }
        }
    }
}

/// What one reconcile found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub managed: usize,
    pub removed: usize,
    /// Initialised devices the broker has no client for: the plugin takes no hash over its API,
    /// so only `rki-gateway dynsec-init --from-store` (Mosquitto stopped) or a re-initialisation
    /// restores them.
    pub missing_devices: usize,
}

/// What the store says may have a broker client: initialised SNs, SNs whose bootstrap identity
/// may exist, backends not revoked.
#[derive(Debug, Default, Clone)]
pub struct Owned {
    pub initialised: HashSet<String>,
    pub bootstrap_live: HashSet<String>,
    pub backends: HashSet<BackendId>,
}

/// The clients that should not exist: a device no longer registered or initialised, a bootstrap
/// identity whose GUDID is neither live nor spent within the grace, a revoked (or unknown)
/// backend. Pure, for the tests.
pub fn stale_clients(broker: &[(String, Vec<String>)], owned: &Owned) -> Vec<(String, String)> {
    let mut stale = Vec::new();
    for (username, roles) in broker {
        for role in roles {
            let keep = match BrokerIdentity::from_role(role) {
                Some(BrokerIdentity::Device(sn)) => *username != sn || owned.initialised.contains(&sn),
                Some(BrokerIdentity::Bootstrap(sn)) => {
                    *username != topic::bootstrap_client_id(&sn) || owned.bootstrap_live.contains(&sn)
                }
                Some(BrokerIdentity::Backend(id)) => *username != id.client_id() || owned.backends.contains(&id),
                None => true,
            };
            if !keep {
                stale.push((username.clone(), role.clone()));
            }
        }
    }
    stale
}

/// Lists the broker's clients (paged), reads the store after the listing, and removes the stale
/// managed ones. Several nodes may run it at once: it only removes what the store says must go,
/// and a removal already done is not an error. A GUDID provisioned between the store read and the
/// removal (milliseconds) could lose its fresh `init@{SN}`; the store is read again just before
/// removing, which narrows that to the removal's own round trip.
pub async fn reconcile(admin: &Admin, engine: &crate::engine::Engine) -> Result<Reconciled, String> {
    let broker = admin.list_clients().await?;
    let managed =
        broker.iter().filter(|(_, roles)| roles.iter().any(|r| BrokerIdentity::from_role(r).is_some())).count();
    let owned = registry(engine).await?;
    let candidates = stale_clients(&broker, &owned);
    let mut removed = 0;
    if !candidates.is_empty() {
        let owned = registry(engine).await?;
        let stale =
            stale_clients(&candidates.iter().map(|(u, r)| (u.clone(), vec![r.clone()])).collect::<Vec<_>>(), &owned);
        removed = admin.remove_clients(&stale).await?;
    }
    let present: HashSet<&str> = broker
        .iter()
        .filter(|(u, roles)| {
            roles.iter().any(|r| BrokerIdentity::from_role(r) == Some(BrokerIdentity::Device(u.clone())))
        })
        .map(|(u, _)| u.as_str())
        .collect();
    let missing_devices = owned.initialised.iter().filter(|sn| !present.contains(sn.as_str())).count();
    Ok(Reconciled { managed, removed, missing_devices })
}

/// Initialised SNs, SNs whose bootstrap identity may exist (a live GUDID, or one spent within
/// [`crate::mosquitto::SPENT_BOOTSTRAP_GRACE`]), and live backends.
async fn registry(engine: &crate::engine::Engine) -> Result<Owned, String> {
    let store = engine.store.clone();
    let now = engine.clock.now_ms();
    tokio::task::spawn_blocking(move || {
        let spent_after =
            now.saturating_sub(crate::mosquitto::SPENT_BOOTSTRAP_GRACE.as_millis() as crate::clock::Millis);
        let initialised: HashSet<String> = store
            .broker_devices()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|(sn, hash)| hash.map(|_| sn))
            .collect();
        let live: HashSet<String> = store
            .live_bootstrap_hashes(None, now, Some(spent_after))
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(sn, _)| sn)
            .collect();
        let backends: HashSet<BackendId> = store
            .broker_backends()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|b| BackendId::new(&b.org, &b.name).ok())
            .collect();
        Ok(Owned { initialised, bootstrap_live: live, backends })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Reconciles at start, then on every registry change (at most every
/// [`RECONCILE_INTERVAL_MIN`]) and at least every [`RECONCILE_INTERVAL_MAX`].
pub fn spawn_reconcile(admin: Admin, engine: Arc<crate::engine::Engine>) {
    tokio::spawn(async move {
        let mut missing_reported = usize::MAX;
        loop {
            match reconcile(&admin, &engine).await {
                Ok(r) => {
                    metrics::gauge!(crate::metrics::DYNSEC_MISSING_DEVICES).set(r.missing_devices as f64);
                    if r.removed > 0 {
                        info!(removed = r.removed, managed = r.managed, "dynsec: stale broker clients removed");
                    }
                    if r.missing_devices != missing_reported && r.missing_devices > 0 {
                        warn!(
                            devices = r.missing_devices,
                            "initialised devices without a broker client: seed the broker with `rki-gateway dynsec-init --from-store`"
                        );
                    }
                    missing_reported = r.missing_devices;
                }
                Err(e) => warn!(error = %e, "dynsec reconcile failed; retrying"),
            }
            tokio::time::sleep(RECONCILE_INTERVAL_MIN).await;
            let _ =
                tokio::time::timeout(RECONCILE_INTERVAL_MAX - RECONCILE_INTERVAL_MIN, engine.registry_changed()).await;
        }
    });
}

/// Splits a `$7$iterations$salt$hash` line into the plugin's three fields.
fn split_hash(stored: &str) -> Option<(u32, &str, &str)> {
    let mut fields = stored.split('$');
    match (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(""), Some("7"), Some(iterations), Some(salt), Some(hash), None) => {
            Some((iterations.parse().ok()?, salt, hash))
        }
        _ => None,
    }
}

fn client_json(username: &str, role: &str, hash: &str) -> Option<Value> {
    let (iterations, salt, password) = split_hash(hash)?;
    Some(json!({"username": username, "clientid": username, "password": password, "salt": salt,
        "iterations": iterations, "roles": [{"rolename": role}]}))
}

fn role_json(role: &str, acls: &[Acl]) -> Value {
    json!({"rolename": role, "acls": acls.iter().map(Acl::to_json).collect::<Vec<_>>()})
}

/// The plugin's configuration file: the admin identity (`$CONTROL` only), the gateway's identity,
/// and the managed identities given (SN or `init@SN`, with their `$7$` hashes), each with its
/// role; everything not allowed is denied. Mosquitto reads it only at start.
pub fn seed_file(
    admin: (&str, &str),
    gateway: (&str, &str),
    identities: &[(BrokerIdentity, String)],
) -> Result<String, String> {
    let mut clients = vec![
        client_json(admin.0, ROLE_ADMIN, admin.1).ok_or("admin hash")?,
        client_json(gateway.0, ROLE_GATEWAY, gateway.1).ok_or("gateway hash")?,
    ];
    // The gateway identity connects with its own client ids (one per node).
    clients[1].as_object_mut().map(|c| c.remove("clientid"));
    clients[0].as_object_mut().map(|c| c.remove("clientid"));
    let mut roles = vec![role_json(ROLE_ADMIN, &admin_acls()), role_json(ROLE_GATEWAY, &gateway_acls())];
    for (identity, hash) in identities {
        let Some(client) = client_json(&identity.username(), &identity.role(), hash) else { continue };
        clients.push(client);
        roles.push(role_json(&identity.role(), &identity.acls()));
    }
    let file = json!({
        "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false, "subscribe": false, "unsubscribe": true},
        "clients": clients,
        "groups": [],
        "roles": roles,
    });
    serde_json::to_string_pretty(&file).map_err(|e| e.to_string())
}

/// The store's identities for [`seed_file`]: every initialised device, every SN with a live
/// GUDID (its newest) and every live backend.
pub fn store_identities(
    store: &dyn crate::store::Store,
    now: crate::clock::Millis,
) -> Result<Vec<(BrokerIdentity, String)>, String> {
    let mut out = Vec::new();
    for (sn, hash) in store.broker_devices().map_err(|e| e.to_string())? {
        if let Some(hash) = hash {
            out.push((BrokerIdentity::Device(sn), hash));
        }
    }
    let mut seen = HashSet::new();
    for (sn, hash) in store.live_bootstrap_hashes(None, now, None).map_err(|e| e.to_string())? {
        if seen.insert(sn.clone()) {
            out.push((BrokerIdentity::Bootstrap(sn), hash));
        }
    }
    for b in store.broker_backends().map_err(|e| e.to_string())? {
        let Ok(id) = BackendId::new(&b.org, &b.name) else { continue };
        out.push((BrokerIdentity::Backend(id), b.password_hash));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_lives_only_in_the_commands_text() {
        let value = json!({"command": "createClient", "username": "SN1"});
        let command = Command::with_password(value, b"pa\"ss").expect("command");
        let parsed: Value = serde_json::from_str(&command.0).expect("json");
        assert_eq!(parsed["password"], "pa\"ss");
        assert_eq!(parsed["username"], "SN1");
    }

    #[test]
    fn each_identity_is_confined_to_its_topics() {
        let device = device_acls("SN1");
        assert!(device.contains(&Acl::new(AclKind::PublishClientSend, "SN1/rki/v1/up")));
        assert!(device.contains(&Acl::new(AclKind::SubscribeLiteral, "SN1/rki/v1/down")));
        assert!(device.iter().all(|a| a.topic.starts_with("SN1/") && !a.topic.contains('+') && !a.topic.contains('#')));
        let bootstrap = bootstrap_acls("SN1");
        assert!(bootstrap.contains(&Acl::new(AclKind::PublishClientSend, "SN1/rki/v1/init")));
        assert!(!bootstrap.iter().any(|a| a.topic.ends_with("/up")));
        let erp = BrokerIdentity::Backend(BackendId::new("acme", "erp-1").expect("names"));
        assert_eq!(
            (erp.username(), erp.role()),
            ("backend@acme~erp-1".into(), "rki-backend:backend@acme~erp-1".into())
        );
        assert_eq!(BrokerIdentity::from_role(&erp.role()), Some(erp.clone()));
        let backend = erp.acls();
        assert!(backend.contains(&Acl::new(AclKind::PublishClientSend, "rki/v1/backend/acme/erp-1/req")));
        assert!(backend.contains(&Acl::new(AclKind::SubscribeLiteral, "rki/v1/backend/acme/erp-1/events")));
        assert!(backend.contains(&Acl::new(AclKind::PublishClientReceive, "rki/v1/backend/acme/erp-1/reply")));
        assert!(backend
            .iter()
            .all(|a| a.topic.starts_with("rki/v1/backend/acme/erp-1/") && !a.topic.contains(['+', '#'])));
        assert!(admin_acls().iter().all(|a| a.topic.starts_with("$CONTROL/")));
        assert!(!gateway_acls().iter().any(|a| a.topic.starts_with("$CONTROL")));
    }

    #[test]
    fn only_managed_clients_that_the_store_disowns_are_stale() {
        let broker = vec![
            ("SN1".to_string(), vec!["rki-device:SN1".to_string()]),
            ("SN2".to_string(), vec!["rki-device:SN2".to_string()]),
            ("init@SN1".to_string(), vec!["rki-bootstrap:SN1".to_string()]),
            ("init@SN3".to_string(), vec!["rki-bootstrap:SN3".to_string()]),
            ("rki-gateway".to_string(), vec![ROLE_GATEWAY.to_string()]),
            ("backend-1".to_string(), vec!["other".to_string()]),
            ("backend@acme~erp".to_string(), vec!["rki-backend:backend@acme~erp".to_string()]),
            ("backend@acme~old".to_string(), vec!["rki-backend:backend@acme~old".to_string()]),
        ];
        let erp = BackendId::new("acme", "erp").expect("names");
        let owned = Owned {
            initialised: ["SN1".to_string()].into(),
            bootstrap_live: ["SN3".to_string()].into(),
            backends: [erp].into(),
        };
        let stale = stale_clients(&broker, &owned);
        assert_eq!(
            stale,
            vec![
                ("SN2".to_string(), "rki-device:SN2".to_string()),
                ("init@SN1".to_string(), "rki-bootstrap:SN1".to_string()),
                ("backend@acme~old".to_string(), "rki-backend:backend@acme~old".to_string()),
            ]
        );
    }

    #[test]
    fn the_seed_splits_mosquitto_hashes_into_the_plugins_fields() {
        let hash = crate::mosquitto::password_hash_with_salt(b"secret", &[7u8; 12], 101);
        let text = seed_file(("admin", &hash), ("gw", &hash), &[(BrokerIdentity::Device("SN1".into()), hash.clone())])
            .expect("seed");
        let v: Value = serde_json::from_str(&text).expect("json");
        let sn1 = &v["clients"][2];
        assert_eq!(sn1["username"], "SN1");
        assert_eq!(sn1["clientid"], "SN1");
        assert_eq!(sn1["iterations"], 101);
        assert_eq!(
            format!("$7$101${}${}", sn1["salt"].as_str().unwrap_or(""), sn1["password"].as_str().unwrap_or("")),
            hash
        );
        assert_eq!(v["defaultACLAccess"]["subscribe"], false);
        assert!(!text.contains("secret"));
    }
}
