//! The durable store: the source of truth. The broker's sessions are only a fast path; everything
//! that must survive a crash is here.
//!
//! [`Store`] is the narrow interface the engine and the API use. It is synchronous and
//! object-safe, so the engine holds an `Arc<dyn Store>` and calls it from blocking threads. It is
//! the union of six role traits, [`Registry`], [`AuditLog`], [`KeySources`], [`Gudids`],
//! [`Tasks`] and [`Delivery`], each implemented by both backends in a file of its own:
//! [`sqlite::SqliteStore`], the embedded default (SQLite in WAL mode with `synchronous = FULL`),
//! and [`postgres::PostgresStore`], for several gateway nodes on one database.
//!
//! What the backends share is here once: the row mappers and column lists (`rows`), and the
//! migrations runner over the numbered `.sql` files of `gateway/migrations/` (`migrations`).
//!
//! Batching of commits is the engine's job (`engine::committer`): it gathers the writes of many
//! acks and hellos and hands them to [`Delivery::apply_batch`], one transaction, one fsync.
//!
//! Row types here are storage types: they may derive `Serialize`, and hold key material only as
//! sealed key blocks (TR-31 under the master key), never in the clear.

pub mod channel;
pub mod guard;
pub mod health;
mod migrations;
pub mod pg_tls;
pub mod postgres;
mod postgres_channel;
mod roles;
mod rows;
pub mod sqlite;
mod sqlite_channel;

use serde::Serialize;

use crate::clock::Millis;
use crate::domain::ExecutionState;

/// Errors of the store. `Conflict` and `NotFound` are the caller's fault and map to 409 / 404;
/// `Backend` is ours.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store cannot be reached or failed an I/O: an outage, not the request's fault.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's disk is full.
    #[error("store full: {0}")]
    Full(String),
    #[error("store backend: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The tables whose column holds one key sealed under the master key, `(table, column)`: a master
/// key rotation re-seals each row where it is set (a GUDID row of a pre-schema-7 gateway has none
/// until the start-time re-seal). Device credentials hold three and are re-sealed apart.
pub(crate) const SEALED_KEY_COLUMNS: [(&str, &str); 4] =
    [("key_sources", "sealed"), ("keks", "sealed"), ("gudids", "sealed_mac_key"), ("backends", "sealed_mac_key")];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The platform-level key owner: authorizes BDKs for organizations. Belongs to no organization.
    KeyOwner,
    /// An organization's operator (fleet manager).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::KeyOwner => "key_owner",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "key_owner" => Some(Role::KeyOwner),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgRow {
    pub id: i64,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    pub id: i64,
    pub org_id: Option<i64>,
    pub role: Role,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: Millis,
    pub org_id: Option<i64>,
    pub actor: String,
    pub token_id: Option<i64>,
    pub action: String,
    pub object: String,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeySourceRow {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    /// `KeyAlgorithm::as_str` of the BDK.
    pub algorithm: String,
    /// KCV of the BDK, 3 bytes hex.
    pub kcv: String,
    /// The BDK, sealed under the master key. Never leaves the key service.
    #[serde(skip)]
    pub sealed: String,
    /// Key set identifier: the fixed leading bytes of every KSN (TDES, 5 bytes) or the BDK ID of
    /// every initial key ID (AES, 4 bytes).
    pub key_set_id: String,
    pub created_at: Millis,
}

/// A key-encryption key (the key owner's ZMK) of an organization: entered once as components,
/// it only ever unwraps the TR-31 blocks its BDKs arrive in.
#[derive(Debug, Clone, Serialize)]
pub struct KekRow {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    /// `KeyAlgorithm::as_str` of the KEK.
    pub algorithm: String,
    /// KCV of the KEK, 3 bytes hex.
    pub kcv: String,
    /// The KEK, sealed under the master key (usage K0, mode D). Never leaves the key service.
    #[serde(skip)]
    pub sealed: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub id: i64,
    pub org_id: i64,
    pub sn: String,
    pub model: Option<String>,
    pub rom_version: Option<String>,
    pub app_version: Option<String>,
    pub region: Option<String>,
    pub debug_mode: bool,
    pub debug_key_present: bool,
    pub locked: bool,
    pub last_seen: Option<Millis>,
    pub assigned_key_source: Option<i64>,
    pub initialised: bool,
    pub x_pos_device_id: Option<String>,
    pub created_at: Millis,
    /// An unlock was requested and the device has not yet reported itself unlocked.
    pub unlock_pending: bool,
    /// The key slots the device last reported (JSON).
    #[serde(skip)]
    pub slots_json: String,
}

/// A device's sealed secrets and replay counter: what the message path needs.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub device_id: i64,
    pub org_id: i64,
    pub sn: String,
    pub signing_key: String,
    pub kbpk_aes: String,
    pub kbpk_tdes: String,
    pub password_hash: Vec<u8>,
    pub last_counter: u64,
    /// Bumped on every (re)initialisation, so stale cached keys are recognised.
    pub generation: i64,
    pub unlock_pending: bool,
}

/// What deriving and wrapping one device's key needs ([`TaskSink::derive_targets`]).
#[derive(Debug, Clone)]
pub struct DeriveTarget {
    pub device_id: i64,
    pub sn: String,
    /// The device's credential generation the key is wrapped for.
    pub generation: i64,
    /// The device's key-block protection key for the BDK's family, sealed.
    pub sealed_kbpk: String,
}

/// The new secrets of a device, sealed, as written by an initialisation.
#[derive(Debug, Clone)]
pub struct NewCredentials {
    pub signing_key: String,
    pub kbpk_aes: String,
    pub kbpk_tdes: String,
    pub password_hash: Vec<u8>,
    pub counter: u64,
    pub x_pos_device_id: String,
    /// Mosquitto `$7$` hash of the MQTT password, for the external-broker mode's password file.
    pub broker_password_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupRow {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    pub description: String,
    pub members: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GudidRow {
    pub id: i64,
    pub org_id: i64,
    pub device_id: i64,
    pub sn: String,
    /// `SHA-256("rki/v1 gudid id" || GUDID)`: the name the terminal's `CreateKey` carries. A
    /// one-way hash of 128 random bits; it opens nothing.
    #[serde(skip)]
    pub gudid_id: Vec<u8>,
    /// The GUDID's MAC key (`gudid_mac_key`, PROTOCOL.md §7.2: the `CreateKey` tag key and the
    /// HKDF salt), sealed under the master key (`KeyService::seal_gudid_mac_key`), re-sealed by a
    /// master key rotation. Never in the clear in the store: a copy of the store without the
    /// master key cannot tag a `CreateKey`. Empty on a row a pre-schema-7 gateway wrote until
    /// the start-time re-seal (`seal_legacy_gudid_keys`) has sealed it.
    #[serde(skip)]
    pub sealed_mac_key: String,
    /// A salted one-way hash (`$7$`, see `mosquitto::password_hash`) of the bootstrap identity's
    /// password (`Gudid::bootstrap_password`): the MQTT endpoint checks `init@{SN}` against it.
    /// It does not yield the password (a PBKDF2 hash of an HMAC of 128 random bits: nothing to
    /// guess), so a copy of the store cannot open a bootstrap session.
    /// `None` on GUDIDs provisioned before schema 5: those cannot open one at all.
    #[serde(skip)]
    pub bootstrap_hash: Option<String>,
    pub provisioned_by: String,
    pub provisioned_at: Millis,
    pub expires_at: Millis,
    pub used_at: Option<Millis>,
    /// When the GUDID was revoked (by an operator, or by a newer GUDID for the same SN), and by
    /// whom. A revoked GUDID opens no bootstrap identity and initialises nothing.
    pub revoked_at: Option<Millis>,
    pub revoked_by: Option<String>,
    /// When the device first proved, by a message verified under its new signing key, that it
    /// holds the secrets this GUDID's exchange gave it. Until then (and for at most
    /// [`GUDID_PROOF_WINDOW_MS`] after `used_at`) a retried CreateKey is answered anew.
    pub proven_at: Option<Millis>,
}

/// How long after a GUDID's first answer a retried CreateKey with it is answered anew, while the
/// device has not proven the secrets of an earlier answer: a terminal whose answer came too late
/// (it gave up, reconnected, and asked again) keeps its GUDID instead of needing a new one typed
/// in. Bounded, because a GUDID is a bearer secret until it is spent for good.
pub const GUDID_PROOF_WINDOW_MS: Millis = 10 * 60 * 1000;

impl GudidRow {
    /// Unspent, unrevoked and not expired at `now`: it can still open `init@{SN}` and initialise.
    pub fn is_live(&self, now: Millis) -> bool {
        self.used_at.is_none() && self.revoked_at.is_none() && now < self.expires_at
    }

    /// Spent, not yet proven by the device, within [`GUDID_PROOF_WINDOW_MS`] of its first answer,
    /// unrevoked and not expired at `now`: a retried CreateKey with it is answered anew.
    pub fn awaits_proof(&self, now: Millis) -> bool {
        self.used_at.is_some_and(|used| now < used.saturating_add(GUDID_PROOF_WINDOW_MS))
            && self.proven_at.is_none()
            && self.revoked_at.is_none()
            && now < self.expires_at
    }

    /// `used`, `revoked`, `expired` or `unused` (live), in that order of precedence.
    pub fn status(&self, now: Millis) -> &'static str {
        if self.used_at.is_some() {
            "used"
        } else if self.revoked_at.is_some() {
            "revoked"
        } else if now >= self.expires_at {
            "expired"
        } else {
            "unused"
        }
    }
}

/// A GUDID to provision for one SN ([`Gudids::provision_gudids`]): only what the store keeps of
/// it (the GUDID itself is shown once to the operator and never stored).
#[derive(Debug, Clone)]
pub struct NewGudid {
    pub sn: String,
    pub gudid_id: Vec<u8>,
    /// Sealed under the master key ([`GudidRow::sealed_mac_key`]).
    pub sealed_mac_key: String,
    pub bootstrap_hash: String,
    pub expires_at: Millis,
}

/// A GUDID as provisioned, with the rows of the GUDIDs of its SN it revoked.
#[derive(Debug, Clone)]
pub struct ProvisionedGudid {
    pub row: GudidRow,
    pub revoked: Vec<i64>,
}

/// Who acts: the audit entries a store method writes in the action's own transaction name them.
#[derive(Debug, Clone)]
pub struct Actor {
    pub label: String,
    pub token_id: Option<i64>,
}

impl Actor {
    /// An actor that is not an API token: a command line, a test, the engine itself.
    pub fn named(label: impl Into<String>) -> Self {
        Self { label: label.into(), token_id: None }
    }
}

/// An action's audit entry, handed to the store method that performs the action and written in
/// the same transaction: after a crash, both the action and its entry are there, or neither.
#[derive(Debug, Clone)]
pub struct Audit {
    pub actor: Actor,
    pub org_id: Option<i64>,
    /// `group.create`, `task.stop`, … (docs/OPERATIONS.md lists them).
    pub action: &'static str,
    /// What is acted on (`group:NAME`); the store fills it in when only the transaction knows it
    /// (a new task's number).
    pub object: String,
    /// A JSON object; the store adds what only the transaction knows (rows imported, executions
    /// terminated).
    pub details: serde_json::Value,
    pub at: Millis,
    /// The backend request this action answers, if a backend asked for it: the store that writes
    /// the entry writes the answer in the same transaction (`docs/PROTOCOL.md` §12.5). Only
    /// `Tasks::stop_task` and `Registry::set_unlock_pending` take one; the others ignore it.
    pub answering: Option<channel::Answering>,
}

impl Audit {
    pub fn new(
        actor: &Actor,
        org_id: Option<i64>,
        action: &'static str,
        object: impl Into<String>,
        details: serde_json::Value,
        at: Millis,
    ) -> Self {
        Self { actor: actor.clone(), org_id, action, object: object.into(), details, at, answering: None }
    }

    /// The same action, answering the backend request `answering` in its transaction.
    pub fn answering(self, answering: channel::Answering) -> Self {
        Self { answering: Some(answering), ..self }
    }

    /// The entry as the store writes it: `object` and `org_id` when the transaction decides them,
    /// and `facts` added to the details.
    pub(crate) fn entry(
        &self,
        object: Option<String>,
        org_id: Option<i64>,
        facts: &[(&str, serde_json::Value)],
    ) -> AuditEntry {
        let mut details = match &self.details {
            serde_json::Value::Object(map) => map.clone(),
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut map = serde_json::Map::new();
                map.insert("value".into(), other.clone());
                map
            }
        };
        for (key, value) in facts {
            details.insert((*key).to_string(), value.clone());
        }
        AuditEntry {
            id: 0,
            at: self.at,
            org_id: org_id.or(self.org_id),
            actor: self.actor.label.clone(),
            token_id: self.actor.token_id,
            action: self.action.to_string(),
            object: object.unwrap_or_else(|| self.object.clone()),
            details: serde_json::Value::Object(details),
        }
    }
}

/// Which GUDIDs [`Gudids::list_gudids`] returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct GudidFilter {
    pub sn: Option<String>,
    /// Only the GUDIDs live at this time ([`GudidRow::is_live`]).
    pub live_at: Option<Millis>,
    /// At most this many (0: all).
    pub limit: i64,
}

impl NewGudid {
    /// The row of this GUDID as [`Gudids::provision_gudids`] stores it: row `id`, for
    /// `device_id`, provisioned by `actor` at `at`, live.
    pub(crate) fn provisioned(&self, id: i64, org_id: i64, device_id: i64, actor: &Actor, at: Millis) -> GudidRow {
        GudidRow {
            id,
            org_id,
            device_id,
            sn: self.sn.clone(),
            gudid_id: self.gudid_id.clone(),
            sealed_mac_key: self.sealed_mac_key.clone(),
            bootstrap_hash: Some(self.bootstrap_hash.clone()),
            provisioned_by: actor.label.clone(),
            provisioned_at: at,
            expires_at: self.expires_at,
            used_at: None,
            proven_at: None,
            revoked_at: None,
            revoked_by: None,
        }
    }
}

/// The audit entries of one GUDID provisioned as row `id`, in the order
/// [`Gudids::provision_gudids`] writes them in its transaction: a `gudid.revoke` for each live
/// GUDID of its SN it replaced (`revoked`), then its `gudid.provision`.
pub(crate) fn provision_audits(
    org_id: i64,
    actor: &Actor,
    at: Millis,
    g: &NewGudid,
    id: i64,
    revoked: &[i64],
) -> Vec<AuditEntry> {
    let mut entries: Vec<AuditEntry> = revoked
        .iter()
        .map(|old| {
            let details = serde_json::json!({"gudid": old, "reason": "replaced", "replaced_by": id});
            gudid_audit(org_id, actor, at, "gudid.revoke", &g.sn, details)
        })
        .collect();
    let details = serde_json::json!({"gudid": id, "expires_at": g.expires_at, "revoked": revoked});
    entries.push(gudid_audit(org_id, actor, at, "gudid.provision", &g.sn, details));
    entries
}

/// The audit entry of a GUDID action, as [`Gudids::provision_gudids`] and
/// [`Gudids::revoke_gudid`] write it inside their transaction.
pub(crate) fn gudid_audit(
    org_id: i64,
    actor: &Actor,
    at: Millis,
    action: &str,
    sn: &str,
    details: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        id: 0,
        at,
        org_id: Some(org_id),
        actor: actor.label.clone(),
        token_id: actor.token_id,
        action: action.to_string(),
        object: format!("device:{sn}"),
        details,
    }
}

/// SNs of a provisioning that are not the organization's devices, as the `NotFound` message
/// names them (the API maps it to 404 and nothing is stored).
pub(crate) fn unknown_sns_error(unknown: &[String]) -> StoreError {
    const SHOWN: usize = 20;
    let mut names = unknown.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if unknown.len() > SHOWN {
        names.push_str(&format!(" and {} more", unknown.len() - SHOWN));
    }
    StoreError::NotFound(format!("{} unknown device(s): {names}; no GUDID was provisioned", unknown.len()))
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// The store's own id, never shown outside: the API shows `number`.
    #[serde(skip)]
    pub id: i64,
    /// The task's number within its organization (1, 2, …): its id in the API.
    #[serde(rename = "id")]
    pub number: i64,
    pub org_id: i64,
    pub key_source_id: i64,
    pub key_source: String,
    pub slot: u16,
    pub key_type: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub created_by: String,
    pub stopped_at: Option<Millis>,
    pub request_id: Option<i64>,
    pub counts: TaskCounts,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TaskCounts {
    pub total: i64,
    pub queued: i64,
    pub delivered: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub expired: i64,
    pub terminated: i64,
}

impl TaskCounts {
    pub fn open(&self) -> i64 {
        self.queued + self.delivered
    }

    pub fn add(&mut self, state: ExecutionState, n: i64) {
        match state {
            ExecutionState::Queued => self.queued += n,
            ExecutionState::Delivered => self.delivered += n,
            ExecutionState::Succeeded => self.succeeded += n,
            ExecutionState::Failed => self.failed += n,
            ExecutionState::Expired => self.expired += n,
            ExecutionState::Terminated => self.terminated += n,
        }
        self.total += n;
    }
}

/// A new task and its executions, written in one transaction.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub org_id: i64,
    pub key_source_id: i64,
    pub slot: u16,
    pub key_type: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub created_by: String,
    pub request_id: Option<i64>,
    pub executions: Vec<NewExecution>,
}

#[derive(Debug, Clone)]
pub struct NewExecution {
    pub device_id: i64,
    pub key_block: String,
    pub key_id: Vec<u8>,
    pub kcv: String,
    /// The device's credential generation the block was wrapped for.
    pub generation: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExecutionRow {
    pub id: i64,
    pub task_id: i64,
    pub org_id: i64,
    pub device_id: i64,
    pub sn: String,
    #[serde(serialize_with = "ser_state")]
    pub state: ExecutionState,
    pub slot: u16,
    pub key_type: String,
    #[serde(skip)]
    pub key_block: String,
    #[serde(serialize_with = "ser_hex")]
    pub key_id: Vec<u8>,
    pub kcv: String,
    pub generation: i64,
    pub created_at: Millis,
    pub deadline: Millis,
    pub delivered_at: Option<Millis>,
    pub delivery_count: i64,
    pub ended_at: Option<Millis>,
    pub result: Option<i32>,
    pub key_source_id: i64,
}

fn ser_state<S: serde::Serializer>(state: &ExecutionState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

fn ser_hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode_upper(bytes))
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordRow {
    pub id: i64,
    pub org_id: i64,
    pub execution_id: i64,
    /// The store's id of the task, never shown outside.
    #[serde(skip)]
    pub task_id: i64,
    /// The task's number within its organization: `task_id` in the API and the exports.
    #[serde(rename = "task_id")]
    pub task_number: i64,
    pub sn: String,
    pub key_source: String,
    pub key_type: String,
    pub injection: String,
    pub result: String,
    pub error_code: Option<i32>,
    pub at: Millis,
    pub key_id: String,
    pub kcv: String,
}

/// How an execution ended, to be written with its record.
#[derive(Debug, Clone)]
pub struct Ending {
    pub execution_id: i64,
    pub state: ExecutionState,
    pub result: Option<i32>,
    pub injection: String,
    pub at: Millis,
    /// On success: the device is locked in the same transaction.
    pub lock_device: bool,
    /// Sends of the execution that no [`Write::Delivered`] has recorded yet. The engine writes a
    /// send's `Delivered` up to a second late, and an ack that comes sooner carries its sends in
    /// its ending instead, so a fast ack rewrites the execution's row once, not twice. Applied as
    /// those `Delivered` writes would have been just before the ending: `delivered_at` keeps the
    /// first time, `delivery_count` adds the count (and PostgreSQL's `last_sent_at` takes the
    /// last time); an ending that is skipped (the execution is no longer open) skips them too,
    /// as the `Delivered` writes would have been.
    pub sends: Option<Sends>,
}

/// Sends of one execution, not yet written (see [`Ending::sends`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sends {
    pub first_at: Millis,
    pub last_at: Millis,
    pub count: u32,
}

impl Sends {
    pub fn one(at: Millis) -> Sends {
        Sends { first_at: at, last_at: at, count: 1 }
    }

    /// Adds a later send.
    pub fn add(&mut self, at: Millis) {
        self.first_at = self.first_at.min(at);
        self.last_at = self.last_at.max(at);
        self.count = self.count.saturating_add(1);
    }
}

/// What a device last reported in its hello.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    pub device_id: i64,
    pub model: String,
    pub rom_version: String,
    pub app_version: String,
    pub region: String,
    pub debug_mode: bool,
    pub debug_key_present: bool,
    pub locked: bool,
    pub slots_json: String,
    pub at: Millis,
}

/// One write of a batch. A batch is applied in one transaction, in order.
#[derive(Debug, Clone)]
pub enum Write {
    Report(DeviceReport),
    Counter {
        device_id: i64,
        counter: u64,
    },
    Seen {
        device_id: i64,
        at: Millis,
    },
    Delivered {
        execution_id: i64,
        at: Millis,
    },
    End(Ending),
    /// Spends a GUDID and installs the device's new credentials, atomically; skipped (and
    /// reported as such) if the GUDID was revoked, or spent meanwhile and not awaiting proof
    /// ([`GudidRow::awaits_proof`]). A GUDID answered anew keeps its first `used_at`.
    Initialise {
        gudid_row: i64,
        device_id: i64,
        creds: NewCredentials,
        at: Millis,
    },
    /// The device proved the secrets of its initialisation `generation`: its spent, unproven
    /// GUDID (if any) is spent for good, but only while the device's credentials are still of
    /// that generation. A proof that a newer initialisation (through another node, or a later
    /// CreateKey) overtook proves nothing: the device holds secrets the store no longer has, and
    /// must be able to initialise again with its GUDID. A no-op for a device with none.
    ProveGudid {
        device_id: i64,
        generation: i64,
        at: Millis,
    },
}

/// What `apply_batch` did, so the caller can update its caches and metrics only for what is
/// durable.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Executions ended by this batch (an ending for an execution that was no longer open is
    /// skipped, so it is not counted twice).
    pub ended: Vec<(i64, ExecutionState)>,
    /// GUDID row → the device's new credentials, or `None` if the GUDID was already spent.
    pub initialised: Vec<(i64, Option<DeviceCredentials>)>,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub sn_contains: Option<String>,
    pub group: Option<i64>,
    pub limit: i64,
    pub offset: i64,
    /// Keyset pagination: only devices whose SN sorts (bytewise) after this one.
    pub after_sn: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub sn: Option<String>,
    pub task_id: Option<i64>,
    pub limit: i64,
    pub offset: i64,
    /// Keyset pagination: only records older than this one (records are listed newest first, and
    /// are append-only, so a cursor never skips or repeats one).
    pub before_id: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BillingRow {
    pub key_source: String,
    pub month: String,
    pub keys: i64,
}

/// A row of a device import.
#[derive(Debug, Clone)]
pub struct ImportRow {
    pub line: usize,
    pub sn: String,
    pub model: Option<String>,
}

/// The inside of [`Tasks::create_task_with`]'s transaction: what the caller may read and write
/// while it streams a task's executions in chunks.
pub trait TaskSink {
    /// What deriving for those of `device_ids` that are initialised needs (any order), read
    /// inside the task's transaction: each one's key-block protection key for an AES BDK
    /// (`aes`) or a TDES one.
    fn derive_targets(&mut self, device_ids: &[i64], aes: bool) -> StoreResult<Vec<DeriveTarget>>;
    /// Inserts executions of the task, queued; returns their ids, in the order given.
    fn insert(&mut self, executions: &[NewExecution]) -> StoreResult<Vec<i64>>;
}

/// The task as read back after `create_task_with` committed it (its counts, not its executions),
/// checked against the number of executions the backend inserted: the pair of assertions around
/// the write.
pub(crate) fn committed_task(row: TaskRow, inserted: usize) -> StoreResult<TaskRow> {
    if row.counts.total as usize != inserted {
        return Err(StoreError::Backend(format!(
            "task {}: {} executions persisted, {inserted} inserted",
            row.id, row.counts.total
        )));
    }
    Ok(row)
}

pub use channel::ChannelStore;
pub use roles::*;

/// The `meta` key of the downlink counter's high-water mark: no gateway → device frame ever
/// carried a counter above it, so a restarted gateway starts above it ([`crate::engine`]).
pub const MARK_DOWN_COUNTER: &str = "down_counter_mark";
/// The `meta` key of the clock's floor: the wall reading a restarted gateway does not go below.
pub const MARK_CLOCK_FLOOR_MS: &str = "clock_floor_ms";

/// A mark as `meta` stores it (text); a value that is not a number reads as absent.
pub(crate) fn parse_mark(text: Option<String>) -> Option<i64> {
    text.and_then(|t| t.trim().parse().ok())
}

/// Crash points for the crash tests: with `RKI_CRASH_POINT=ACTION` in its environment, the
/// process SIGKILLs itself right after the transaction of the first audited `ACTION` (e.g.
/// `group.create`) commits; with `ACTION@transaction`, inside that transaction, after its writes
/// and its audit entry, before the commit. Unset (production), each check is one load of a
/// `OnceLock`. The tests use it to kill the gateway between an action and what follows it, at
/// exactly that point rather than by luck.
pub(crate) mod crash {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    /// The action, and whether the point is inside its transaction.
    fn point() -> Option<&'static (String, bool)> {
        static POINT: OnceLock<Option<(String, bool)>> = OnceLock::new();
        POINT
            .get_or_init(|| {
                let value = std::env::var("RKI_CRASH_POINT").ok()?;
                Some(match value.strip_suffix("@transaction") {
                    Some(action) => (action.to_string(), true),
                    None => (value, false),
                })
            })
            .as_ref()
    }

    thread_local! {
        /// The audited action of the transaction under way on this thread.
        static AUDITED: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// An audit entry for `action` was written in the transaction under way on this thread.
    pub(crate) fn audited(action: &str) {
        let Some((wanted, in_transaction)) = point() else { return };
        if wanted != action {
            return;
        }
        if *in_transaction {
            die(action);
        }
        AUDITED.with(|a| *a.borrow_mut() = Some(action.to_string()));
    }

    /// The transaction under way on this thread committed (or failed: nothing to crash after).
    pub(crate) fn finished(committed: bool) {
        if point().is_none() {
            return;
        }
        let action = AUDITED.with(|a| a.borrow_mut().take());
        if let (true, Some(action)) = (committed, action) {
            die(&action);
        }
    }

    fn die(action: &str) -> ! {
        eprintln!("RKI_CRASH_POINT: killing the process at {action}");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort()
    }
}
